"""Shared helpers for the peer runners: where venvs and builds live, running setup steps niced,
and timing them (setup times are appended to benchmarks/.build/setup_times.json)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
VENVS = BENCH_DIR / ".venvs"
BUILD = BENCH_DIR / ".build"
RESULTS = BENCH_DIR / "results"
EMBER_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"

# Unbounded spin-waiting OpenMP threads slow every CPU engine here 5-10x when anything else runs: PASSIVE.
# But sleeping after every parallel region costs llama.cpp and torch alike dearly (llama-server: 21.9 ->
# 41.0 tok/s at c=1 with a spin of 100,000), and ember's engine sets a bounded spin for itself
# (ember/engine/engine_client.py): every engine gets that same bound, so no one wins by the setting.
BASE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000", "TOKENIZERS_PARALLELISM": "false"}


def use_serving_env() -> None:
    """For a benchmark that runs the engine in its own process: BASE_ENV (the OpenMP settings `ember serve` gives its
    engine process), where the environment does not set them. Call it before torch loads (libgomp reads them then)."""
    for k, v in BASE_ENV.items():
        os.environ.setdefault(k, v)


# EMBER_BENCH_ISA=avx2: the AVX2 code paths on an AVX-512 machine (issue 12: measure AVX2 where no AVX2-only
# machine is at hand): llama.cpp built without AVX-512 (its own build folder), ember with its AVX2 kernels and
# torch's AVX2 ATen kernels; results go to their own state file and BENCHMARKS.md section.
BENCH_ISA = os.environ.get("EMBER_BENCH_ISA", "native").strip().lower()
if BENCH_ISA not in ("native", "avx2"):
    raise SystemExit(f"EMBER_BENCH_ISA={BENCH_ISA!r}: use native or avx2")
ISA_ENV = {"EMBER_KERNEL_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2"} if BENCH_ISA == "avx2" else {}


def ember_python() -> str:
    return str(EMBER_PYTHON if EMBER_PYTHON.exists() else Path(sys.executable))


def run(cmd: list[str] | str, *, nice: bool = True, env: dict | None = None, cwd: str | Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a setup step (niced: this machine is shared), echoing the command."""
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    if nice:
        cmd = ["nice", "-n", "19", *cmd]
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    full_env = {**os.environ, **BASE_ENV, **(env or {})}
    return subprocess.run(cmd, env=full_env, cwd=cwd, check=check)


def make_venv(name: str, python: str | None = None) -> Path:
    """benchmarks/.venvs/<name> (created with the python running this script if missing)."""
    venv = VENVS / name
    if not (venv / "bin" / "python").exists():
        VENVS.mkdir(parents=True, exist_ok=True)
        run([python or sys.executable, "-m", "venv", str(venv)], nice=False)
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return venv


def record_setup_time(peer: str, seconds: float, note: str = "") -> None:
    BUILD.mkdir(parents=True, exist_ok=True)
    path = BUILD / "setup_times.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[peer] = {"seconds": round(seconds, 1), "note": note, "date": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(data, indent=2))


def setup_times() -> dict:
    path = BUILD / "setup_times.json"
    return json.loads(path.read_text()) if path.exists() else {}


def gguf_path(model: str = DEFAULT_MODEL) -> Path:
    """The GGUF file ember serves for a bundled alias (assembled into ~/.cache/ember/gguf on first use)."""
    out = subprocess.run([ember_python(), "-c",
                          f"from ember.loader.bundled import bundled_gguf_path; print(bundled_gguf_path({model!r}))"],
                         check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return Path(out.stdout.strip().splitlines()[-1])


def hf_dir(model: str = DEFAULT_MODEL) -> Path:
    """The Hugging Face directory ember converted from the same GGUF (float32 safetensors + tokenizer)."""
    out = subprocess.run([ember_python(), "-c",
                          f"from ember.loader import resolve_model_dir; print(resolve_model_dir({model!r}))"],
                         check=True, capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**os.environ, **BASE_ENV})
    return Path(out.stdout.strip().splitlines()[-1])
