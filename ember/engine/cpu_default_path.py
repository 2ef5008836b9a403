"""Which weights path a CPU server takes when no --quantization is given (fast by default, issue 12).

A model converted from a quantized GGUF was already rounded to 4-8 bit codes, so running it in float32 spends
memory bandwidth (the CPU's bottleneck at decode) on precision the file never had. ember then picks the
fastest of its quantized paths that is not more quantized than the file (the type it declares, e.g. Q4_K_M):
w4a8 (4-bit codes) for a Q4 file (or fewer bits), w8a8_int8 (8-bit codes) for Q5-Q8 files. Everything else keeps the exact float path: float
checkpoints (safetensors), an explicit `--dtype float32` or `--quantization none`, GPUs, tensor parallel,
and CPUs without the AVX2 kernels (the portable loop is a reference, not a fast path). The choice and its
reason are logged at start and reported by /get_server_info.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

EXACT = "none"


@dataclass(frozen=True)
class WeightsPath:
    quantization: str | None  # a --quantization method, or None for the float weights as loaded
    reason: str


def _code_bits(qtype: str) -> int | None:
    """Bits per code of a GGUF quant type (Q4_K -> 4, IQ4_XS -> 4, Q8_0 -> 8); None for float types."""
    m = re.match(r"I?Q(\d)", qtype)
    return int(m.group(1)) if m else None


def choose_weights_path(quantization: str | None, dtype: str, device: str, tp_size: int, model_dir) -> WeightsPath:
    if quantization == EXACT:
        return WeightsPath(None, "--quantization none: the float weights as loaded")
    if quantization:
        return WeightsPath(quantization, f"--quantization {quantization}")
    if device != "cpu":
        return WeightsPath(None, f"{device}: float weights")
    if dtype != "auto":
        return WeightsPath(None, f"--dtype {dtype} given: the exact path")
    if tp_size > 1:
        return WeightsPath(None, "tensor parallel: float weights (give --quantization to quantize)")
    from ember.loader.gguf_convert import converted_weight_bits

    source = converted_weight_bits(model_dir)
    if source is None:
        return WeightsPath(None, "float checkpoint: the exact path (--quantization w8a8_int8 or w4a8 is faster)")
    bits, qtype = source
    code_bits = _code_bits(qtype)
    if code_bits is None:
        return WeightsPath(None, f"the GGUF holds {qtype} weights: the exact path")
    from ember.kernels import default_variant

    if default_variant() == "portable":
        return WeightsPath(None, "this CPU has no AVX2: the quantized kernels would run their portable loop")
    method = "w4a8" if code_bits <= 4 else "w8a8_int8"
    return WeightsPath(method, f"the weights came from a {qtype} GGUF ({bits:.1f} bits per weight): {method} is "
                               f"the fastest path not more quantized than that (--quantization none: float32)")
