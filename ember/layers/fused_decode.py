"""Decode steps of Llama-family models with `w4a8` weights in one C++ call (ember/kernels/fused_decode.cpp).

At batch 1 the GEMMs of a w4a8 decode step are ~13 ms and the ~1,000 small torch ops around them (norms,
rotary, residuals, KV writes, SDPA) were ~9 ms more, spent in dispatch rather than math. `FusedDecoder`
hands the whole stack of layers to one C++ object that holds pointers to the same weights and KV pages,
so a decode step is: embedding lookup (torch), every layer and the final norm (C++), lm_head (torch).

It covers what the Llama decoder layer does (Llama, Mistral, Qwen2, Qwen3: RMSNorm, q/k/v with optional
bias, optional per-head q/k norms, rotate-half RoPE from the model's own tables, full attention, SiLU-gated
MLP) when every linear is a `GroupQuantLinear`; anything else (other architectures, sliding windows, other
quantizations, GPU) keeps the torch path. A speculative verify (a request's last sampled token and up to
`MAX_ROWS` - 1 drafts) runs here too, one row per token, each row attending to its request's keys up to its own
position: a row's arithmetic is that of a one-token decode step, so verified tokens are the tokens
speculation-off decoding gives (draft trees too: a node's row sees the prefix and its ancestors). Prompt tokens
and images take the torch path (`FusedDecoder.takes`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ember.layers.quantization import GroupQuantLinear
from ember.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from ember.models.qwen2 import Qwen2DecoderLayer
from ember.models.qwen3 import Qwen3DecoderLayer

logger = logging.getLogger("ember.engine")

# Exact classes: a subclass may change what a layer computes (Gemma's sandwich norms and scaled embeddings).
_LAYERS = (LlamaDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer)


def unsupported_reason(model, kv_cache) -> str | None:
    """Why this model cannot take the fused decode path (None: it can)."""
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family model"
    layers = list(model.model.layers)
    if any(type(layer) not in _LAYERS for layer in layers):
        return "its decoder layers differ from Llama's"
    if model.sliding_window() is not None or list(kv_cache.groups) != ["full"]:
        return "it has sliding-window layers"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(isinstance(m, GroupQuantLinear) for m in linears):
            return "its linears are not w4a8 group-quantized"
        if attn.o_proj.bias is not None or mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
            return "o_proj or the MLP has a bias"
        if mlp.act is not F.silu:
            return "its MLP activation is not SiLU"
        if attn.attn.scale != layers[0].self_attn.attn.scale:
            return "its layers use different attention scales"
    norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                             *_qk_norms(layer.self_attn))] + [model.model.norm]
    if any(n.unit_offset or n.eps != norms[0].eps or n.weight.dtype != torch.float32 for n in norms):
        return "its norms differ (offset weights, mixed eps or dtype)"
    k0, _ = kv_cache.layer(0)
    if k0.device.type != "cpu" or k0.dtype != torch.float32:
        return "its KV cache is not float32 on the CPU"
    return None


def _qk_norms(attn) -> tuple:
    return (attn.q_norm, attn.k_norm) if attn.qk_norm else ()


def _weights(m: GroupQuantLinear) -> list[torch.Tensor]:
    return [m.qweight, m.dw, m.mw]


def _or_none(t: torch.Tensor | None) -> torch.Tensor:
    """A float32 tensor for the C++ side, or an empty one for "none" (a bias, a q/k norm)."""
    return t.detach().float().contiguous() if t is not None else torch.empty(0)


class FusedDecoder:
    """The decoder layers and final norm of `model` as one C++ DecodeStack sharing its weights and KV pages."""

    # tokens per request a step may bring here: a verify of NGRAM's default 8 or a draft model's few, with room
    MAX_ROWS = 16

    def __init__(self, model, kv_cache):
        reason = unsupported_reason(model, kv_cache)
        if reason:
            raise ValueError(f"fused decode does not apply: {reason}")
        cfg, layers = model.config, list(model.model.layers)
        ns = layers[0].self_attn.qkv_proj.kernel_ns  # the kernel variant the layers were built for
        if any(m.kernel_ns != ns for m in model.modules() if isinstance(m, GroupQuantLinear)):
            raise ValueError("fused decode does not apply: the layers were built for different kernel variants")
        first = layers[0].self_attn
        tensors: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            k_cache, v_cache = kv_cache.layer(i)
            q_norm, k_norm = _qk_norms(attn) or (None, None)
            tensors += [layer.input_layernorm.weight.detach(), *_weights(attn.qkv_proj), _or_none(attn.qkv_proj.bias),
                        *_weights(attn.o_proj), layer.post_attention_layernorm.weight.detach(),
                        *_weights(mlp.gate_up_proj), *_weights(mlp.down_proj), k_cache, v_cache,
                        _or_none(q_norm and q_norm.weight), _or_none(k_norm and k_norm.weight)]
        rotary = first.rotary[0]
        tensors += [model.model.norm.weight.detach(), rotary.cos, rotary.sin]
        dims = [len(layers), cfg.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim,
                layers[0].mlp.intermediate_size]
        self.stack = getattr(torch.classes, ns).DecodeStack(tensors, dims, float(model.model.norm.eps),
                                                            float(first.attn.scale))
        self.embed = model.model.embed_tokens
        self.kernel_ns = ns

    @classmethod
    def takes(cls, req, n: int) -> bool:
        """Whether a request's `n` new tokens run here: one token (decode), or up to MAX_ROWS tokens of which only the
        first may be a prompt token (a speculative verify: the last known token and the drafts after it; as one
        token alone, that first token would run here too). Longer runs of prompt tokens always take the torch path,
        so a prompt is computed the same way whether the prefix cache held part of it or not (requests without a
        prompt, a draft model's, may bring any short run)."""
        return n == 1 or (n <= cls.MAX_ROWS and req.kv_len + 1 >= len(getattr(req, "prompt_ids", ())))

    @classmethod
    def applies_to(cls, batch) -> bool:
        """What the fused step can run: at most MAX_ROWS tokens per request, text only."""
        return batch.attn["full"].max_q <= cls.MAX_ROWS and batch.mm is None

    @torch.inference_mode()
    def __call__(self, batch) -> torch.Tensor:
        """Final-normed hidden states, one row per token: [T, hidden]."""
        kv_slots, kv_lens = self.row_slots(batch)
        return self.stack.forward(self.embed(batch.input_ids), batch.positions, batch.attn["full"].write_slots,
                                  kv_slots, kv_lens)

    @staticmethod
    def row_slots(batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token row, the KV slots it attends to and how many ([T, W], [T])."""
        meta = batch.attn["full"]
        if batch.input_ids.shape[0] == meta.batch_size:  # one token per request
            return meta.kv_slots, meta.kv_lens
        request = torch.div(meta.q_pad_index, meta.max_q, rounding_mode="floor")  # several tokens of a request
        if batch.trees is not None and any(t is not None for t in batch.trees):
            return _tree_rows(meta, request, batch.trees)
        # causal: a row sees its request's keys up to its own position (keys start at position 0)
        return meta.kv_slots.index_select(0, request), batch.positions + 1


def _tree_rows(meta, request: torch.Tensor, trees: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token row, the KV slots it attends to, for requests verifying (or drafting) a tree (TreeSpec): a node
    sees the slots before the tree's base and, among the tree's, those of its ancestors and itself, in slot order
    (parents before children, as a one-token step at that node's position reads them). Other rows: causal."""
    offset = meta.q_pad_index - request * meta.max_q
    q_len = torch.bincount(request, minlength=meta.batch_size)
    first = (meta.kv_lens - q_len).tolist()  # (keys start at position 0: no sliding windows here)
    rows = []
    for b, s in zip(request.tolist(), offset.tolist()):
        s += first[b]  # the row's own slot, as a position in its request's page table
        spec = trees[b]
        if spec is None or s < spec.base:
            idx = torch.arange(s + 1)
        else:
            idx = torch.cat([torch.arange(spec.base), spec.base + spec.vis[s - spec.base].nonzero().flatten()])
        rows.append(meta.kv_slots[b].index_select(0, idx))
    lens = torch.tensor([len(r) for r in rows])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lens


def maybe_fused_decoder(model, kv_cache, enabled: bool = True) -> FusedDecoder | None:
    """A FusedDecoder where it applies (logging why not where the model is w4a8 but cannot take it)."""
    if not enabled:
        return None
    reason = unsupported_reason(model, kv_cache)
    if reason is None:
        logger.info("decode steps run fused (ember/kernels/fused_decode.cpp)")
        return FusedDecoder(model, kv_cache)
    if any(isinstance(m, GroupQuantLinear) for m in model.modules()):
        logger.info("w4a8 decode takes the torch path: %s", reason)
    return None
