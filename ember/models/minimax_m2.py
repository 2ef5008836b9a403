"""MiniMax-M2 (MiniMax-M2, M2.1): every layer a mixture of experts, no shared expert, no dense layers.

Attention: RMSNorm over the *whole* q and k projections (all heads at once, not per head), then partial rotary
(`rotary_dim` of each head turns, the rest passes through). Router: sigmoid scores; the top-k experts are
chosen by score + `e_score_correction_bias` and weighted by the plain scores, renormalised (no scaling factor).
Hub checkpoints name the MoE block `block_sparse_moe` and the experts' matrices w1 (gate), w3 (up), w2 (down).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ember.layers.moe import MoEExperts, RouterGate, route_sigmoid
from ember.layers.norm import ShardedRMSNorm
from ember.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from ember.models.qwen3_moe import map_expert_name

_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_SHARD = {"w1": "gate", "w3": "up", "w2": "down", "gate_up_proj": "gate_up", "down_proj": "down"}


class MiniMaxM2Attention(LlamaAttention):
    def __init__(self, config, layer_id: int, rotary):
        super().__init__(config, layer_id, rotary)
        D, qkv, eps = self.head_dim, self.qkv_proj, config.rms_norm_eps
        # over the whole projection: [T, heads * D] normalised as one vector per token (tensor parallel: this
        # rank's heads, with the sum of squares all-reduced)
        self.q_norm = ShardedRMSNorm(config.num_attention_heads * D, qkv.q_start * D, qkv.q_size, eps)
        self.k_norm = ShardedRMSNorm(config.num_key_value_heads * D, qkv.kv_start * D, qkv.kv_size, eps,
                                     qkv.kv_replicas)

    def forward(self, positions, x, batch):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = self.q_norm(q).reshape(T, self.num_heads, self.head_dim)
        k = self.k_norm(k).reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary[0](positions, q, k)  # partial: the rotary table covers rotary_dim of each head
        return self.o_proj(self.attn(q, k, v, batch))


class MiniMaxM2SparseBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        E = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.gate = RouterGate(config.hidden_size, E)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E), requires_grad=False)
        self.experts = MoEExperts(E, config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_sigmoid(self.gate(x), self.top_k, self.e_score_correction_bias, renormalize=True)
        return self.experts(x, weights, ids)


class MiniMaxM2DecoderLayer(LlamaDecoderLayer):
    attention_cls = MiniMaxM2Attention

    def make_mlp(self, config, layer_id: int) -> nn.Module:
        return MiniMaxM2SparseBlock(config)


class MiniMaxM2Model(LlamaModel):
    layer_cls = MiniMaxM2DecoderLayer


class MiniMaxM2ForCausalLM(LlamaForCausalLM):
    model_cls = MiniMaxM2Model

    def map_weight_name(self, name: str):
        name = super().map_weight_name(name)
        if name is None:
            return None
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return map_expert_name(name, _PER_EXPERT, _STACKED, _SHARD) or name
