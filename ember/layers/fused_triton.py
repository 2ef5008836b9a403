"""RMSNorm (with the residual add before it, where a layer has one) and SiLU(gate) x up, each in one Triton kernel
(with the Triton attention backend on a GPU, switched on by ember/layers/triton_layers.py).

In torch a bf16 RMSNorm is ~7 kernels (cast, square, mean, add, rsqrt, multiply, cast, multiply) and the gated
MLP's activation 2; at decode on a GPU each small kernel costs microseconds whatever its size, and a step runs a few
of them per layer. The arithmetic is the torch form's (transformers'), roundings included: the norm in float32,
rounded to the input's dtype, then multiplied by the weight in that dtype (Gemma's unit-offset weight: 1 + w in
float32, rounded once); silu(gate) rounded (and clamped, Step-3.5), then multiplied by up and rounded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, Delta, Sum, W, O, stride_xa, stride_xb, B, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                     UNIT_OFFSET: tl.constexpr, HAS_DELTA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a, b = row // B, row % B
    d = tl.arange(0, BLOCK)
    ok = d < D
    d = tl.where(ok, d, 0)  # (masked lanes point inside the row all the same)
    x = tl.load(X + a * stride_xa + b * stride_xb + d, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:  # the residual add first (rounded to the dtype, as torch's), kept in Sum and normed
        x = (x + tl.load(Delta + row * D + d, mask=ok, other=0.0).to(tl.float32)).to(O.dtype.element_ty)
        tl.store(Sum + row * D + d, x, mask=ok)
        x = x.to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(W + d, mask=ok, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        out = normed * (1.0 + w)
    else:
        out = normed.to(O.dtype.element_ty).to(tl.float32) * w
    tl.store(O + row * D + d, out.to(O.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """x [..., D] (the last dim contiguous; 2-d or 3-d views with any strides, e.g. per-head slices of one
    projection) -> a new contiguous tensor of x's shape and dtype."""
    D = x.shape[-1]
    if x.dim() == 3 and x.stride(-1) == 1:
        x3 = x
    elif x.dim() == 2 and x.stride(-1) == 1:
        x3 = x.unsqueeze(1)
    else:
        x3 = x.reshape(-1, 1, D).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x3.shape[0] * x3.shape[1]
    if rows:
        _launch_norm(x3, x3, x3, weight, out, eps, unit_offset, False)
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x + delta and its RMSNorm in one pass: x, delta [T, D] -> (sum, normed), new contiguous tensors."""
    x, delta = x.contiguous(), delta.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    if x.shape[0]:
        _launch_norm(x.unsqueeze(1), delta, total, weight, out, eps, unit_offset, True)
    return total, out


def _launch_norm(x3, delta, total, weight, out, eps, unit_offset, has_delta) -> None:
    D, BLOCK = x3.shape[-1], triton.next_power_of_2(x3.shape[-1])
    _rms_norm_kernel[(x3.shape[0] * x3.shape[1],)](
        x3, delta, total, weight, out, x3.stride(0), x3.stride(1), x3.shape[1], eps, D=D, BLOCK=BLOCK,
        UNIT_OFFSET=unit_offset, HAS_DELTA=has_delta, num_warps=min(max(BLOCK // 512, 1), 8))


@triton.jit
def _silu_and_mul_kernel(X, O, stride_x, I, limit, BLOCK: tl.constexpr, HAS_LIMIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    cols = tl.where(ok, cols, 0)
    gate = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(O.dtype.element_ty).to(tl.float32)
    if HAS_LIMIT:  # Step-3.5's clamp (ember/layers/mlp.py gated_act)
        act = tl.minimum(act, limit).to(O.dtype.element_ty).to(tl.float32)
        up = tl.minimum(tl.maximum(up, -limit), limit).to(O.dtype.element_ty).to(tl.float32)
    tl.store(O + row * I + cols, (act * up).to(O.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate then up, rows contiguous) -> silu(gate) * up [T, I] (gated_act, with its clamp when
    `limit` is set)."""
    T, two_i = gate_up.shape
    assert gate_up.stride(-1) == 1 and two_i % 2 == 0
    I = two_i // 2
    out = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    if T:
        BLOCK = min(1024, triton.next_power_of_2(I))
        _silu_and_mul_kernel[(T, triton.cdiv(I, BLOCK))](gate_up, out, gate_up.stride(0), I, float(limit or 0.0),
                                                         BLOCK=BLOCK, HAS_LIMIT=limit is not None)
    return out
