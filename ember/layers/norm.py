"""RMSNorm, in the two flavours our models use."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight.  Gemma stores the weight as an offset from one (`unit_offset`)."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    fused = False  # one Triton kernel (ember/layers/fused_triton.py; set by ember/layers/triton_layers.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from ember.layers.fused_triton import rms_norm
            return rms_norm(x, self.weight, self.eps, self.unit_offset)
        if x.dtype == torch.float32 and not self.unit_offset:  # one fused op, same result as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma multiplies in float32, then casts
            return (xf * (1.0 + self.weight.float())).to(dtype)
        return self.weight * xf.to(dtype)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this norm of it): a residual add and the norm after it, one kernel when fused (delta None:
        nothing to add, (x, norm(x)))."""
        if delta is None:
            return x, self(x)
        if self.fused:
            from ember.layers.fused_triton import add_rms_norm
            return add_rms_norm(x, delta, self.weight, self.eps, self.unit_offset)
        x = x + delta
        return x, self(x)


class ShardedRMSNorm(RMSNorm):
    """RMSNorm over a whole projection whose columns are split across tensor-parallel ranks (MiniMax-M2's q/k
    norms over all heads at once): a rank holds the weight's slice [start, start + size) of full_dim, and the
    sum of squares is all-reduced so that every rank divides by the rms of the whole vector. `replicas`: ranks
    holding the same slice (KV heads replicated past their count), counted once."""

    def __init__(self, full_dim: int, start: int, size: int, eps: float = 1e-6, replicas: int = 1):
        super().__init__(size, eps)
        self.full_dim, self.start, self.replicas = full_dim, start, replicas

    def weight_loader(self, param, loaded, shard_id=None) -> int:
        if tuple(loaded.shape) != (self.full_dim,):
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not fit the model's ({self.full_dim},)")
        param.data.copy_(loaded.narrow(0, self.start, param.shape[0]))
        return param.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[0] == self.full_dim:  # one rank holds it all
            return super().forward(x)
        from ember.distributed import tp_all_reduce
        dtype = x.dtype
        xf = x.float()
        sum_sq = tp_all_reduce(xf.pow(2).sum(-1, keepdim=True)) / self.replicas
        xf = xf * torch.rsqrt(sum_sq / self.full_dim + self.eps)
        return self.weight * xf.to(dtype)
