"""Shared pytest fixtures. The bundled real models are resolved once per session (the first
resolve converts each GGUF, which takes a minute; later ones hit ~/.cache/ember)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting OpenMP threads slow CPU torch 5-10x
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _resolve(alias: str):
    from ember.loader import resolve_model_dir

    return resolve_model_dir(alias)


@pytest.fixture(scope="session")
def smollm2_dir():
    return _resolve("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_dir():
    return _resolve("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma3_dir():
    return _resolve("gemma3-270m")
