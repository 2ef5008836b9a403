"""Attention over the paged KV cache: the layer (its shapes, its KV group) and the torch backend's metadata.

Each forward step handles a batch of requests, each contributing `q_len` new tokens (a prefill chunk or a
single decode token). The layer hands them to the batch's attention backend (ember/attention): it writes the
new keys/values into their slots of the page pool and attends over each request's cached keys. The torch
backend (ember/attention/torch_sdpa.py) gathers keys into a padded [B, max_k] block described by
`AttentionMetadata` and runs one batched SDPA call; a sliding-window layer gathers (and masks) only the last
`window` positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AttentionMetadata:
    """Index tensors for one KV-cache group (full or sliding-window layers), shared by its layers."""
    write_slots: torch.Tensor  # [T] slot of each new token
    kv_slots: torch.Tensor  # [B, max_k] slots of the keys each request attends to (padding -> slot 0)
    mask: torch.Tensor | None  # [B, 1, max_q, max_k] bool, True = attend; None: attend to every key
    q_pad_index: torch.Tensor  # [T] position of each new token in the flattened [B * max_q] layout
    kv_lens: torch.Tensor  # [B] keys each request attends to (the first kv_lens[b] of its kv_slots row)
    batch_size: int
    max_q: int


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 layer_id: int, group: str = "full"):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.layer_id = layer_id
        self.group = group  # which KV pool (and metadata) this layer uses

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H * D], by the batch's attention backend."""
        return batch.attn_backend.forward(self, q, k, v, batch.attn[self.group], batch.kv_cache)
