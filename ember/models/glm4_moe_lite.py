"""GLM-4.7-Flash (`glm4_moe_lite`, Glm4MoeLiteForCausalLM): DeepSeek-V3-style MLA attention + sigmoid-routed MoE.

- Attention: multi-head latent attention (ember/layers/mla_attention.py); queries through a low-rank q_a/q_b pair
  (or a plain q_proj when q_lora_rank is None), keys/values compressed to one latent per token; the KV pool holds
  only [latent ; rotary key] per token and layer. RoPE on the rotary dims only, in DeepSeek's interleaved pair
  layout (rope_interleave); YaRN's mscale_all_dim also scales the softmax (as transformers' yarn_apply_mscale).
- MLP: dense on the leading layers (mlp_layer_types, or first_k_dense_replace), MoE on the others: sigmoid scores,
  experts chosen by score + e_score_correction_bias within the best topk_group of n_group groups, weighted by the
  plain scores (renormalised if norm_topk_prob) times routed_scaling_factor, plus always-on shared experts.
- Nextn (MTP) layers: `model.layers.{num_hidden_layers + i}.*` in the checkpoint (a full decoder layer plus
  enorm / hnorm / eh_proj / shared_head.norm) load into `mtp_layers[i]` for speculative decoding; the plain
  forward never runs them. Their copies of embed_tokens / shared_head.head equal the main model's and are not kept.

Parameter names follow the hub checkpoint (per-expert tensors, experts.{e}.{gate,up,down}_proj); transformers'
stacked save layout (experts.gate_up_proj / experts.down_proj) loads too.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed import tp_all_reduce
from ember.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, VocabParallelEmbedding
from ember.layers.mla_attention import KvBProj, MLAAttention
from ember.layers.mlp import GatedMLP
from ember.layers.moe import MoEExperts, route_sigmoid
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.models.llama import LlamaForCausalLM, LlamaModel
from ember.models.residual import PreNormDecoderLayer

# transformers' Glm4MoeLiteRMSNorm default: the q/kv latent norms do not take config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(config) -> float:
    """1/sqrt(qk head dim), times mscale^2 under YaRN with mscale_all_dim (DeepSeek's long-context scaling)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        factor = params["factor"]
        mscale = 0.1 * params["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1), (x2, x3), ... pairs -> [x0, x2, ... | x1, x3, ...]: interleaved RoPE becomes rotate-half RoPE
    (the reference rotates the pairs and writes them out in this order too; q and k get the same permutation)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def is_sparse_layer(config, layer_id: int) -> bool:
    """MoE or dense MLP. The hub's config says `first_k_dense_replace` (what SGLang and vLLM read); transformers
    reads `mlp_layer_types` and, when the file has none, assumes one dense layer. If the two disagree the
    checkpoint cannot fit both, so that is an error rather than a guess. Nextn layers are MoE."""
    k = getattr(config, "first_k_dense_replace", None)
    types = getattr(config, "mlp_layer_types", None)
    if k is not None and types and list(types) != ["dense"] * k + ["sparse"] * (len(types) - k):
        raise ValueError(f"config: first_k_dense_replace={k} disagrees with mlp_layer_types={list(types)}")
    if types:
        return layer_id >= len(types) or types[layer_id] == "sparse"
    return layer_id >= (k or 0)


class Glm4MoeLiteAttention(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        hidden, H = config.hidden_size, config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_nope_head_dim, self.qk_rope_head_dim = dn, dr
        bias = bool(getattr(config, "attention_bias", False))
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, H * (dn + dr), bias=False)
        else:
            self.q_proj = ColumnParallelLinear(hidden, H * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = KvBProj(H, dn, dv, self.kv_lora_rank)
        self.o_proj = RowParallelLinear(H * dv, hidden, bias=bias)
        self.num_heads = self.kv_b_proj.num_heads  # this rank's
        self.interleaved = bool(getattr(config, "rope_interleave", True))
        self.rotary = [rotary]  # shared, not a submodule of every layer
        self.attn = MLAAttention(self.num_heads, self.kv_lora_rank, dn, dr, dv, mla_softmax_scale(config), layer_id)

    def forward(self, positions, x, batch):
        T = x.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_rope = q.view(T, self.num_heads, -1).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)
        k_rope = k_rope.unsqueeze(1)  # one rotary key shared by every head
        if self.interleaved:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        q_rope, k_rope = self.rotary[0](positions, q_rope, k_rope)
        out = self.attn(q_nope, q_rope, latent, k_rope.squeeze(1), *self.kv_b_proj.split(), batch)
        return self.o_proj(out)


class Glm4MoeLiteRouter(nn.Module):
    """Router logits in float32 (as the reference keeps its gate) and the selection bias."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())

    def _apply(self, fn, recurse=True):
        """Device moves apply; a cast of the whole model (model.to(bfloat16)) leaves these two in float32, as the
        reference keeps them (the bias is ~1e-2 apart between experts: bf16 rounding would change the choice)."""
        before = {name: p.data for name, p in self.named_parameters(recurse=False)}
        super()._apply(fn, recurse)
        for name, p in self.named_parameters(recurse=False):
            old = before[name]
            if old.dtype == torch.float32 and p.dtype != torch.float32 and old.device.type != "meta":
                p.data = old.to(p.device)
        return self


class Glm4MoeLiteMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        E, H = config.n_routed_experts, config.hidden_size
        self.top_k, self.renormalize = config.num_experts_per_tok, bool(config.norm_topk_prob)
        self.scaling = float(config.routed_scaling_factor)
        self.n_group, self.topk_group = config.n_group or 1, config.topk_group or 1
        self.gate = Glm4MoeLiteRouter(E, H)
        n_shared = config.n_shared_experts or 0
        # tensor parallel: routed and shared experts summed first, then one all-reduce
        self.experts = MoEExperts(E, H, config.moe_intermediate_size, reduce_results=not n_shared)
        self.shared_experts = (GatedMLP(H, config.moe_intermediate_size * n_shared, config.hidden_act,
                                        reduce_results=False) if n_shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_sigmoid(self.gate(x), self.top_k, self.gate.e_score_correction_bias, self.renormalize,
                                     self.scaling, self.n_group, self.topk_group)
        y = self.experts(x, weights, ids)
        return y if self.shared_experts is None else tp_all_reduce(y + self.shared_experts(x))


class Glm4MoeLiteDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Glm4MoeLiteAttention(config, layer_id, rotary)
        self.mlp = (Glm4MoeLiteMoE(config) if is_sparse_layer(config, layer_id)
                    else GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Glm4MoeLiteMTPLayer(Glm4MoeLiteDecoderLayer):
    """One nextn (multi-token prediction) layer: from the main model's last hidden state h_t and the embedding of
    token t+1 it predicts token t+2. Loaded and kept for speculative decoding; the plain forward never runs it
    (its attention layer id, num_hidden_layers + i, gets KV rows once a drafter asks for them)."""

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding):
        super().__init__(config, layer_id, rotary)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.enorm, self.hnorm = RMSNorm(H, eps), RMSNorm(H, eps)
        self.eh_proj = ReplicatedLinear(2 * H, H, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(H, eps)

    def forward(self, positions, embeds, hidden, batch):
        """embeds: the next tokens' embeddings [T, H]; hidden: the main model's pre-norm last hidden states [T, H]
        -> normed hidden states for the shared lm_head."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(super().forward(positions, x, batch))


class Glm4MoeLiteModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config, config.qk_rope_head_dim, config.max_position_embeddings)
        n = config.num_hidden_layers
        self.layers = nn.ModuleList(Glm4MoeLiteDecoderLayer(config, i, self.rotary) for i in range(n))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    forward = LlamaModel.forward  # embed, the layers, the final norm


_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


class Glm4MoeLiteForCausalLM(LlamaForCausalLM):
    model_cls = Glm4MoeLiteModel
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config):
        super().__init__(config)
        n = config.num_hidden_layers
        self.mtp_layers = nn.ModuleList(Glm4MoeLiteMTPLayer(config, n + i, self.model.rotary)
                                        for i in range(getattr(config, "num_nextn_predict_layers", 0) or 0))

    def kv_layer_shape(self, layer_id: int) -> tuple[int, int, int]:
        """Per token and layer the pool holds only the latent and the rotary key: (1, r + dr, 0)."""
        return 1, self.config.kv_lora_rank + self.config.qk_rope_head_dim, 0

    def map_weight_name(self, name: str):
        if "rotary_emb" in name or (getattr(self, "tie_word_embeddings", False) and name == "lm_head.weight"):
            return None
        m = _LAYER.match(name)
        n = self.config.num_hidden_layers
        if m and int(m.group(1)) >= n:  # a nextn layer
            i, rest = int(m.group(1)) - n, m.group(2)
            if i >= len(self.mtp_layers) or rest in ("embed_tokens.weight", "shared_head.head.weight"):
                return None  # the main model's embedding and lm_head serve the MTP layer too
            name = f"mtp_layers.{i}.{rest}"
        m = _EXPERT.match(name)
        if m:
            base, expert, proj = m.groups()
            return (f"{base}.w2", "down", int(expert)) if proj == "down" else (f"{base}.w13", proj, int(expert))
        m = _STACKED.match(name)
        if m:
            base, proj = m.groups()
            return (f"{base}.w13", "gate_up", None) if proj == "gate_up_proj" else (f"{base}.w2", "down", None)
        return name
