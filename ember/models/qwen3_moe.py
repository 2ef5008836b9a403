"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder): Qwen3's attention (per-head q/k RMSNorm) with a
mixture-of-experts MLP: softmax over the experts, top-k, renormalised when `norm_topk_prob`.

Layers in `mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a dense MLP (`intermediate_size`);
the others route among `num_experts` experts of width `moe_intermediate_size`. No shared expert.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ember.layers.moe import MoEExperts, RouterGate, route_softmax
from ember.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from ember.models.qwen3 import Qwen3Attention

# Checkpoint layouts of the experts, -> (our parameter, shard, expert or None for a stacked [E, ...] tensor):
# the hub's per-expert matrices, and transformers' in-memory stacked ones (gate_up_proj [E, 2I, H], down_proj).
_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_SHARD = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up"}


def expert_param_of(module: str, shard: str) -> str:
    return f"{module}.{'w2' if shard == 'down' else 'w13'}"


def map_expert_name(name: str, per_expert=_PER_EXPERT, stacked=_STACKED, shards=_SHARD):
    """A checkpoint expert tensor's name -> (parameter, shard_id[, expert_id]); None if it is not one."""
    if m := per_expert.match(name):
        shard = shards[m.group(3)]
        return expert_param_of(m.group(1), shard), shard, int(m.group(2))
    if m := stacked.match(name):
        shard = shards[m.group(2)]
        return expert_param_of(m.group(1), shard), shard
    return None


def is_sparse_layer(config, layer_id: int) -> bool:
    """transformers' rule: not in mlp_only_layers, and on the decoder_sparse_step stride."""
    return (layer_id not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_id + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class Qwen3MoeSparseBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.renormalize = config.num_experts_per_tok, bool(config.norm_topk_prob)
        self.gate = RouterGate(config.hidden_size, config.num_experts)
        self.experts = MoEExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                  config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_softmax(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention

    def make_mlp(self, config, layer_id: int) -> nn.Module:
        if is_sparse_layer(config, layer_id):
            return Qwen3MoeSparseBlock(config)
        return super().make_mlp(config, layer_id)


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3MoeModel

    def __init__(self, config):
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen3-MoE with use_sliding_window is not supported")
        super().__init__(config)

    def map_weight_name(self, name: str):
        name = super().map_weight_name(name)
        return None if name is None else (map_expert_name(name) or name)
