"""Attention backends behind one small interface (ember/attention/base.py): metadata prepared once per batch and
KV group, then forward per layer.

- `torch` (torch_sdpa.py): gather + torch SDPA; the CPU path, and the only one with arbitrary masks.
- `triton` (triton_backend.py): paged decode / extend kernels that read K/V straight from the pool's pages
  (triton_decode.py, triton_extend.py, triton_mla.py), with sliding windows, GQA and MLA. CUDA; on CPU only
  under TRITON_INTERPRET=1 (Triton's interpreter, which the tests use).
- `flashinfer`: the flag value is reserved for it; no FlashInfer backend is written yet.

This module imports no torch (the API process checks the flag with `resolve_backend_name`); the backends are
imported when created.
"""
from __future__ import annotations

import importlib.util
import os

BACKENDS = ("torch", "triton", "flashinfer")


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def check_triton_runs(flag: str, device_type: str) -> None:
    """Raises ValueError, saying why, where `flag triton` (Triton kernels) cannot run: no triton package, or not
    CUDA and not Triton's interpreter."""
    if not importable("triton"):
        raise ValueError(f"{flag} triton needs the `triton` package (pip install triton)")
    if device_type != "cuda" and not interpreting():
        raise ValueError(f"{flag} triton runs on CUDA; on {device_type} only under TRITON_INTERPRET=1 (Triton's "
                         f"interpreter, for tests: very slow). Use {flag} torch")


def resolve_backend_name(name: str | None, device: str) -> str:
    """--attention-backend as given, or (None) the default: torch. The Triton kernels are checked against torch
    under Triton's interpreter and compiled for sm_90, but have not yet run on a GPU: until they have (issue 18),
    CUDA keeps the torch path that has, and `--attention-backend triton` opts in.
    Raises ValueError, saying why, for a choice that cannot run here."""
    device_type = str(device).split(":")[0]
    if name is None:
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"--attention-backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "triton":
        check_triton_runs("--attention-backend", device_type)
    if name == "flashinfer":
        if not importable("flashinfer"):
            raise ValueError("--attention-backend flashinfer needs the `flashinfer` package, which is not installed; "
                             "use torch or triton")
        raise ValueError("--attention-backend flashinfer: FlashInfer is installed but ember has no FlashInfer backend "
                         "yet; use torch or triton")
    return name


def create_backend(name: str | None, device: str):
    """The AttentionBackend for --attention-backend `name` on `device` (see resolve_backend_name)."""
    name = resolve_backend_name(name, device)
    if name == "triton":
        from ember.attention.triton_backend import TritonBackend
        return TritonBackend()
    from ember.attention.torch_sdpa import TorchSDPABackend
    return TorchSDPABackend()
