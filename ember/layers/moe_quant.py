"""`--quantization` for MoE experts on CPU.

w8a8_int8 and w4a8: every expert's w13 and w2 are packed for ember's group-quantized kernel (8-bit codes for
w8a8_int8, 4-bit for w4a8; fp16 scale and offset per 32 weights, int8 activations per group) and stacked, and
the whole expert layer runs in one C++ call (ember/kernels/moe_experts.cpp: grouping, both GEMMs, SwiGLU,
weighted sum). One call rather than 16 small GEMMs a token at top-8: their per-call costs (dispatch,
activation quantization, fbgemm's packing of the input) were a third of a batch-1 layer. So at w8a8_int8 the
experts use the group kernel on every CPU, also where the dense layers use fbgemm (AVX-512 VNNI); it is the
kernel w8a8_int8 uses without VNNI anyway, and its per-group scales are finer (9 bits per weight, not 8).
int8 / int4: each expert becomes the quantized linear the dense layers use (Int8Linear, Int4Linear for w13 at
int4), run one GEMM pair per chosen expert by MoEExperts' grouping.

Batch 1 reads only the chosen experts' weights, and since every kernel here quantizes activations per token
(or per group of a token), a token's result does not depend on its batch.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ember.layers.moe import MoEExperts
from ember.layers.quantization import Int4Linear, Int8Linear, _pack_groups

GROUP_KERNEL_BITS = {"w8a8_int8": 8, "w4a8": 4}  # methods whose experts run in ember.ops.moe_experts


def _stack_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every expert of w [E, N, K] packed for the group kernel, stacked: codes [E, tiles, K/32, bytes],
    dw, mw [E, tiles, K/32, 16]."""
    packs = [_pack_groups(w[e], bits) for e in range(w.shape[0])]
    return tuple(torch.stack([p[i] for p in packs]) for i in range(3))


class QuantMoEExperts(MoEExperts):
    """MoEExperts whose experts are quantized (built from a loaded fp MoEExperts, which it replaces)."""

    def __init__(self, experts: MoEExperts, method: str):
        nn.Module.__init__(self)
        for attr in ("num_experts", "hidden_size", "intermediate_size", "swiglu_limit", "reduce_results",
                     "tp_rank", "tp_size", "ep_size", "expert_offset", "total_experts", "shard_rank", "shard_size"):
            setattr(self, attr, getattr(experts, attr))
        self.method = method
        w13, w2 = experts.w13.detach(), experts.w2.detach()
        bits = GROUP_KERNEL_BITS.get(method)
        if bits is not None:
            from ember.kernels import load_group_gemm

            self.kernel_ns = load_group_gemm()
            for name, w in (("13", w13), ("2", w2)):
                q, dw, mw = _stack_groups(w, bits)
                self.register_buffer(f"q{name}", q)
                self.register_buffer(f"dw{name}", dw)
                self.register_buffer(f"mw{name}", mw)
        else:
            self.kernel_ns = None
            self.w13_q = nn.ModuleList(Int4Linear(_as_linear(w13[e])) if method == "int4" else
                                       Int8Linear(_as_linear(w13[e])) for e in range(self.num_experts))
            # the down projection keeps 8 bits at int4 (as quantize_model keeps down_proj)
            self.w2_q = nn.ModuleList(Int8Linear(_as_linear(w2[e])) for e in range(self.num_experts))

    def routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.kernel_ns is None:
            return super().routed(x, topk_weights, topk_ids)
        if self.ep_size > 1:  # ids of the experts held here; the others fall outside [0, num_experts) and are skipped
            topk_ids = topk_ids - self.expert_offset
        return getattr(torch.ops, self.kernel_ns).moe_experts(
            x, topk_ids, topk_weights, self.q13, self.dw13, self.mw13, self.q2, self.dw2, self.mw2,
            self.intermediate_size, float(self.swiglu_limit or 0.0))

    # int8 / int4: the grouping of MoEExperts over quantized linears
    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.w2_q[e]._mm(self.act(self.w13_q[e]._mm(x))).to(x.dtype)

    def experts_up(self, experts: list[int], x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.w13_q[e]._mm(x) for e in experts])

    def experts_down(self, experts: list[int], a: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.w2_q[e]._mm(a[j:j + 1]) for j, e in enumerate(experts)])

    def weight_loader(self, *args, **kwargs):
        raise RuntimeError("quantized experts are built from loaded weights; load before quantizing")


def _as_linear(weight: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(weight=weight, bias=None)  # what the quantized layers read from an nn.Linear


def quantize_experts(model: nn.Module, method: str) -> nn.Module:
    """Replace every MoEExperts of `model` by its quantized form (the fp weights are freed)."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, MoEExperts) and not isinstance(m, QuantMoEExperts)]
    for name, experts in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantMoEExperts(experts, method))
    return model
