"""`--quantization`: every linear layer (lm_head included) and every MoE layer's experts of a model, replaced by
their quantized forms (the linear quantizers live in quantization.py, the experts' in moe_quant.py), and the
input embedding table held as 8-bit groups (GroupQuantEmbedding).

The loader calls `quantizing_loader`'s hook as each layer's weights are complete, so layers are quantized while the
checkpoint streams in; `quantize_model` is the same replacement for a model already loaded (and the sweep after
streaming, for what the hook did not reach: MoE experts, a layer whose optional tensors the checkpoint lacks).
"""
from __future__ import annotations

import torch
from torch import nn

from ember.distributed import tp_size
from ember.layers.linear import VocabParallelEmbedding, keep_tp_semantics
from ember.layers.moe_quant import quantize_experts
from ember.layers.quantization import (
    INT4_KEEP_INT8, METHODS, W4A8_KEEP_8BIT, GroupQuantEmbedding, GroupQuantLinear, Int4Linear, Int8Linear, W8A8Linear,
)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--quantization {method!r} is not supported (choose from {', '.join(METHODS)})")


def _quantized(name: str, module: nn.Module, method: str) -> nn.Module | None:
    """The quantized replacement of one module, or None where it stays as it is."""
    if isinstance(module, nn.Linear):
        if method == "w4a8":
            q = GroupQuantLinear(module, 8 if any(k in name for k in W4A8_KEEP_8BIT) else 4)
        elif method == "w8a8_int8":
            q = W8A8Linear(module)
        elif method == "int4" and not any(k in name for k in INT4_KEEP_INT8):
            q = Int4Linear(module)
        else:
            q = Int8Linear(module)
        return keep_tp_semantics(module, q)  # tp > 1: still all-reduced / gathered
    if isinstance(module, VocabParallelEmbedding) and tp_size() == 1:
        return GroupQuantEmbedding(module)
    return None


def _replace(model: nn.Module, name: str, module: nn.Module, method: str) -> None:
    q = _quantized(name, module, method)
    if q is not None:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)


def quantizing_loader(model: nn.Module, method: str, dtype: torch.dtype):
    """The loader's `on_loaded(name, module)` hook that quantizes each layer as soon as its weights are in (from
    the weights cast to `dtype`, as a model cast first and quantized after would be)."""
    _check_method(method)

    def on_loaded(name: str, module: nn.Module) -> None:
        if _quantized_kind(module):
            _replace(model, name, module.to(dtype), method)
    return on_loaded


def cast_unquantized(module: nn.Module, dtype: torch.dtype) -> None:
    """module.to(dtype), except inside quantized layers (their fp16 scales and integer codes stay as built)."""
    if getattr(module, "quantized", False):
        return
    for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    for child in module.children():
        cast_unquantized(child, dtype)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear (lm_head included), every MoE layer's experts and the input embedding by their
    quantized forms."""
    _check_method(method)
    targets = [(name, m) for name, m in model.named_modules() if _quantized_kind(m)]
    for name, module in targets:
        _replace(model, name, module, method)
    quantize_experts(model, method)  # MoE experts: stacked weights, not nn.Linear
    return model


def _quantized_kind(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, VocabParallelEmbedding))
