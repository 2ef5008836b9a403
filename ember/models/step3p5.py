"""Step-3.5 (Step3p5ForCausalLM, hub model_type "step3p5", e.g. Step-3.5-Flash): hybrid sliding-window
attention + mixture of experts.

Every 4th layer attends fully, the others over a sliding window, and the two kinds differ: their own query-head
counts (64 full / 96 sliding on the Flash model, the same KV heads), RoPE (partial rotary with theta 5e6 and the
rope scaling on full layers; full rotary, theta 1e4 on sliding ones). Each attention output is gated per head by
sigmoid(g_proj(x)). All RMSNorms (layers, per-head q/k, final) are zero-centred: weights are offsets from one.
The first layers have a dense SwiGLU MLP, the rest a MoE block: sigmoid router, top-k chosen by score +
router_bias, weights renormalised and scaled by moe_router_scaling_factor, plus one always-on shared expert; the
SwiGLUs clamp per layer (swiglu_limits for the routed experts, swiglu_limits_shared for the shared / dense MLP).

Config: transformers' Step3p7TextConfig reads the hub's config.json (attention_other_setting, moe_layers_enum,
per-layer rope_theta / partial_rotary_factors, rope_scaling on yarn_only_types, MTP-padded per-layer lists).
Weights: the hub's names (`moe.gate`, `moe.router_bias`, stacked [E, ...] `moe.{gate,up,down}_proj`,
`share_expert.*`, `g_proj`). The MTP layers appended after the decoder (model.layers.<num_hidden_layers + i>, i <
num_nextn_predict_layers) are loaded into `mtp_layers` under their hub names, for speculative decoding; the plain
forward never runs them.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed import tp_all_reduce
from ember.layers.attention import PagedAttention
from ember.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear, \
    VocabParallelEmbedding
from ember.layers.mlp import GatedMLP
from ember.layers.moe import MoEExperts, RouterGate, route_sigmoid
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.models.llama import LlamaForCausalLM, head_dim_of
from ember.models.residual import PreNormDecoderLayer, run_layers

SLIDING, FULL = "sliding_attention", "full_attention"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_EXPERTS = re.compile(r"^(.*\.moe)\.(gate_proj|up_proj|down_proj)\.weight$")  # stacked [E, rows, cols]
_EXPERT_SHARD = {"gate_proj": ("w13", "gate"), "up_proj": ("w13", "up"), "down_proj": ("w2", "down")}


def _limit(limits, i: int) -> float | None:
    """A per-layer SwiGLU clamp; 0, None or no entry (MTP layers: the config trims the lists) = no clamp."""
    if not limits or i >= len(limits) or not limits[i]:
        return None
    return float(limits[i])


def query_heads(config, layer_type: str) -> int:
    """Query heads of a layer type. transformers' Step3p7TextConfig keeps the sliding layers' count apart
    (num_sliding_attention_heads, from the hub's attention_other_setting) and guards the global num_attention_heads
    as a per-layer attribute; it is the full layers' count, read here without that guard."""
    if layer_type == SLIDING and getattr(config, "num_sliding_attention_heads", None):
        return config.num_sliding_attention_heads
    read_global = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return read_global("num_attention_heads") if read_global else config.num_attention_heads


class Step3p5MoE(nn.Module):
    """Router + routed experts (hub: `moe.gate`, `moe.router_bias`, stacked `moe.{gate,up,down}_proj`)."""

    def __init__(self, config, layer_id: int):
        super().__init__()
        E, H = config.n_routed_experts, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.scaling = float(getattr(config, "moe_router_scaling_factor", 1.0))
        self.gate = RouterGate(H, E)
        self.router_bias = (nn.Parameter(torch.zeros(E), requires_grad=False)
                            if getattr(config, "use_moe_router_bias", True) else None)
        self.experts = MoEExperts(E, H, config.moe_intermediate_size, "silu",  # reduced with the shared expert
                                  swiglu_limit=_limit(config.swiglu_limits, layer_id), reduce_results=False)

    def _apply(self, fn, recurse=True):
        """`model.to(bfloat16)` leaves router_bias in float32, as the hub stores it: expert choice compares
        score + bias across 288 experts, where bf16's 8-bit mantissa would reorder close ones."""
        bias = self.router_bias.data if self.router_bias is not None else None
        super()._apply(fn, recurse)
        if bias is not None and bias.dtype == torch.float32 and self.router_bias.dtype != torch.float32:
            self.router_bias.data = bias.to(self.router_bias.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # router logits in float32 (the hub config's need_fp32_gate); the same as the reference in fp32
        logits = F.linear(x.float(), self.gate.weight.float())
        weights, ids = route_sigmoid(logits, self.top_k, self.router_bias, renormalize=True, scaling=self.scaling)
        return self.experts(x, weights, ids)


class Step3p5Attention(nn.Module):
    """GQA with this layer type's query-head count, per-head (1 + w) q/k norms, (partial) rotary, and a per-head
    sigmoid gate on the output."""

    def __init__(self, config, layer_id: int, layer_type: str, rotary: RotaryEmbedding):
        super().__init__()
        hidden, D = config.hidden_size, head_dim_of(config)
        heads = query_heads(config, layer_type)
        self.qkv_proj = QKVParallelLinear(hidden, D, heads, config.num_key_value_heads, bias=False)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, D
        self.split_sizes = self.qkv_proj.split_sizes
        self.o_proj = RowParallelLinear(heads * D, hidden, bias=False)
        # one gate logit per head, sharded with the heads
        self.g_proj = (ColumnParallelLinear(hidden, heads, bias=False)
                       if getattr(config, "use_head_wise_attn_gate", True) else None)
        self.q_norm = RMSNorm(D, config.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(D, config.rms_norm_eps, unit_offset=True)
        self.rotary = [rotary]  # a list: shared, not registered as a submodule of every layer
        scale = (getattr(config, "query_pre_attn_scalar", None) or D) ** -0.5
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, D, scale, layer_id,
                                   "swa" if layer_type == SLIDING else "full")

    def forward(self, positions, x, batch):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = self.q_norm(q.reshape(T, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(T, self.num_kv_heads, self.head_dim))
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary[0](positions, q, k)
        out = self.attn(q, k, v, batch)  # [T, heads * D]
        if self.g_proj is not None:
            gate = torch.sigmoid(self.g_proj(x)).unsqueeze(-1)  # [T, heads, 1]
            out = (out.view(T, self.num_heads, self.head_dim) * gate).view(T, -1)
        return self.o_proj(out)


class Step3p5DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config, layer_id: int, layer_type: str, sparse: bool, rotary: RotaryEmbedding):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Step3p5Attention(config, layer_id, layer_type, rotary)
        shared_limit = _limit(config.swiglu_limits_shared, layer_id)  # the dense MLP uses it too (as the reference)
        self.sparse = sparse
        if sparse:  # the hub keeps both at the layer level: `moe.*` and `share_expert.*`
            self.moe = Step3p5MoE(config, layer_id)
            self.share_expert = GatedMLP(H, config.share_expert_dim, reduce_results=False, limit=shared_limit)
        else:
            self.mlp = GatedMLP(H, config.intermediate_size, limit=shared_limit)
        self.input_layernorm = RMSNorm(H, eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(H, eps, unit_offset=True)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return tp_all_reduce(self.moe(x) + self.share_expert(x))  # one all-reduce for both (tp > 1)
        return self.mlp(x)


class Step3p5SharedHead(nn.Module):
    """An MTP layer's own output head (hub: `transformer.shared_head.{norm,output}`)."""

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.output = ReplicatedLinear(config.hidden_size, config.vocab_size, bias=False)


class Step3p5MTPLayer(Step3p5DecoderLayer):
    """One multi-token-prediction layer: a decoder layer fed eh_proj([enorm(embedding), hnorm(hidden)]), with its
    own head. Loaded and kept for speculative decoding; the plain forward does not run it."""

    def __init__(self, config, layer_id: int, layer_type: str, sparse: bool, rotary: RotaryEmbedding):
        super().__init__(config, layer_id, layer_type, sparse, rotary)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(H, eps, unit_offset=True)
        self.hnorm = RMSNorm(H, eps, unit_offset=True)
        self.eh_proj = ReplicatedLinear(2 * H, H, bias=False)
        self.transformer = nn.Module()
        self.transformer.shared_head = Step3p5SharedHead(config)


class Step3p5Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        n = config.num_hidden_layers
        self.layer_types = list(config.layer_types)[:n]
        mlp_types = list(getattr(config, "mlp_layer_types", None) or ["dense"] * 3 + ["sparse"] * (n - 3))[:n]
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        D, max_pos = head_dim_of(config), config.max_position_embeddings
        kinds = set(self.layer_types) | set(getattr(config, "mtp_layer_types", None) or [])
        # one table per layer type: each type has its own theta, rotary fraction and scaling
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(config, D, max_pos, layer_type=t) for t in sorted(kinds)})
        self.layers = nn.ModuleList(
            Step3p5DecoderLayer(config, i, t, mlp_types[i] == "sparse", self.rotary[t])
            for i, t in enumerate(self.layer_types))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)

    def forward(self, batch):
        x = self.embed_tokens(batch.input_ids)
        return run_layers(self.layers, batch.positions, x, batch, self.norm)


class Step3p5ForCausalLM(LlamaForCausalLM):
    model_cls = Step3p5Model

    def __init__(self, config):
        super().__init__(config)
        n, k = config.num_hidden_layers, int(getattr(config, "num_nextn_predict_layers", 0) or 0)
        mtp_types = list(getattr(config, "mtp_layer_types", None) or [FULL] * k)
        mtp_mlp = list(getattr(config, "mtp_mlp_layer_types", None) or ["dense"] * k)
        self.mtp_layers = nn.ModuleList(
            Step3p5MTPLayer(config, n + i, mtp_types[i], mtp_mlp[i] == "sparse", self.model.rotary[mtp_types[i]])
            for i in range(k))

    # --- KV layout: full-attention layers in "full", sliding-window layers in "swa" (the MTP layers hold none)
    def kv_groups(self):
        groups = {"full": [], "swa": []}
        for i, t in enumerate(self.model.layer_types):
            groups["swa" if t == SLIDING else "full"].append(i)
        return {g: layers for g, layers in groups.items() if layers}

    def sliding_window(self):
        return self.config.sliding_window if SLIDING in self.model.layer_types else None

    def map_weight_name(self, name: str):
        name = super().map_weight_name(name)
        if name is None:
            return None
        m = _LAYER.match(name)
        if m and int(m[1]) >= self.config.num_hidden_layers:  # an MTP layer: model.layers.<n + i>.* -> mtp_layers.i.*
            name = f"mtp_layers.{int(m[1]) - self.config.num_hidden_layers}.{m[2]}"
        m = _EXPERTS.match(name)
        if m:  # all experts' gate / up / down in one stacked tensor
            param, shard = _EXPERT_SHARD[m[2]]
            return f"{m[1]}.experts.{param}", shard, None
        return name
