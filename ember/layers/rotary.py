"""Rotary position embeddings (HF "rotate half" layout), with every RoPE variant transformers knows."""
import torch
from torch import nn


def rope_params(config, layer_type: str | None = None) -> dict:
    """The RoPE settings of this config (of one layer type, for per-type configs: Gemma 3, Step-3.5)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    return params


def rotary_dim_of(config, head_dim: int, layer_type: str | None = None) -> int:
    """How many leading dims of each head rotate (partial rotary: the rest pass through unchanged)."""
    return int(head_dim * rope_params(config, layer_type).get("partial_rotary_factor", 1.0))


def rope_inv_freq(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin scaling factor for this config (and layer type, for Gemma 3)."""
    params = rope_params(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = rotary_dim_of(config, head_dim, layer_type)
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
    return inv_freq.float(), float(scale)


def rotate_half(x):
    """HF's rotate-half: [x1, x2] -> [-x2, x1] along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_in_float32(x, cos, sin):
    """Rotate-half RoPE computed in float32 and cast back (the vision towers' attention, as transformers does)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    fused = False  # rotate with ember/layers/rotary_triton.py (ember/layers/triton_layers.py)

    def __init__(self, config, head_dim: int, max_positions: int, layer_type: str | None = None):
        super().__init__()
        self.config, self.head_dim, self.max_positions, self.layer_type = config, head_dim, max_positions, layer_type
        self.rotary_dim = rotary_dim_of(config, head_dim, layer_type)  # < head_dim: partial rotary
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._memo = None
        self.build(self.cos.device)  # a no-op while the model is being created on the meta device

    def build(self, device) -> None:
        """(Re)compute the cos/sin tables in float32 on `device` (models are created on the meta device)."""
        if torch.device(device).type == "meta":
            return
        inv_freq, scale = rope_inv_freq(self.config, self.head_dim, self.layer_type)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self._memo = None
        self.cos = (emb.cos() * scale).to(device)
        self.sin = (emb.sin() * scale).to(device)

    def _cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for these positions. Every layer of a step passes the same positions tensor, so the
        rows are looked up once per step, not once per layer (small ops dominate CPU decode)."""
        memo = self._memo
        if memo is None or memo[0] is not positions or memo[1] != dtype:
            cos = self.cos.index_select(0, positions).unsqueeze(1).to(dtype)  # (faster than cos[positions] on CPU)
            sin = self.sin.index_select(0, positions).unsqueeze(1).to(dtype)
            memo = self._memo = (positions, dtype, cos, sin)
        return memo[2], memo[3]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, H, D], k: [T, Hkv, D], positions: [T]. q and k are rotated together, as one tensor."""
        if self.fused:  # one Triton kernel instead of ~8 small ones
            from ember.layers.rotary_triton import rope
            return rope(positions, q, k, self.cos, self.sin, self.rotary_dim)
        cos, sin = self._cos_sin(positions, q.dtype)
        x = torch.cat([q, k], dim=1)
        if self.rotary_dim < self.head_dim:  # partial rotary: only the leading rotary_dim dims turn
            rot, rest = x.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
            x = torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)
        else:
            x = x * cos + rotate_half(x) * sin
        return x[:, :q.shape[1]], x[:, q.shape[1]:]
