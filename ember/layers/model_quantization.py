"""`--quantization`: every linear layer (lm_head included) and every MoE layer's experts of a model, replaced by
their quantized forms (the linear quantizers live in quantization.py, the experts' in moe_quant.py)."""
from __future__ import annotations

from torch import nn

from ember.layers.linear import keep_tp_semantics
from ember.layers.moe_quant import quantize_experts
from ember.layers.quantization import (
    INT4_KEEP_INT8, METHODS, W4A8_KEEP_8BIT, GroupQuantLinear, Int4Linear, Int8Linear, W8A8Linear,
)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear (lm_head included), and every MoE layer's experts, by its quantized form."""
    if method not in METHODS:
        raise ValueError(f"--quantization {method!r} is not supported (choose from {', '.join(METHODS)})")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        cls = W8A8Linear if method == "w8a8_int8" else Int8Linear
        if method == "int4" and not any(k in name for k in INT4_KEEP_INT8):
            cls = Int4Linear
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if method == "w4a8":
            q = GroupQuantLinear(linear, 8 if any(k in name for k in W4A8_KEEP_8BIT) else 4)
        else:
            q = cls(linear)
        setattr(parent, attr, keep_tp_semantics(linear, q))  # tp > 1: still all-reduced / gathered
    quantize_experts(model, method)  # MoE experts: stacked weights, not nn.Linear
    return model
