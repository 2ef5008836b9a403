"""Llama (SmolLM2, Llama 2/3): the decoder the other architectures build on.

Parameter names match the Hugging Face checkpoints, so weights load by name.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ember.layers.attention import PagedAttention
from ember.layers.mlp import GatedMLP
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding

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
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, D)
        bias = getattr(config, "attention_bias", False) or self.qkv_bias
        q_size, kv_size = self.num_heads * D, self.num_kv_heads * D
        # q, k and v in one GEMM; checkpoints load into its three slices
        self.qkv_proj = nn.Linear(hidden, q_size + 2 * kv_size, bias=bias)
        self.qkv_proj.shards = {"q_proj": (0, q_size), "k_proj": (q_size, kv_size),
                                "v_proj": (q_size + kv_size, kv_size)}
        self.split_sizes = [q_size, kv_size, kv_size]
        self.o_proj = nn.Linear(self.num_heads * D, hidden, bias=getattr(config, "attention_bias", False))
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


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, rotary)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, batch):
        x = x + self.self_attn(positions, self.input_layernorm(x), batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(self.layer_cls(config, i, self.rotary) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, batch):
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(batch.positions, x, batch)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        if "rotary_emb" in name:
            return None
        return name

    def load_weights(self, weights) -> None:
        if self.tie_word_embeddings:  # re-tie: moving off the meta device may have split them
            self.lm_head.weight = self.model.embed_tokens.weight
        params = dict(self.named_parameters(remove_duplicate=False))
        # "x.q_proj" -> ("x.qkv_proj", start, size): checkpoint tensors that fill a slice of a fused layer
        fused = {f"{name.rpartition('.')[0]}.{shard}".lstrip("."): (name, start, size)
                 for name, m in self.named_modules() if hasattr(m, "shards")
                 for shard, (start, size) in m.shards.items()}
        loaded: dict[str, int] = {}  # parameter -> rows filled
        for hf_name, tensor in weights:
            name = self.map_weight_name(hf_name)
            if name is None or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            module_name, _, leaf = name.rpartition(".")
            start = None
            if name not in params and module_name in fused:
                target, start, size = fused[module_name]
                name = f"{target}.{leaf}"
            if name not in params:
                logger.debug("ignoring checkpoint tensor %s", hf_name)
                continue
            p = params[name]
            dest = p if start is None else p.narrow(0, start, size)
            if dest.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {hf_name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(tensor)
            loaded[name] = loaded.get(name, 0) + dest.shape[0]
        missing = [n for n, p in params.items() if loaded.get(n, 0) < p.shape[0]
                   and not (n == "lm_head.weight" and self.tie_word_embeddings)]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
