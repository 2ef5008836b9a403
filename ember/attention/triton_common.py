"""What the Triton attention kernels share: tile sizes, dot precision, "no window", and the page-table lookup."""
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
