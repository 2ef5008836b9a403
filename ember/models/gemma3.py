"""Gemma 3 (text): sliding-window layers interleaved with full-attention layers (5:1 here; Step-3.5 uses 3:1).

Differences from Llama: norms around both sub-blocks, RMSNorm weights stored as offsets from one, embeddings
scaled by sqrt(hidden), q/k norms, a fixed attention scale, a RoPE base per layer type, GELU-tanh MLP.
"""
import torch
from torch import nn

from ember.layers.linear import VocabParallelEmbedding
from ember.layers.mlp import GatedMLP
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding
from ember.models.llama import LlamaAttention, LlamaForCausalLM, head_dim_of
from ember.models.residual import PreNormDecoderLayer, run_layers


def layer_types_of(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    pattern = getattr(config, "sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(config.num_hidden_layers)]


class Gemma3Attention(LlamaAttention):
    qk_norm = True
    norm_unit_offset = True


class Gemma3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, sliding: bool):
        super().__init__()
        self.self_attn = Gemma3Attention(config, layer_id, rotary, group="swa" if sliding else "full",
                                         scale=config.query_pre_attn_scalar ** -0.5)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_activation)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, unit_offset=True)

    def forward_residual(self, positions, x, delta, batch):
        """Gemma's sandwich: the attention and MLP outputs are normed before they join the stream."""
        x, h = self.input_layernorm.add_norm(x, delta)
        x, h = self.pre_feedforward_layernorm.add_norm(x, self.post_attention_layernorm(self.self_attn(positions, h,
                                                                                                       batch)))
        return x, self.post_feedforward_layernorm(self.mlp(h))


class Gemma3Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("Gemma attention logit soft-capping is not supported")
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size ** 0.5
        self.layer_types = layer_types_of(config)
        D, max_pos = head_dim_of(config), config.max_position_embeddings
        self.rotary_full = RotaryEmbedding(config, D, max_pos, layer_type="full_attention")
        self.rotary_local = RotaryEmbedding(config, D, max_pos, layer_type="sliding_attention")
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, self.rotary_local if t == "sliding_attention" else self.rotary_full,
                               sliding=t == "sliding_attention")
            for i, t in enumerate(self.layer_types))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)

    def forward(self, batch):
        x = self.embed_tokens(batch.input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return run_layers(self.layers, batch.positions, x, batch, self.norm)


class Gemma3ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma3Model

    def __init__(self, config):
        config.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        super().__init__(config)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def kv_groups(self):
        groups = {"full": [], "swa": []}
        for i, t in enumerate(self.model.layer_types):
            groups["swa" if t == "sliding_attention" else "full"].append(i)
        return {k: v for k, v in groups.items() if v}

    def sliding_window(self):
        return self.config.sliding_window

    def compute_logits(self, hidden):
        logits = super().compute_logits(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
