"""The gated feed-forward block shared by Llama, Qwen and Gemma."""
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        # gate and up in one GEMM (fewer, larger matmuls); checkpoints load into the two halves
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.gate_up_proj.shards = {"gate_proj": (0, intermediate_size), "up_proj": (intermediate_size, intermediate_size)}
        self.intermediate_size = intermediate_size
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}")
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)
