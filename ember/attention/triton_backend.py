"""The Triton backend: paged decode / extend kernels that read K/V from the pool's pages (triton_decode.py,
triton_extend.py, triton_mla.py). Its metadata is per-request lengths and the page table itself, not the
[B, max_k] slot block and [B, max_q, max_k] mask the torch backend builds, so nothing per key is
materialized. Causality, sliding windows and speculative draft trees (per-request node positions and visibility
matrices, `TreeMasks`) are computed in the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.attention.base import AttentionBackend, GroupBatch
from ember.attention.triton_decode import paged_decode
from ember.attention.triton_extend import TreeMasks, paged_extend
from ember.attention.triton_mla import paged_mla_decode
from ember.host_to_device import device_ints, to_device


@dataclass
class PagedMetadata:
    """One KV group's batch for the Triton kernels (int32 on the device, except write_slots)."""
    write_slots: torch.Tensor  # [T] int64 slot of each new token
    page_table: torch.Tensor  # [B, max pages] page ids by position // page_size (padding: page 0)
    prefix_lens: torch.Tensor  # [B] tokens cached before this step (the first new token's position)
    q_lens: torch.Tensor  # [B] new tokens
    q_loc: torch.Tensor  # [B] row of each request's first new token in the flat [T] batch
    seq_lens: torch.Tensor  # [B] prefix + new
    max_seq_len: int  # (known on the host: the decode kernels size their split-K without reading it back)
    page_size: int
    window: int | None
    batch_size: int
    max_q: int
    trees: TreeMasks | None = None  # speculative draft trees (extend steps only: a one-token tree is plain decode)


class TritonBackend(AttentionBackend):
    name = "triton"

    def prepare(self, gb: GroupBatch) -> PagedMetadata:
        return self._decode(gb) if max(gb.q_len) == 1 else self._general(gb)

    @staticmethod
    def _general(gb: GroupBatch) -> PagedMetadata:
        B, P, device = len(gb.q_start), gb.page_size, gb.device
        width = max(len(t) for t in gb.page_tables)
        pt = torch.tensor([t + [0] * (width - len(t)) for t in gb.page_tables], dtype=torch.int32)
        prefix = torch.tensor(gb.q_start, dtype=torch.int32)
        q_lens = torch.tensor(gb.q_len, dtype=torch.int32)
        q_loc = torch.cumsum(q_lens, 0, dtype=torch.int32) - q_lens
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(gb.q_start, gb.q_len)])
        seq_of_token = torch.repeat_interleave(torch.arange(B), q_lens.long())
        write_slots = pt[seq_of_token, positions // P].long() * P + positions % P
        seq_lens = prefix + q_lens
        trees = TreeMasks.build(gb.trees, device) if gb.trees is not None and max(gb.q_len) > 1 else None
        up = [to_device(t, device) for t in (write_slots, pt, prefix, q_lens, q_loc, seq_lens)]
        return PagedMetadata(*up, int(seq_lens.max()), P, gb.window, B, max(gb.q_len), trees)

    @staticmethod
    def _decode(gb: GroupBatch) -> PagedMetadata:
        """prepare's metadata when every request brings one token (the common step), computed in Python and sent
        up in two copies, not six: the per-request torch ops of the general form cost ~0.3 ms of host time a step
        at batch 64, time a GPU step under overlap must not wait for. The [B] int32 vectors and the page table are
        slices of one device tensor."""
        B, P = len(gb.q_start), gb.page_size
        width = max(len(t) for t in gb.page_tables)
        # rows of B4 >= B int32s, so that every slice starts 16-byte aligned as a tensor of its own would (Triton
        # compiles a kernel apart for unaligned pointers)
        B4, pad = -(-B // 4) * 4, [0] * (-B % 4)
        ints = [*gb.q_start, *pad, *[1] * B, *pad, *range(B), *pad, *[s + 1 for s in gb.q_start], *pad]
        for t in gb.page_tables:
            ints += t
            ints += [0] * (width - len(t))
        up = device_ints(ints, gb.device, torch.int32)
        prefix, q_lens, q_loc, seq_lens = up[:4 * B4].view(4, B4)[:, :B]  # (prefix, new tokens, row, prefix + new)
        slots = device_ints(gb.decode_slots(), gb.device, torch.long)
        return PagedMetadata(slots, up[4 * B4:].view(B, width), prefix, q_lens, q_loc, seq_lens, max(gb.q_start) + 1,
                             P, gb.window, B, 1)

    def forward(self, layer, q, k, v, meta: PagedMetadata, kv_cache) -> torch.Tensor:
        k_cache, v_cache = kv_cache.layer(layer.layer_id)
        k_cache.index_copy_(0, meta.write_slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.write_slots, v.to(v_cache.dtype))
        if meta.max_q == 1:
            out = paged_decode(q, k_cache, v_cache, meta.page_table, meta.seq_lens, meta.page_size, layer.scale,
                               meta.window, meta.max_seq_len)
        else:
            out = paged_extend(q, k_cache, v_cache, meta.page_table, meta.prefix_lens, meta.q_loc, meta.q_lens,
                               meta.max_q, meta.page_size, layer.scale, meta.window, trees=meta.trees)
        return out.to(q.dtype).reshape(q.shape[0], -1)

    def forward_mla(self, layer, q_nope, q_rope, latent, k_rope, w_uk, w_uv, meta: PagedMetadata,
                    kv_cache) -> torch.Tensor:
        """Absorbed MLA for decode and extend alike (the torch backend up-projects long prefill chunks instead;
        here that would need the latents gathered, which is what this backend avoids)."""
        cache, _ = kv_cache.layer(layer.layer_id)  # [slots, 1, r + dr]
        cache.index_copy_(0, meta.write_slots, torch.cat([latent, k_rope], dim=-1).unsqueeze(1).to(cache.dtype))
        T, r = q_nope.shape[0], layer.kv_lora_rank
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, r]
        if meta.max_q == 1:
            out = paged_mla_decode(q_latent, q_rope, cache, meta.page_table, meta.seq_lens, meta.page_size,
                                   layer.scale, meta.window, meta.max_seq_len)
        else:  # one shared kv "head": keys [c ; k_r], values its first r columns
            q = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)
            out = paged_extend(q, cache, cache, meta.page_table, meta.prefix_lens, meta.q_loc, meta.q_lens,
                               meta.max_q, meta.page_size, layer.scale, meta.window, dv=r, trees=meta.trees)
        out = torch.bmm(out.to(w_uv.dtype).transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        return out.reshape(T, -1).to(q_nope.dtype)
