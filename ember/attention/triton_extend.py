"""Paged extend attention in Triton: several new queries per request (a prefill chunk, speculative drafts)
attending to the request's cached prefix and causally to each other, every key read from the pool's pages.

The backend writes the new tokens' K/V into the pool before attending (as the torch backend does), so prefix
and new keys are one range of positions [0, prefix + q_len) in the page table, and causality is just
key position <= query position. A sliding window also requires query position - key position < window. Queries
are the flat [T, H, DK] rows of the batch; request b owns rows q_loc[b] .. q_loc[b] + q_len[b] - 1.

One program per (request, query head, block of BLOCK_M queries) walks only the keys some of its queries see:
from the first query's window start to the last query's position. The same kernel runs MLA's absorbed
attention (one shared kv head, values = the first DV columns of the key row: pass the latent pool as both).

Speculative draft trees (`TreeMasks`, ember/speculative/tree.py's TreeSpec per request): a request's slots from
`base` on hold tree nodes, each at its own logical position (base + depth). Causality and windows then compare
logical positions, and among tree slots a query sees only what the node's row of the visibility matrix allows
(itself and its ancestors); a query before `base` sees no tree slot. As the torch backend's mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember.attention.triton_common import NO_WINDOW, block, dot_precision, paged_slots, softmax_block, softmax_output
from ember.host_to_device import to_device


@dataclass
class TreeMasks:
    """Per request of a batch (int32 on the device): where its tree starts (`NO_WINDOW`: no tree), its node count,
    and offsets into the flat node positions [sum m] (int32) and visibility matrices [sum m * m] (int8)."""
    base: torch.Tensor
    size: torch.Tensor
    pos_off: torch.Tensor
    vis_off: torch.Tensor
    pos: torch.Tensor
    vis: torch.Tensor

    @staticmethod
    def build(trees: list, device) -> TreeMasks:
        """From per-request TreeSpecs (None: no tree)."""
        sizes = [len(t.pos) if t is not None else 0 for t in trees]
        pos_off = torch.tensor([0] + sizes[:-1]).cumsum(0)
        vis_off = torch.tensor([0] + [m * m for m in sizes[:-1]]).cumsum(0)
        pos = [torch.tensor(t.pos) for t in trees if t is not None] or [torch.zeros(1)]
        vis = [t.vis.reshape(-1) for t in trees if t is not None] or [torch.zeros(1)]
        host = (torch.tensor([t.base if t is not None else NO_WINDOW for t in trees]), torch.tensor(sizes), pos_off,
                vis_off, torch.cat(pos))
        return TreeMasks(*(to_device(t.int(), device) for t in host), to_device(torch.cat(vis).to(torch.int8), device))


@triton.jit
def _logical(TreePos, slots, base, ok):
    """Logical (RoPE, causal) positions of slots: a tree node's own position, the slot itself before the tree."""
    inside = (slots >= base) & ok
    return tl.where(inside, tl.load(TreePos + slots - base, mask=inside, other=0), slots), inside


@triton.jit
def _extend_kernel(Q, K, V, O, PageTable, Prefix, QLoc, QLen, TreeBase, TreeSize, TreePosOff, TreeVisOff, TreePos,
                   TreeVis, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
                   stride_pt, scale, window,
                   PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, HAS_TREE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    q_len = tl.load(QLen + b)
    if m0 < q_len:  # (grid is sized for the longest request)
        prefix = tl.load(Prefix + b)
        q_loc = tl.load(QLoc + b)
        kvh = h // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q_pos = prefix + offs_m
        dk = tl.arange(0, BLOCK_DK)
        dv = tl.arange(0, BLOCK_DV)
        rows = (q_loc + offs_m).to(tl.int64)
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + dk[None, :],
                    mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)
        hi = prefix + tl.minimum(q_len, m0 + BLOCK_M)  # past the block's last query position
        if HAS_TREE:
            base = tl.load(TreeBase + b)
            tree_pos = TreePos + tl.load(TreePosOff + b)
            tree_vis = TreeVis + tl.load(TreeVisOff + b)
            tree_size = tl.load(TreeSize + b)
            q_lpos, q_in = _logical(tree_pos, q_pos, base, row_ok)
            lo = tl.maximum(tl.min(tl.where(row_ok, q_lpos, 1 << 30), 0) - window + 1, 0)
        else:
            q_lpos = q_pos
            lo = tl.maximum(prefix + m0 - window + 1, 0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < hi
            slot = paged_slots(PageTable + b * stride_pt, pos, valid, PAGE_SIZE)
            k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + dk[None, :],
                        mask=valid[:, None] & (dk[None, :] < DK), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            if HAS_TREE:  # logical positions; among tree slots, the node's row of the visibility matrix
                k_lpos, k_in = _logical(tree_pos, pos, base, valid)
                vis = tl.load(tree_vis + (q_pos - base)[:, None] * tree_size + (pos - base)[None, :],
                              mask=q_in[:, None] & k_in[None, :], other=0)
                dist = q_lpos[:, None] - k_lpos[None, :]
                keep = valid[None, :] & (dist >= 0) & (dist < window) & (~k_in[None, :] | (vis != 0))
            else:
                keep = valid[None, :] & (pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - pos[None, :] < window)
            s = tl.where(keep, s, float("-inf"))
            v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
            m_i, l_i, acc = softmax_block(s, v, m_i, l_i, acc, PRECISION)
        out = softmax_output(acc, l_i)
        tl.store(O + rows[:, None] * stride_ot + h * stride_oh + dv[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 prefix_lens: torch.Tensor, q_loc: torch.Tensor, q_lens: torch.Tensor, max_q: int, page_size: int,
                 scale: float, window: int | None = None, dv: int | None = None,
                 trees: TreeMasks | None = None) -> torch.Tensor:
    """q [T, H, DK] (request b's rows q_loc[b] ..+ q_lens[b], at positions prefix_lens[b] ..); k_cache
    [S, Hkv, DK], v_cache [S, Hkv, >= DV] with every attended key already written (slot = page * page_size +
    offset); page_table [B, pages], prefix_lens / q_loc / q_lens [B], all int32; dv: value width (default
    v_cache's; MLA passes the latent width with v_cache = k_cache); trees: draft trees' masks -> [T, H, DV] in
    q's dtype."""
    T, H, DK = q.shape
    B = q_lens.shape[0]
    Hkv, DV = k_cache.shape[1], dv or v_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not group over {Hkv} kv heads")
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and page_table.stride(1) == 1
    q = q.to(k_cache.dtype).contiguous()
    out = torch.empty(T, H, DV, dtype=q.dtype, device=q.device)
    block_dk = block(DK)
    # wide rows (MLA's 512 + 64 pads to 1024) get small tiles and no pipelining, to fit in shared memory
    block_m = block_n = 64 if block_dk <= 128 else 32 if block_dk <= 256 else 16
    _extend_kernel[(B, H, triton.cdiv(max_q, block_m))](
        q, k_cache, v_cache, out, page_table, prefix_lens, q_loc, q_lens,
        *((trees.base, trees.size, trees.pos_off, trees.vis_off, trees.pos, trees.vis) if trees is not None
          else (q_lens,) * 6),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), page_table.stride(0), scale, window or NO_WINDOW,
        PAGE_SIZE=page_size, GROUP=H // Hkv, DK=DK, DV=DV, BLOCK_DK=block_dk, BLOCK_DV=block(DV),
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype), HAS_TREE=trees is not None,
        num_stages=1 if block_dk > 256 else 2)
    return out
