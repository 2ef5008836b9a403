"""The gated feed-forward block shared by Llama, Qwen and Gemma."""
import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.linear import MergedColumnParallelLinear, RowParallelLinear

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def gated_act(act, gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """act(gate) * up; with Step-3.5's SwiGLU clamp when `limit` is set: act(gate) <= limit, |up| <= limit."""
    gate = act(gate)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return gate * up


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", reduce_results: bool = True,
                 limit: float | None = None):
        super().__init__()
        # gate and up in one GEMM (fewer, larger matmuls); checkpoints load into the two halves
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=False)
        self.intermediate_size = self.gate_up_proj.local_sizes[0]  # this rank's share
        # reduce_results=False: a MoE block sums its shared and routed experts before one all-reduce
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False, reduce_results=reduce_results)
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}")
        self.act = ACTIVATIONS[act]
        self.limit = limit or None  # Step-3.5's clamp (gated_act); 0 / None: none

    fused = False  # silu(gate) * up in one Triton kernel (ember/layers/fused_triton.py; ember/layers/triton_layers.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            from ember.layers.fused_triton import silu_and_mul
            return self.down_proj(silu_and_mul(gate_up, self.limit))
        ns = getattr(self.down_proj, "kernel_ns", None)  # w4a8 on CPU: the fused decode step's silu(gate) * up
        if ns is not None and self.act is F.silu and self.limit is None and gate_up.dtype == torch.float32:
            return self.down_proj(getattr(torch.ops, ns).silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(gated_act(self.act, gate, up, self.limit))
