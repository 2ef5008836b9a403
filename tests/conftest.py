"""Shared pytest fixtures. The bundled real models are resolved once per session (the first
resolve converts each GGUF, which takes a minute; later ones hit ~/.cache/ember)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads slow CPU torch 5-10x
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs Triton only in its interpreter (tests/unit/test_triton_attention.py; the compile test strips this
# for its subprocess). Triton decides interpretation when it and the kernels are imported, and anything may import
# it first (a model test did, and the kernel tests then failed in the full suite): set it before all of them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _resolve(alias: str):
    from ember.loader import resolve_model_dir

    return resolve_model_dir(alias)


@pytest.fixture
def triton_interpret(monkeypatch):
    """Triton's interpreter while a test runs (tests/triton_interpreter.py)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir():
    return _resolve("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_dir():
    return _resolve("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma3_dir():
    return _resolve("gemma3-270m")
