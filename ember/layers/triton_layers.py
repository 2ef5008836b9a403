"""Which layers compute with their Triton kernels: chosen with the Triton attention backend on a GPU (the user has
opted into Triton kernels there), where each saves small kernel launches per layer and step. Not under the
interpreter on CPU, where tests/unit/test_rotary_triton.py and test_fused_triton.py check the kernels themselves."""
from __future__ import annotations

import torch.nn.functional as F

from ember.layers.mlp import GatedMLP
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding


def use_triton_layers(model) -> dict[str, int]:
    """Switch the layers of `model` that have a Triton form over to it -> how many of each. Plain rotate-half RoPE
    (subclasses such as M-RoPE keep their own forward), RMSNorm (not the tensor-parallel ShardedRMSNorm, whose sum
    of squares is all-reduced), and the SiLU gated MLP."""
    n = {"rope": 0, "rms_norm": 0, "silu_and_mul": 0}
    for module in model.modules():
        if type(module) is RotaryEmbedding and module.rotary_dim % 2 == 0:
            module.fused, n["rope"] = True, n["rope"] + 1
        elif type(module) is RMSNorm:
            module.fused, n["rms_norm"] = True, n["rms_norm"] + 1
        elif isinstance(module, GatedMLP) and module.act is F.silu:
            module.fused, n["silu_and_mul"] = True, n["silu_and_mul"] + 1
    return n
