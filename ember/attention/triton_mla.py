"""Paged MLA decode in Triton (ember/layers/mla_attention.py has the algebra): with the up-projections absorbed,
every head's query [W_UK^T q_nope ; q_rope] attends to the same cached row [c ; k_rope] per token, and the
values are the latent c itself. So one program takes a block of BLOCK_H heads of one request (all sharing the
row), loads each row once per block of keys, uses its latent part for both the score and the value, and the
rope part for the score only. The latent width R (512 for DeepSeek / GLM) and rope width DR (64) are kept as
two tiles instead of one padded R + DR tile (576 would pad to 1024). Split-K as in triton_decode.py (batch 1
with GLM-4.7-Flash's 20 heads is 2 programs otherwise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.attention.triton_common import (NO_WINDOW, block, dot_precision, log_sum_exp, paged_slots, softmax_block,
                                           softmax_output)
from ember.attention.triton_decode import combine_splits, num_splits, split_buffers


@triton.jit
def _mla_decode_kernel(QL, QR, Cache, O, Lse, PageTable, SeqLens,
                       stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_cs, stride_ob, stride_oh,
                       stride_os, stride_lb, stride_lh, stride_pt, scale, window, H,
                       PAGE_SIZE: tl.constexpr, R: tl.constexpr, DR: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr, NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    row_ok = heads < H
    seq_len = tl.load(SeqLens + b)
    dr_ = tl.arange(0, BLOCK_R)
    dp = tl.arange(0, BLOCK_DR)
    q_lat = tl.load(QL + b * stride_qlb + heads[:, None] * stride_qlh + dr_[None, :],
                    mask=row_ok[:, None] & (dr_[None, :] < R), other=0.0)
    q_rope = tl.load(QR + b * stride_qrb + heads[:, None] * stride_qrh + dp[None, :],
                     mask=row_ok[:, None] & (dp[None, :] < DR), other=0.0)
    start = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N  # as in triton_decode.py
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < hi
        row = paged_slots(PageTable + b * stride_pt, pos, valid, PAGE_SIZE) * stride_cs
        c = tl.load(Cache + row[:, None] + dr_[None, :], mask=valid[:, None] & (dr_[None, :] < R), other=0.0)
        k_r = tl.load(Cache + row[:, None] + R + dp[None, :], mask=valid[:, None] & (dp[None, :] < DR), other=0.0)
        s = (tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
             + tl.dot(q_rope, tl.trans(k_r), input_precision=PRECISION)) * scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_block(s, c, m_i, l_i, acc, PRECISION)  # the values: the latent rows just loaded
    out = softmax_output(acc, l_i)
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dr_[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dr_[None, :] < R))
    if NUM_SPLITS > 1:
        tl.store(Lse + b * stride_lb + heads * stride_lh + split, log_sum_exp(m_i, l_i), mask=row_ok)


def paged_mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, page_size: int, scale: float, window: int | None = None,
                     max_seq_len: int | None = None, splits: int | None = None) -> torch.Tensor:
    """q_latent [B, H, R] (W_UK^T q_nope), q_rope [B, H, DR]; cache [S, 1, R + DR] (the latent pool); page_table
    [B, pages] int32; seq_lens [B] int32; max_seq_len, splits: as paged_decode's -> [B, H, R]: softmax-weighted
    latents, before W_UV."""
    B, H, R = q_latent.shape
    DR = q_rope.shape[2]
    if cache.shape[1] != 1 or cache.shape[2] != R + DR:
        raise ValueError(f"latent pool rows {tuple(cache.shape[1:])} do not fit queries of {R} + {DR}")
    assert cache.stride(2) == 1 and page_table.stride(1) == 1
    q_latent = q_latent.to(cache.dtype).contiguous()
    q_rope = q_rope.to(cache.dtype).contiguous()
    out = torch.empty(B, H, R, dtype=cache.dtype, device=cache.device)
    block_h, block_n = 16, 32 if R > 128 else 64
    head_blocks = triton.cdiv(H, block_h)
    if splits is None:
        keys = max_seq_len if max_seq_len is not None else int(seq_lens.max())
        splits = num_splits(B * head_blocks, min(keys, window or keys), block_n)
    mid, lse = split_buffers(B, H, splits, R, cache.device) if splits > 1 else (out, out)
    _mla_decode_kernel[(B, head_blocks, splits)](
        q_latent, q_rope, cache, mid, lse, page_table, seq_lens,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), cache.stride(0),
        mid.stride(0), mid.stride(1), mid.stride(2) if splits > 1 else 0, lse.stride(0), lse.stride(1),
        page_table.stride(0), scale, window or NO_WINDOW, H,
        PAGE_SIZE=page_size, R=R, DR=DR, BLOCK_R=block(R), BLOCK_DR=block(DR), BLOCK_H=block_h,
        BLOCK_N=block_n, PRECISION=dot_precision(cache.dtype), NUM_SPLITS=splits)
    return combine_splits(mid, lse, out) if splits > 1 else out
