"""`ember download` and `--model-path org/name` against local directories laid out as each hub's cache (no
network here): the real hub clients find the snapshot offline."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.tiny_models import tiny_model

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model("qwen3", tmp_path_factory.mktemp("hub") / "tiny")


def _snapshot(root, repo_dir, ref_name, src):
    snap = root / repo_dir / "snapshots" / REV
    shutil.copytree(src, snap)
    (root / repo_dir / "refs").mkdir(parents=True)
    (root / repo_dir / "refs" / ref_name).write_text(REV)
    return snap


def _run(code_or_args, env, cli=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    cmd = [sys.executable, "-m", "ember.cli", *code_or_args] if cli else [sys.executable, "-c", code_or_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


RESOLVE = "from ember.loader import resolve_model_dir; print(resolve_model_dir('ember-org/tiny-qwen3'))"


def test_huggingface_cache_layout(tmp_path, tiny):
    snap = _snapshot(tmp_path, "models--ember-org--tiny-qwen3", "main", tiny)
    env = {"HF_HUB_CACHE": str(tmp_path), "EMBER_USE_MODELSCOPE": ""}
    out = _run(RESOLVE, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(snap)
    out = _run(["download", "ember-org/tiny-qwen3"], env, cli=True)
    assert out.returncode == 0 and out.stdout.strip() == str(snap), out.stderr


@pytest.mark.parametrize("layout", ["snapshots", "flat"])
def test_modelscope_cache_layouts(tmp_path, tiny, layout):
    if layout == "snapshots":
        want = _snapshot(tmp_path / "models", "ember-org--tiny-qwen3", "master", tiny)
    else:  # ModelScope before 1.38: MODELSCOPE_CACHE/org/name
        want = tmp_path / "ember-org" / "tiny-qwen3"
        shutil.copytree(tiny, want)
    env = {"MODELSCOPE_CACHE": str(tmp_path), "EMBER_USE_MODELSCOPE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    out = _run(RESOLVE, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(want)
    out = _run(["download", "ember-org/tiny-qwen3", "--hub", "modelscope"], env, cli=True)
    assert out.returncode == 0 and out.stdout.strip() == str(want), out.stderr


def test_download_error_is_clear(tmp_path):
    """Not cached and no network: exit 2 with the hub's reason, not a traceback."""
    env = {"HF_HUB_CACHE": str(tmp_path), "EMBER_USE_MODELSCOPE": ""}
    out = _run(["download", "ember-org/not-there"], env, cli=True)
    assert out.returncode == 2
    assert "could not fetch 'ember-org/not-there' from huggingface" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run(["download", "../etc"], env, cli=True)
    assert out.returncode == 2 and "not a valid repo id" in out.stderr
