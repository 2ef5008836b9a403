"""The pre-norm residual stream carried between decoder layers as (x, delta), as vLLM's layers pass (hidden,
residual): a layer returns the stream before its feed-forward output is added, and that output; the next layer's
input norm, or the model's final norm, adds it (`RMSNorm.add_norm`). With the Triton layers on a GPU
(ember/layers/triton_layers.py) each add and the norm after it are one kernel instead of two. On the torch path the
same operations run in the same order as `x + f(norm(x))` layer by layer, so the results are unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class PreNormDecoderLayer(nn.Module):
    """x + attention(norm(x)), then + feed_forward(norm(x)). Subclasses hold input_layernorm,
    post_attention_layernorm (the norm before the feed-forward), self_attn and mlp (or their own feed_forward)."""

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)

    def forward_residual(self, positions, x, delta, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the stream before this layer's feed-forward output is added, that output), given the stream and the
        previous layer's output not yet added to it (None before the first layer)."""
        x, h = self.input_layernorm.add_norm(x, delta)
        x, h = self.post_attention_layernorm.add_norm(x, self.self_attn(positions, h, batch))
        return x, self.feed_forward(h)

    def forward(self, positions, x, batch) -> torch.Tensor:
        """The layer's output on its own (MTP layers, tests)."""
        x, delta = self.forward_residual(positions, x, None, batch)
        return x + delta


def run_layers(layers, positions, x: torch.Tensor, batch, final_norm=None) -> torch.Tensor:
    """The decoder layers over the embeddings x, then `final_norm` (which adds the last layer's output: one kernel
    with it on the GPU); without one, the last layer's output as it is (the pre-norm hidden states)."""
    delta = None
    for layer in layers:
        x, delta = layer.forward_residual(positions, x, delta, batch)
    if final_norm is not None:
        return final_norm.add_norm(x, delta)[1]
    return x if delta is None else x + delta
