"""Qwen2.5-VL: a ViT with window attention (2-D rotary, 2x2 patch merger) in front of a Qwen2 decoder whose
rotary is M-RoPE (temporal/height/width position rows, each turning its own section of the frequencies).

Vision embeddings are computed once per image/video (ember/multimodal/engine_glue.py) and written over the
placeholder rows of the token embeddings; the 3-D positions come from the same glue (get_rope_index's rule).
Checkpoint names: `model.visual.*` / `model.language_model.*` (transformers 5) or `visual.*` / `model.*` (hub).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding, rotate_in_float32
from ember.models.llama import head_dim_of
from ember.models.qwen2 import Qwen2ForCausalLM, Qwen2Model
from ember.models.residual import run_layers


# ------------------------------------------------------------------ text side: M-RoPE
class MRotaryEmbedding(RotaryEmbedding):
    """positions [3, T] (t, h, w rows) pick, per frequency section of `mrope_section`, that row's angle;
    positions [T] (text only, or decode where all rows are equal) are plain RoPE."""

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__(config, head_dim, max_positions)
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        section = list(params.get("mrope_section") or [head_dim // 2, 0, 0])
        assert sum(section) == head_dim // 2, f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}"
        # which position row (t, h, w) each rotary dim takes; a list, not a buffer (the model is built on meta)
        self.row_of_dim = [i % 3 for i, n in enumerate(section) for _ in range(n)] * 2

    def _cos_sin(self, positions, dtype):
        if positions.dim() == 1:
            return super()._cos_sin(positions, dtype)
        memo = self._memo
        if memo is None or memo[0] is not positions or memo[1] != dtype:
            idx = torch.tensor(self.row_of_dim, device=positions.device).view(1, 1, -1)
            idx = idx.expand(1, positions.shape[1], -1)
            cos = self.cos[positions].gather(0, idx)[0].unsqueeze(1).to(dtype)  # [T, 1, D]
            sin = self.sin[positions].gather(0, idx)[0].unsqueeze(1).to(dtype)
            memo = self._memo = (positions, dtype, cos, sin)
        return memo[2], memo[3]


class Qwen2_5_VLTextModel(Qwen2Model):
    def __init__(self, config):
        super().__init__(config)
        self.rotary = MRotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)
        for layer in self.layers:
            layer.self_attn.rotary = [self.rotary]

    def forward(self, batch):
        mm = getattr(batch, "mm", None)
        ids = batch.input_ids
        if mm is not None:  # placeholder rows carry hash-derived ids (prefix cache keys) beyond the vocab
            ids = ids.masked_fill(ids >= self.embed_tokens.full_vocab, 0)  # (weight rows: one tp shard)
        x = self.embed_tokens(ids)
        positions = batch.positions
        if mm is not None:
            if mm.rows.numel():
                x = x.index_copy(0, mm.rows, mm.embeds.to(x.dtype))
            if mm.positions is not None:
                positions = mm.positions
        return run_layers(self.layers, positions, x, batch, self.norm)


# ------------------------------------------------------------------ vision tower
class VisionMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = {"silu": F.silu, "gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
                    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens: list[int], cos, sin):
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate_in_float32(q, cos, sin), rotate_in_float32(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, N, D]
        out = torch.empty_like(q)
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):  # attention within each window / frame only
            out[:, a:b] = F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b])
        return self.proj(out.transpose(0, 1).reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden_size, 1e-6), RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x):  # x: [N, C*tp*p*p] flattened patches; the conv over one patch is a matmul
        return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.view(self.proj.weight.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, dim, context_dim, merge):
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = RMSNorm(context_dim, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, dim))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.merge = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.hidden_size, self.merge)
        self.full_blocks = set(cfg.fullatt_block_indexes)
        self.rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)

    def _window_index(self, grids):
        """Order of merge units grouped by window (windows of window_size pixels), and window boundaries."""
        m, unit = self.merge, self.merge * self.merge
        win = self.cfg.window_size // m // self.cfg.patch_size
        index, cu, base = [], [0], 0
        for t, h, w in grids:
            gh, gw = h // m, w // m
            idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
            ph, pw = win - gh % win, win - gw % win
            nh, nw = (gh + ph) // win, (gw + pw) // win
            pad = F.pad(idx, (0, pw, 0, ph), value=-100).reshape(t, nh, win, nw, win)
            pad = pad.permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
            seqlens = (pad != -100).sum([2, 3]).reshape(-1)
            flat = pad.reshape(-1)
            index.append(flat[flat != -100] + base)
            cu.extend((seqlens.cumsum(0) * unit + cu[-1]).tolist())
            base += t * gh * gw
        bounds = [cu[0]] + [b for a, b in zip(cu[:-1], cu[1:]) if b != a]  # empty windows dropped
        return torch.cat(index), bounds

    def _rotary(self, grids, device):
        m = self.merge
        pos = []
        for t, h, w in grids:
            hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            shape = (h // m, m, w // m, m)
            hp, wp = hp.reshape(shape).transpose(1, 2).flatten(), wp.reshape(shape).transpose(1, 2).flatten()
            pos.append(torch.stack([hp, wp], -1).repeat(t, 1))
        pos = torch.cat(pos).to(device)
        half = self.cfg.hidden_size // self.cfg.num_heads // 2
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
        freqs = pos[..., None].float() * inv_freq  # [N, 2, D/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], -1)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels: [N, C*tp*p*p] for the items of `grids` (t, h, w in patches), concatenated.
        Returns merged embeddings [N / merge^2, out_hidden], in the items' order."""
        x = self.patch_embed(pixels)
        N, unit = x.shape[0], self.merge ** 2
        window_index, cu_window = self._window_index(grids)
        window_index = window_index.to(x.device)
        cos, sin = self._rotary(grids, x.device)

        def permute(t):
            return t.reshape(N // unit, unit, -1)[window_index].reshape(N, -1)
        x, cos, sin = permute(x), permute(cos).unsqueeze(1), permute(sin).unsqueeze(1)
        cu_full = [0]
        for t, h, w in grids:
            cu_full.extend(cu_full[-1] + h * w * (i + 1) for i in range(t))  # each frame attends within itself
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in self.full_blocks else cu_window, cos, sin)
        return self.merger(x)[torch.argsort(window_index)]


# ------------------------------------------------------------------ the model
class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    model_cls = Qwen2_5_VLTextModel
    takes_full_config = True  # built from the whole config (vision + text); the engine keeps the text part

    def __init__(self, config):
        text = getattr(config, "text_config", None) or config
        super().__init__(text)
        self.full_config = config
        self.visual = Qwen2_5_VisionTransformer(config.vision_config)

    @torch.inference_mode()
    def encode_items(self, items) -> list[torch.Tensor]:
        """Vision embeddings of several images/videos (from one or many requests) in one tower pass."""
        dev = self.lm_head.weight.device
        pixels = torch.cat([torch.as_tensor(it.data["pixel_values"]) for it in items]).to(dev)
        grids = [tuple(int(v) for v in it.data["grid_thw"]) for it in items]
        out = self.visual(pixels.to(self.visual.patch_embed.proj.weight.dtype), grids)
        sizes = [t * h * w // self.visual.merge ** 2 for t, h, w in grids]
        return list(out.split(sizes))

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith("model.visual."):
            return name[len("model."):]
        if name.startswith("visual."):
            return name
        return super().map_weight_name(name)
