"""Step-3.7-Flash (Step3p7ForConditionalGeneration): a ViT (learned positions interpolated to the view, 2-D
rotary, layer scale) whose grid is downsampled 4x by two stride-2 convolutions, a linear projector, and the
Step MoE text model (ember/models/step3p5.py).

Each image is a global 728x728 view plus local 504x504 crops (ember/multimodal/processing.py); its embedding
rows are the crops' (in order) then the global view's, written over the <im_patch> tokens of its placeholder
(ember/multimodal/step3p7_prompt.py). Plain 1-D positions.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.rotary import rotate_in_float32
from ember.models.residual import run_layers
from ember.models.step3p5 import Step3p5ForCausalLM, Step3p5Model

_ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu, "silu": F.silu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Step3p7TextModel(Step3p5Model):
    def forward(self, batch):
        mm = getattr(batch, "mm", None)
        ids = batch.input_ids
        if mm is not None:  # placeholder rows carry hash-derived ids (prefix cache keys) beyond the vocab
            ids = ids.masked_fill(ids >= self.embed_tokens.full_vocab, 0)  # (weight rows: one tp shard)
        x = self.embed_tokens(ids)
        if mm is not None and mm.rows.numel():
            x = x.index_copy(0, mm.rows, mm.embeds.to(x.dtype))
        return run_layers(self.layers, batch.positions, x, batch, self.norm)


class VisionAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):  # x [B, N, C]
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate_in_float32(q, cos, sin), rotate_in_float32(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).reshape(B, N, -1))


class VisionLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.hidden_size
        self.self_attn = VisionAttention(C, cfg.num_attention_heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(C, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, C)
        self.act = _ACT[cfg.hidden_act]
        self.layernorm_before = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.lambda_1, self.lambda_2 = nn.Parameter(torch.empty(C)), nn.Parameter(torch.empty(C))

    def forward(self, x, cos, sin):
        x = x + self.lambda_1 * self.self_attn(self.layernorm_before(x), cos, sin)
        return x + self.lambda_2 * self.mlp.fc2(self.act(self.mlp.fc1(self.layernorm_after(x))))


class Step3p7VisionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, C = cfg, cfg.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(cfg.num_channels, C, cfg.patch_size, cfg.patch_size, bias=False)
        self.embeddings.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, C)
        self.pre_layernorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.downsampler1 = nn.Conv2d(C, 2 * C, kernel_size=3, stride=2, padding=1)
        self.downsampler2 = nn.Conv2d(2 * C, 4 * C, kernel_size=3, stride=2, padding=1)
        self.rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)

    def _positions(self, gh, gw, x):
        pos = self.embeddings.position_embedding.weight
        side = int(pos.shape[0] ** 0.5)
        if (gh, gw) == (side, side):
            return pos.unsqueeze(0)
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # bilinear, as the reference
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

    def _rotary(self, gh, gw, device):
        half = self.cfg.hidden_size // self.cfg.num_attention_heads // 2
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
        hp, wp = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
        fh, fw = hp.flatten()[:, None].float() * inv, wp.flatten()[:, None].float() * inv
        f = torch.cat([fw, fh], -1)  # (w angles first: the reference flips the (h, w) pair)
        emb = torch.cat([f, f], -1)[None, :, None, :]
        return emb.cos(), emb.sin()

    def forward(self, pixels):  # [B, 3, H, W] -> [B, (H/p/4) * (W/p/4), 4C]
        B, _, H, W = pixels.shape
        p = self.cfg.patch_size
        gh, gw = H // p, W // p
        x = self.embeddings.patch_embedding(pixels.to(self.embeddings.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        x = self.pre_layernorm(x + self._positions(gh, gw, x))
        cos, sin = self._rotary(gh, gw, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = x.transpose(1, 2).reshape(B, -1, gh, gw)
        x = self.downsampler2(self.downsampler1(x))
        return x.flatten(2).transpose(1, 2)


# stepfun's own checkpoint layout (OpenCLIP-style vision names, a fused and rope-interleaved qkv), as
# transformers' conversion_mapping ("step3p7", "step3p5_vision") renames it
_HUB_VISION = [(r"^conv1\.weight$", "embeddings.patch_embedding.weight"),
               (r"^positional_embedding$", "embeddings.position_embedding.weight"),
               (r"^transformer\.resblocks\.", "layers."), (r"^ln_pre\.", "pre_layernorm."),
               (r"^vit_downsampler1\.", "downsampler1."), (r"^vit_downsampler2\.", "downsampler2."),
               (r"\.ls_1\.gamma$", ".lambda_1"), (r"\.ls_2\.gamma$", ".lambda_2"), (r"\.mlp\.c_fc\.", ".mlp.fc1."),
               (r"\.mlp\.c_proj\.", ".mlp.fc2."), (r"\.attn\.", ".self_attn."), (r"\.ln_1\.", ".layernorm_before."),
               (r"\.ln_2\.", ".layernorm_after.")]


def _rope_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rotary pairs interleaved (x0 y0 x1 y1 ...) -> split halves (x0 x1 ... y0 y1 ...)."""
    n = t.shape[0]
    return t.reshape(heads, n // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def hub_vision_to_ours(weights, heads: int):
    """Checkpoint tensors with stepfun's vision names renamed to transformers' (ours); others pass through."""
    for name, t in weights:
        if name.startswith("vit_large_projector."):
            yield "model.multi_modal_projector." + name[len("vit_large_projector."):], t
            continue
        if not name.startswith("vision_model.") or ".layers." in name or ".embeddings." in name or \
                name.startswith(("vision_model.pre_layernorm", "vision_model.downsampler")):
            yield name, t
            continue
        sub = name[len("vision_model."):]
        for pat, rep in _HUB_VISION:
            sub = re.sub(pat, rep, sub)
        if sub.endswith((".in_proj_weight", ".in_proj_bias")):
            base, kind = sub.rsplit(".", 1)[0], "weight" if sub.endswith("weight") else "bias"
            q, k, v = t.chunk(3, dim=0)
            for proj, part in (("q_proj", _rope_halves(q, heads)), ("k_proj", _rope_halves(k, heads)), ("v_proj", v)):
                yield f"vision_model.{base}.{proj}.{kind}", part
            continue
        yield "vision_model." + sub, t


class Step3p7ForConditionalGeneration(Step3p5ForCausalLM):
    model_cls = Step3p7TextModel
    takes_full_config = True  # built from the whole config (vision + text); the engine keeps the text part

    def __init__(self, config):
        super().__init__(config.text_config)
        self.full_config = config
        self.vision_model = Step3p7VisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(4 * config.vision_config.hidden_size, config.text_config.hidden_size,
                                               bias=bool(getattr(config, "projector_bias", False)))

    @torch.inference_mode()
    def encode_items(self, items) -> list[torch.Tensor]:
        """Per image: its local crops' rows (in order) then its global view's; views of one size in one pass."""
        dev, dt = self.lm_head.weight.device, self.multi_modal_projector.weight.dtype

        def encode(arrays):
            if not arrays:
                return None
            px = torch.cat([torch.as_tensor(a) for a in arrays]).to(dev, dt)
            return self.multi_modal_projector(self.vision_model(px))

        glob = encode([it.data["pixel_values"] for it in items])
        local = encode([it.data["pixel_values_local"] for it in items if "pixel_values_local" in it.data])
        out, j = [], 0
        for i, it in enumerate(items):
            parts = []
            n = int(it.data.get("num_local_patches", 0))
            if n:
                parts.append(local[j:j + n].reshape(-1, glob.shape[-1]))
                j += n
            parts.append(glob[i])
            out.append(torch.cat(parts))
        return out

    def load_weights(self, weights, on_loaded=None) -> None:
        super().load_weights(hub_vision_to_ours(weights, self.full_config.vision_config.num_attention_heads), on_loaded)

    def map_weight_name(self, name: str):
        for prefix in ("vision_model.", "multi_modal_projector."):
            if name.startswith("model." + prefix):
                return name[len("model."):]
            if name.startswith(prefix):
                return name
        return super().map_weight_name(name)
