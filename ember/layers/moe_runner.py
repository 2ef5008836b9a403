"""--moe-runner-backend (SGLang's flag): which kernels run the MoE experts.

- `torch`: ember/layers/moe.py's grouping (one GEMM pair per chosen expert) or, quantized on CPU, the C++ group
  kernel (moe_quant.py). The default everywhere today.
- `triton`: two grouped GEMMs for all experts at once (moe_triton.py; no host synchronisation, so a CUDA graph can
  hold it). CUDA; on CPU only under TRITON_INTERPRET=1 (tests). Opt-in until it has run on a GPU (issue 18), as
  --attention-backend triton.

No torch here: the API process checks the flag with `resolve_moe_runner`.
"""
from __future__ import annotations

from ember.attention import check_triton_runs

MOE_RUNNERS = ("auto", "torch", "triton")


def resolve_moe_runner(name: str | None, device: str, quantization: str | None = None) -> str:
    """The runner for --moe-runner-backend `name` ("auto"/None: torch). Raises ValueError, saying why, for a
    choice that cannot run here."""
    device_type = str(device).split(":")[0]
    if name in (None, "auto"):
        return "torch"
    if name not in MOE_RUNNERS:
        raise ValueError(f"--moe-runner-backend {name!r} is not one of {', '.join(MOE_RUNNERS)}")
    if name == "triton":
        check_triton_runs("--moe-runner-backend", device_type)
        if quantization not in (None, "none"):
            raise ValueError(f"--moe-runner-backend triton runs float experts; --quantization {quantization} "
                             f"experts run on the torch runner")
    return name


def set_moe_runner(model, name: str | None, device: str, quantization: str | None = None) -> str:
    """Every MoE layer of `model` runs its experts on the resolved runner; returns its name."""
    from ember.layers.moe import MoEExperts
    runner = resolve_moe_runner(name, device, quantization)
    for module in model.modules():
        if isinstance(module, MoEExperts):
            module.runner = runner
    return runner
