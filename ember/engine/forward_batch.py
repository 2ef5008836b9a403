"""One model step's inputs as tensors on the device: what ModelRunner builds from a scheduled batch (and the CUDA
graph runner keeps in static buffers), and what every model's forward reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.attention.base import AttentionBackend
from ember.engine.kv_pool import KVCache


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: dict[str, object]  # per KV group: attn_backend's metadata (the torch backend's: AttentionMetadata)
    kv_cache: KVCache
    logit_index: torch.Tensor  # [B] index (into T) of each request's last token
    mm: object = None  # images/video: ember.multimodal.engine_glue.BatchMultimodal
    attn_backend: AttentionBackend | None = None  # runs every attention layer on `attn`
    trees: list | None = None  # per request its speculative draft tree (ember/speculative/tree.py TreeSpec) or None
    fused: bool = False  # run by the fused decode step (ModelRunner.forward decides: FusedDecoder.takes)
