"""The CPU path (and any device's fallback): gather each request's keys into a padded [B, max_k] block with
index_select and attend with one batched torch SDPA call, under a boolean mask for padding, causality and
sliding windows. Prefill, chunked prefill, decode and mixed batches share it.

Its metadata is `AttentionMetadata` (ember/layers/attention.py); `mask` is the only thing SDPA sees about who
attends to whom, so another mask (a speculative draft tree's) can be put there by whoever builds the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.attention.base import AttentionBackend, GroupBatch
from ember.layers.attention import AttentionMetadata
from ember.host_to_device import to_device


class TorchSDPABackend(AttentionBackend):
    name = "torch"

    # ------------------------------------------------------------------ metadata
    def prepare(self, gb: GroupBatch) -> AttentionMetadata:
        if max(gb.q_len) == 1 and gb.window is None and gb.trees is None:
            return self._decode(gb)
        return self._general(gb)

    @staticmethod
    def _decode(gb: GroupBatch) -> AttentionMetadata:
        """What _general builds when every request brings one token and every key is in view (the common step),
        with a few torch ops instead of ~30: at batch 1 their dispatch cost was ~0.5 ms."""
        P, B, device = gb.page_size, len(gb.q_start), gb.device
        pos, tables = gb.q_start, gb.page_tables
        width = max(len(t) for t in tables)
        pt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)  # [B, width]
        max_k = max(pos) + 1
        kv_slots = (pt.unsqueeze(2) * P + torch.arange(P)).reshape(B, -1)[:, :max_k]
        k_len = torch.tensor([p + 1 for p in pos])
        mask = None
        if min(pos) + 1 < max_k:  # unequal lengths: padding keys read slot 0 and are masked out
            valid = torch.arange(max_k).unsqueeze(0) < k_len.unsqueeze(1)
            kv_slots = torch.where(valid, kv_slots, torch.zeros_like(kv_slots))
            mask = to_device(valid.view(B, 1, 1, max_k), device)
        write_slots = torch.tensor(gb.decode_slots())
        rows = torch.arange(B, device=device)
        return AttentionMetadata(write_slots=to_device(write_slots, device),
                                 kv_slots=to_device(kv_slots.contiguous(), device), mask=mask, q_pad_index=rows,
                                 kv_lens=to_device(k_len, device), batch_size=B, max_q=1)

    @staticmethod
    def _general(gb: GroupBatch) -> AttentionMetadata:
        P, B, device, window = gb.page_size, len(gb.q_start), gb.device, gb.window
        q_start = torch.tensor(gb.q_start)
        q_len = torch.tensor(gb.q_len)
        kv_end = q_start + q_len
        max_q = int(q_len.max())
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(gb.q_start, gb.q_len)])
        seq_of_token = torch.repeat_interleave(torch.arange(B), q_len)
        offset_in_seq = positions - q_start[seq_of_token]
        q_pad_index = seq_of_token * max_q + offset_in_seq
        ar_q = torch.arange(max_q).unsqueeze(0)
        q_pos = q_start.unsqueeze(1) + ar_q  # [B, max_q]
        q_valid = ar_q < q_len.unsqueeze(1)
        trees = gb.trees
        if trees is not None:  # tree nodes: causal order and windows by their own positions, not their slots
            from ember.speculative.tree import apply_tree_mask, to_logical
            q_lpos = torch.stack([to_logical(t, q_pos[b]) for b, t in enumerate(trees)])
            q_first = torch.where(q_valid, q_lpos, q_lpos.max()).min(dim=1).values
        else:
            q_lpos, q_first = q_pos, q_start

        k_start = (q_first - window + 1).clamp(min=0) if window else torch.zeros(B, dtype=torch.long)
        k_len = kv_end - k_start
        max_k = int(k_len.max())
        ar_k = torch.arange(max_k).unsqueeze(0)
        k_pos = k_start.unsqueeze(1) + ar_k  # [B, max_k]
        k_valid = ar_k < k_len.unsqueeze(1)
        width = max(len(t) for t in gb.page_tables)
        pt = torch.zeros(B, width, dtype=torch.long)
        for i, t in enumerate(gb.page_tables):
            pt[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        k_page = (k_pos // P).clamp(max=width - 1)
        kv_slots = torch.gather(pt, 1, k_page) * P + k_pos % P
        kv_slots = torch.where(k_valid, kv_slots, torch.zeros_like(kv_slots))
        write_slots = pt[seq_of_token, positions // P] * P + positions % P
        k_lpos = k_pos if trees is None else torch.stack([to_logical(t, k_pos[b]) for b, t in enumerate(trees)])
        mask = k_valid.unsqueeze(1) & (k_lpos.unsqueeze(1) <= q_lpos.unsqueeze(2))
        if window:
            mask &= (q_lpos.unsqueeze(2) - k_lpos.unsqueeze(1)) < window
        if trees is not None:
            apply_tree_mask(mask, trees, q_start, q_len, k_start)
        mask[:, :, 0] |= ~q_valid  # padding query rows attend to something (ignored later)
        if max_q == 1 and bool(k_valid.all()) and trees is None:
            mask = None  # decode without padding: every gathered key is visible, skip the mask
        return AttentionMetadata(
            write_slots=to_device(write_slots, device), kv_slots=to_device(kv_slots, device),
            mask=None if mask is None else to_device(mask.unsqueeze(1), device),
            q_pad_index=to_device(q_pad_index, device), kv_lens=to_device(k_len, device), batch_size=B, max_q=max_q)

    # ------------------------------------------------------------------ multi-head (GQA) attention
    def forward(self, layer, q, k, v, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
        k_cache, v_cache = kv_cache.layer(layer.layer_id)
        # index_copy_/index_select, not `cache[slots]`: advanced indexing takes ~30x longer on CPU here
        # (0.9 ms against 26 us for one decode gather), and it runs twice per layer per step.
        k_cache.index_copy_(0, meta.write_slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.write_slots, v.to(v_cache.dtype))

        B, max_q = meta.batch_size, meta.max_q
        slots = meta.kv_slots.reshape(-1)
        gathered = (B, meta.kv_slots.shape[1], Hkv, D)
        keys = k_cache.index_select(0, slots).view(gathered).transpose(1, 2)  # [B, Hkv, max_k, D]
        values = v_cache.index_select(0, slots).view(gathered).transpose(1, 2)
        if max_q == 1 and q.shape[0] == B:  # pure decode: no padding needed
            queries = q.unsqueeze(2)  # [B, H, 1, D]
        else:
            padded = q.new_zeros(B * max_q, H, D)
            padded[meta.q_pad_index] = q
            queries = padded.view(B, max_q, H, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=meta.mask, scale=layer.scale,
            enable_gqa=H != Hkv)
        out = out.transpose(1, 2).reshape(B * max_q, H * D)
        if max_q == 1 and q.shape[0] == B:
            return out
        return out[meta.q_pad_index]

    # ------------------------------------------------------------------ multi-head latent attention
    def forward_mla(self, layer, q_nope, q_rope, latent, k_rope, w_uk, w_uv, meta: AttentionMetadata,
                    kv_cache) -> torch.Tensor:
        cache, _ = kv_cache.layer(layer.layer_id)  # [slots, 1, r + dr]
        cache.index_copy_(0, meta.write_slots, torch.cat([latent, k_rope], dim=-1).unsqueeze(1).to(cache.dtype))
        B, max_k, T = meta.batch_size, meta.kv_slots.shape[1], q_nope.shape[0]
        rows = cache.index_select(0, meta.kv_slots.reshape(-1)).view(B, max_k, -1).to(q_nope.dtype)
        if meta.max_q > 1 and T >= layer.up_project_from * B:
            return _mla_up_projected(layer, q_nope, q_rope, rows, w_uk, w_uv, meta)
        return _mla_absorbed(layer, q_nope, q_rope, rows, w_uk, w_uv, meta)


def _mla_absorbed(layer, q_nope, q_rope, rows, w_uk, w_uv, meta: AttentionMetadata) -> torch.Tensor:
    """Multi-query attention over the latent rows: keys [c ; k_r], values c; W_UK / W_UV applied per head to
    the queries and the outputs."""
    H, r = layer.num_heads, layer.kv_lora_rank
    T = q_nope.shape[0]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, r]
    q = torch.cat([q_latent, q_rope.to(q_latent.dtype)], dim=-1)  # [T, H, r + dr]
    B, max_q, max_k = meta.batch_size, meta.max_q, rows.shape[1]
    D = q.shape[-1]
    keys = rows.view(B, 1, max_k, D)
    decode = max_q == 1 and T == B
    mask = meta.mask  # [B, 1, max_q, max_k] or None
    if decode:  # one query row per request: the H heads are the rows, the mask broadcasts over them
        queries = q.view(B, 1, H, D)
    else:
        padded = q.new_zeros(B * max_q, H, D)
        padded[meta.q_pad_index] = q
        queries = padded.view(B, 1, max_q * H, D)
        if mask is not None:  # each (query, head) row keeps its query's mask
            mask = mask.unsqueeze(3).expand(B, 1, max_q, H, max_k).reshape(B, 1, max_q * H, max_k)
    out = F.scaled_dot_product_attention(queries, keys, keys[..., :r], attn_mask=mask, scale=layer.scale)
    out = out.view(B * max_q, H, r)
    if not decode:
        out = out[meta.q_pad_index]
    # the value up-projection, per head: [H, T, r] @ [H, r, dv]
    out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
    return out.reshape(T, H * layer.v_head_dim)


def _mla_up_projected(layer, q_nope, q_rope, rows, w_uk, w_uv, meta: AttentionMetadata) -> torch.Tensor:
    """Long prefill chunks: every gathered latent up-projected to per-head keys and values, then ordinary
    multi-head attention with head dims dn + dr (q, k) and dv (v)."""
    H, r, dn, dr, dv = (layer.num_heads, layer.kv_lora_rank, layer.qk_nope_head_dim, layer.qk_rope_head_dim,
                        layer.v_head_dim)
    B, max_q, max_k = meta.batch_size, meta.max_q, rows.shape[1]
    c, k_r = rows[..., :r], rows[..., r:]
    k_nope = F.linear(c, w_uk.reshape(H * dn, r)).view(B, max_k, H, dn)
    values = F.linear(c, w_uv.reshape(H * dv, r)).view(B, max_k, H, dv).transpose(1, 2)
    keys = torch.cat([k_nope, k_r.unsqueeze(2).expand(B, max_k, H, dr)], dim=-1).transpose(1, 2)
    q = torch.cat([q_nope, q_rope.to(q_nope.dtype)], dim=-1)  # [T, H, dn + dr]
    padded = q.new_zeros(B * max_q, H, dn + dr)
    padded[meta.q_pad_index] = q
    queries = padded.view(B, max_q, H, dn + dr).transpose(1, 2)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=layer.scale)
    return out.transpose(1, 2).reshape(B * max_q, H * dv)[meta.q_pad_index]
