"""What the Triton attention kernels share: tile sizes, dot precision, "no window", the page-table lookup and the
online-softmax step."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Passed as the window of full-attention layers: the kernels then need no branch on it (every position of a
# context fits in it, and seq_len - NO_WINDOW stays within int32).
NO_WINDOW = 1 << 30


def block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every tile side >= 16


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # float32 stays float32 (tf32 would be the default)


@triton.jit
def paged_slots(page_row, pos, valid, PAGE_SIZE: tl.constexpr):
    """KV-pool slots (int64) of positions `pos` of one request, whose page-table row starts at `page_row`."""
    page = tl.load(page_row + pos // PAGE_SIZE, mask=valid, other=0)
    return page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE


@triton.jit
def softmax_block(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One block of keys in an online softmax: scores s [rows, BLOCK_N] (keys a row does not see at -inf), values
    v [BLOCK_N, DV]; running max m_i, sum l_i and output acc in, updated out. A row that has seen no key yet keeps
    a finite shift so that exp gives 0 (sliding windows, padding rows)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def softmax_output(acc, l_i):
    """The normalized output of an online softmax (rows that saw nothing: 0)."""
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit
def log_sum_exp(m_i, l_i):
    """Per row: log of the softmax's denominator (what split-K partials are merged by), -inf for no key."""
    return tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
