"""Llama (SmolLM2, Llama 2/3): the decoder the other architectures build on.

Parameter names match the Hugging Face checkpoints, so weights load by name.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ember.layers.attention import PagedAttention
from ember.layers.linear import ParallelLMHead, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from ember.layers.mlp import GatedMLP
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.loader.weight_loading import load_weights
from ember.models.residual import PreNormDecoderLayer, run_layers

logger = logging.getLogger("ember.models")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    qkv_bias = False
    qk_norm = False
    norm_unit_offset = False

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, group: str = "full",
                 scale: float | None = None):
        super().__init__()
        hidden, D = config.hidden_size, head_dim_of(config)
        bias = getattr(config, "attention_bias", False) or self.qkv_bias
        # q, k and v in one GEMM (this rank's heads); checkpoints load into its three slices
        self.qkv_proj = QKVParallelLinear(hidden, D, config.num_attention_heads, config.num_key_value_heads, bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, D
        self.split_sizes = self.qkv_proj.split_sizes
        self.o_proj = RowParallelLinear(config.num_attention_heads * D, hidden,
                                        bias=getattr(config, "attention_bias", False),
                                        input_shard=self.qkv_proj.o_proj_shard)  # this rank's heads' columns
        if self.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps, self.norm_unit_offset)
            self.k_norm = RMSNorm(D, config.rms_norm_eps, self.norm_unit_offset)
        self.rotary = [rotary]  # a list: shared, not registered as a submodule of every layer
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, D, scale or D ** -0.5, layer_id, group)

    def forward(self, positions, x, batch):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary[0](positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))


class LlamaDecoderLayer(PreNormDecoderLayer):
    attention_cls = LlamaAttention

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, rotary)
        self.mlp = self.make_mlp(config, layer_id)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config, layer_id: int) -> nn.Module:
        """The feed-forward block of this layer (MoE models return their sparse block here)."""
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(self.layer_cls(config, i, self.rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, batch):
        x = self.embed_tokens(batch.input_ids)
        return run_layers(self.layers, batch.positions, x, batch, self.norm)


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel
    # checkpoint sub-modules that are one shard of a fused layer of ours
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- KV layout: which layers use which KV pool ("full" or "swa"), and the window of each pool
    def kv_groups(self) -> dict[str, list[int]]:
        return {"full": list(range(self.config.num_hidden_layers))}

    def sliding_window(self) -> int | None:
        return None

    @torch.inference_mode()
    def forward(self, batch) -> torch.Tensor:
        """Returns logits for the positions in batch.logit_index: [len(logit_index), vocab]."""
        hidden = self.model(batch)
        return self.compute_logits(hidden.index_select(0, batch.logit_index))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def map_weight_name(self, name: str) -> str | None:
        """HF checkpoint name -> our parameter name (None = skip)."""
        name = name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")
        if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        return name

    def load_weights(self, weights, on_loaded=None) -> None:
        if self.tie_word_embeddings:  # re-tie: moving off the meta device may have split them
            self.lm_head.weight = self.model.embed_tokens.weight
        load_weights(self, weights, on_loaded)
