"""Paged decode attention in Triton: one new query per request, keys and values read straight from the pool's
pages through the page table (no gather into a padded block), GQA and sliding windows.

One program per (request, kv head, split) runs the whole GQA group of query heads as the rows of one tile, so
each K/V row is loaded once per group, and walks its share of the request's keys in blocks of BLOCK_N with an
online softmax. Keys are positions [max(0, seq_len - window), seq_len): the query sits at seq_len - 1 and sees
the last `window` positions, itself included (what AttentionMetadata's mask encodes for the torch backend).

Split-K: B * Hkv programs leave most of a GPU idle at small batches (batch 1, 8 kv heads: 8 programs), so the
keys are cut into up to 16 splits; each writes its normalized partial output and log-sum-exp, and
`combine_splits` merges them. One split writes the output directly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.attention.triton_common import (NO_WINDOW, block, dot_precision, log_sum_exp, paged_slots, softmax_block,
                                           softmax_output)


@triton.jit
def _decode_kernel(Q, K, V, O, Lse, PageTable, SeqLens,
                   stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ob, stride_oh,
                   stride_os, stride_lb, stride_lh, stride_pt, scale, window,
                   PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                   DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    rows = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rows
    row_ok = rows < GROUP
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + dk[None, :],
                mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
    start = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N  # whole blocks per split
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)  # (a late split of a short request may get nothing)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < hi
        slot = paged_slots(PageTable + b * stride_pt, pos, valid, PAGE_SIZE)
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + dk[None, :],
                    mask=valid[:, None] & (dk[None, :] < DK), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + dv[None, :],
                    mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        m_i, l_i, acc = softmax_block(s, v, m_i, l_i, acc, PRECISION)
    out = softmax_output(acc, l_i)
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    if NUM_SPLITS > 1:
        tl.store(Lse + b * stride_lb + heads * stride_lh + split, log_sum_exp(m_i, l_i), mask=row_ok)


@triton.jit
def _combine_kernel(Mid, Lse, O, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
                    DV: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + splits)
    w = tl.exp(lse - tl.max(lse, 0))  # split 0 always has keys, so the max is finite
    mid = tl.load(Mid + b * stride_mb + h * stride_mh + splits[:, None] * stride_ms + dv[None, :],
                  mask=dv[None, :] < DV, other=0.0)
    out = tl.sum(w[:, None] * mid, 0) / tl.sum(w, 0)
    tl.store(O + b * stride_ob + h * stride_oh + dv, out.to(O.dtype.element_ty), mask=dv < DV)


def num_splits(programs: int, max_keys: int, block_n: int) -> int:
    """Splits of the keys so that ~256 programs run (a few per SM), none shorter than 4 key blocks."""
    if programs >= 256:
        return 1
    by_work = max(1, max_keys // (4 * block_n))
    n = min(16, triton.next_power_of_2(-(-256 // programs)), by_work)
    return 1 << (n.bit_length() - 1)  # a power of 2 (combine's tl.arange)


def split_buffers(B: int, H: int, splits: int, dv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs [B, H, splits, dv] and their log-sum-exps [B, H, splits], float32."""
    return (torch.empty(B, H, splits, dv, dtype=torch.float32, device=device),
            torch.empty(B, H, splits, dtype=torch.float32, device=device))


def combine_splits(mid: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    B, H, S, DV = mid.shape
    _combine_kernel[(B, H)](mid, lse, out, mid.stride(0), mid.stride(1), mid.stride(2), lse.stride(0),
                            lse.stride(1), out.stride(0), out.stride(1), DV=DV, BLOCK_DV=block(DV), NUM_SPLITS=S)
    return out


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 seq_lens: torch.Tensor, page_size: int, scale: float, window: int | None = None,
                 max_seq_len: int | None = None, splits: int | None = None) -> torch.Tensor:
    """q [B, H, DK] (one query per request, at position seq_lens[b] - 1); k_cache [S, Hkv, DK], v_cache
    [S, Hkv, DV] (slot = page * page_size + offset); page_table [B, pages] int32; seq_lens [B] int32
    (>= 1, the query's own key already written); max_seq_len: seq_lens' max if the caller knows it (else read
    back); splits: of the keys (power of 2; default by num_splits) -> [B, H, DV] in q's dtype."""
    B, H, DK = q.shape
    Hkv, DV = k_cache.shape[1], v_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not group over {Hkv} kv heads")
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and page_table.stride(1) == 1
    q = q.to(k_cache.dtype).contiguous()
    out = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    group = H // Hkv
    block_dk = block(DK)
    block_n = 64 if block_dk <= 128 else 32
    if splits is None:
        keys = max_seq_len if max_seq_len is not None else int(seq_lens.max())
        splits = num_splits(B * Hkv, min(keys, window or keys), block_n)
    mid, lse = split_buffers(B, H, splits, DV, q.device) if splits > 1 else (out, out)
    _decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, mid, lse, page_table, seq_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        mid.stride(0), mid.stride(1), mid.stride(2) if splits > 1 else 0, lse.stride(0), lse.stride(1),
        page_table.stride(0), scale, window or NO_WINDOW,
        PAGE_SIZE=page_size, GROUP=group, BLOCK_H=block(group), DK=DK, DV=DV, BLOCK_DK=block_dk,
        BLOCK_DV=block(DV), BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), NUM_SPLITS=splits)
    return combine_splits(mid, lse, out) if splits > 1 else out
