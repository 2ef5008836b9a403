"""Rotate-half RoPE of q and k in one Triton kernel (with the Triton attention backend, ember/layers/rotary.py).

The torch form is ~8 small kernels a layer (cat, multiplies, negate, cat, add); at decode on a GPU each small
kernel costs microseconds whatever its size, for 24-80 layers a step. Here one program per token rotates all of its
q and k heads: x1 * cos - x2 * sin, x2 * cos + x1 * sin over the first rotary_dim dims (halves x1, x2), computed
in float32 and rounded once; dims past rotary_dim (partial rotary) are copied. q and k may be strided views (of
one projection's output); the outputs are new contiguous tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(X, O, x_row, o_row, stride_xh, stride_oh, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
            D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    """The heads of one token: X + x_row (head stride stride_xh) rotated into O + o_row (stride_oh)."""
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    head_ok = heads < NUM_HEADS
    ok = head_ok[:, None] & (d[None, :] < HALF)
    heads = tl.where(head_ok, heads, 0)  # (masked lanes point inside the tensor all the same)
    d = tl.where(d < HALF, d, 0)
    x1_ptr = X + x_row + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x1_ptr, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    o_ptr = O + o_row + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, (x1 * cos[None, :] - x2 * sin[None, :]).to(O.dtype.element_ty), mask=ok)
    tl.store(o_ptr + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(O.dtype.element_ty), mask=ok)
    if D > 2 * HALF:  # partial rotary: the rest passes through
        r = 2 * HALF + tl.arange(0, BLOCK_REST)
        keep = head_ok[:, None] & (r[None, :] < D)
        r = tl.where(r < D, r, 2 * HALF)
        rest = tl.load(X + x_row + heads[:, None] * stride_xh + r[None, :], mask=keep, other=0.0)
        tl.store(O + o_row + heads[:, None] * stride_oh + r[None, :], rest, mask=keep)


@triton.jit
def _rope_kernel(Q, K, QO, KO, Cos, Sin, Pos, stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh,
                 stride_kot, stride_koh, stride_c, H: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                 D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_REST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d = tl.where(d < HALF, d, 0)  # (lanes past HALF are masked in _rotate)
    cos = tl.load(Cos + pos * stride_c + d)  # (the tables repeat their first half)
    sin = tl.load(Sin + pos * stride_c + d)
    _rotate(Q, QO, t * stride_qt, t * stride_qot, stride_qh, stride_qoh, cos, sin, H, HALF, D, BLOCK_H, BLOCK_HALF,
            BLOCK_REST)
    _rotate(K, KO, t * stride_kt, t * stride_kot, stride_kh, stride_koh, cos, sin, HKV, HALF, D, BLOCK_HKV,
            BLOCK_HALF, BLOCK_REST)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hkv, D] (any strides with the last dim contiguous), positions [T], cos / sin
    [max_positions, rotary_dim] float32 -> rotated (q, k), new contiguous tensors in q's and k's dtypes."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and rotary_dim % 2 == 0
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0:
        return qo, ko
    half, p2 = rotary_dim // 2, triton.next_power_of_2
    _rope_kernel[(T,)](q, k, qo, ko, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0), H=H, HKV=Hkv,
                       HALF=half, D=D, BLOCK_H=p2(H), BLOCK_HKV=p2(Hkv), BLOCK_HALF=p2(half),
                       BLOCK_REST=p2(max(1, D - rotary_dim)))
    return qo, ko
