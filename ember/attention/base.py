"""The attention-backend interface (mini-sglang's shape): `prepare` turns one batch, as one KV group sees it,
into that backend's metadata once per step; `forward` / `forward_mla` then run every layer of the group on it.

A backend holds no per-layer state: the layers (ember/layers/attention.py, mla_attention.py) keep their shapes
and hand the backend themselves, the new q/k/v, the group's metadata and the KV pool. The KV layout is the
pool's (ember/engine/kv_pool.py): slot = page * page_size + offset, [slots, kv_heads, dim] per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupBatch:
    """What every backend's `prepare` gets: one batch as one KV group (full or sliding-window) sees it."""
    q_start: list[int]  # per request: tokens already in the cache (the position of its first new token)
    q_len: list[int]  # per request: new tokens this step (1 when decoding)
    page_tables: list[list[int]]  # per request: this group's page ids, indexed by position // page_size
    page_size: int
    window: int | None  # sliding-window layers: a query attends to the last `window` positions (itself included)
    device: torch.device | str
    # speculative tree drafts (ember/speculative/tree.py): per request a TreeSpec or None; a tree's slots hold
    # nodes at their own positions, each seeing only its ancestors among them
    trees: list | None = None

    def decode_slots(self) -> list[int]:
        """A decode step's KV slot per request: where its one new token (at position q_start) is written."""
        P = self.page_size
        return [t[p // P] * P + p % P for t, p in zip(self.page_tables, self.q_start)]


class AttentionBackend:
    """Base class; see the module docstring. `name` is the --attention-backend value."""
    name = ""

    def prepare(self, gb: GroupBatch):
        """Metadata for one KV group of one batch, shared by the group's layers."""
        raise NotImplementedError

    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta, kv_cache) -> torch.Tensor:
        """One PagedAttention layer: writes k/v into the pool, attends. q: [T, H, D]; k, v: [T, Hkv, D]
        -> [T, H * D]. `layer` has num_heads, num_kv_heads, head_dim, scale, layer_id."""
        raise NotImplementedError

    def forward_mla(self, layer, q_nope, q_rope, latent, k_rope, w_uk, w_uv, meta, kv_cache) -> torch.Tensor:
        """One MLAAttention layer (arguments as MLAAttention.forward): writes [latent ; k_rope] into the pool,
        attends -> [T, H * dv]."""
        raise NotImplementedError
