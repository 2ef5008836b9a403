"""One mixture-of-experts layer for every MoE architecture: routers as small functions, experts as stacked weights.

A MoE block is: router logits (`RouterGate`) -> (topk_weights, topk_ids) by one of the routing functions below
-> the chosen experts' SwiGLU MLPs -> weighted sum (-> an always-on shared expert, a dense MLP the model adds).
Tokens are grouped by expert (one stable sort), so each chosen expert runs one GEMM over all of its tokens;
experts nobody chose are never touched, so at batch 1 only the top-k experts' weights are read.

Weights: `w13` [E, 2I, H] (gate rows then up rows, as transformers' fused `gate_up_proj`) and `w2` [E, H, I].
The layer's `weight_loader(param, tensor, shard_id, expert_id=None)` fills them from any checkpoint
layout: one expert's gate/up/down matrix (Qwen3-MoE, MiniMax-M2 and GLM hub files), or a stacked [E, ...]
tensor of all experts (Step-3.5's hub files, transformers' internal fused layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed import ep_rank, ep_size, moe_tp_rank, moe_tp_size, tp_all_reduce, tp_rank, tp_size
from ember.layers.mlp import gated_act


# ----------------------------------------------------------------------------------------------- routers
def route_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE / Mixtral: softmax (float32) over all experts, top-k, optionally renormalised.
    -> (weights [T, k] float32, ids [T, k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_sigmoid(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None, renormalize: bool = True,
                  scaling: float = 1.0, n_group: int = 1, topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / GLM / MiniMax-M2 / Step-3.5: sigmoid scores; experts are *chosen* by score + bias (within
    the best `topk_group` of `n_group` expert groups, a group scored by the sum of its two best), *weighted* by
    the plain score, renormalised (+1e-20, as GLM; MiniMax/Step divide by the plain sum, the same in float32
    since the sum of k sigmoids is far above 1e-20), then scaled. -> (weights [T, k] float32, ids [T, k])."""
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1 and topk_group < n_group:
        T, E = choice.shape
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // n_group, dim=1), float("-inf"))
    # sorted=False as the references (the chosen set, ties included, is the same either way)
    ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling if scaling != 1.0 else weights, ids


class RouterGate(nn.Module):
    """The router's [E, H] projection. Not an nn.Linear on purpose: `--quantization` replaces every linear,
    and a quantized router would change which experts are chosen."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


# ----------------------------------------------------------------------------------------------- experts
class MoEExperts(nn.Module):
    """E SwiGLU experts. forward(x [T, H], topk_weights [T, k], topk_ids [T, k]) -> [T, H] (dtype of x).

    swiglu_limit: Step-3.5's clamp (gate after the activation clamped above, up clamped to +-limit); None = off.
    Tensor parallel (ember.distributed): each rank holds every expert's slice of the intermediate dimension
    (like a column-parallel w13 and a row-parallel w2) and the partial sums are all-reduced, unless
    `reduce_results=False` (a block that adds a shared expert first reduces once).
    Expert parallel (--ep-size): a rank holds num_experts / ep of the experts (`expert_offset` on), each split
    over the tp / ep ranks of its expert group; a rank computes the chosen experts it holds, and the same
    all-reduce sums every rank's part.
    """
    ep_size, expert_offset = 1, 0  # (class defaults: subclasses that copy attributes predate expert parallel)
    runner = "torch"  # --moe-runner-backend (ember/layers/moe_runner.py): "triton" runs moe_triton.py's kernels

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu",
                 swiglu_limit: float | None = None, reduce_results: bool = True):
        super().__init__()
        if act != "silu":
            raise ValueError(f"unsupported MoE activation {act!r}")
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.ep_size, self.shard_rank, self.shard_size = ep_size(), moe_tp_rank(), moe_tp_size()
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts are not divisible by the expert-parallel size {self.ep_size}")
        self.total_experts, num_experts = num_experts, num_experts // self.ep_size  # held here
        self.expert_offset = ep_rank() * num_experts
        if intermediate_size % self.shard_size:
            raise ValueError(f"expert width {intermediate_size} is not divisible by the {self.shard_size} ranks "
                             f"of an expert group")
        I = intermediate_size // self.shard_size  # this rank's share
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, I
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * I, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, I), requires_grad=False)
        self.swiglu_limit = swiglu_limit or None
        self.reduce_results = reduce_results

    def act(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return gated_act(F.silu, gate, up, self.swiglu_limit)

    def expert_mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens [n, H] -> [n, H]; quantized subclasses override this (the grouping stays)."""
        return F.linear(self.act(F.linear(x, self.w13[e])), self.w2[e])

    def experts_up(self, experts: list[int], x: torch.Tensor) -> torch.Tensor:
        """One token [1, H] through each listed expert's w13 -> [len(experts), 2I] (overridden when quantized)."""
        return torch.cat([F.linear(x, self.w13[e]) for e in experts])

    def experts_down(self, experts: list[int], a: torch.Tensor) -> torch.Tensor:
        """Row j of a [len(experts), I] through expert j's w2 -> [len(experts), H]."""
        return torch.cat([F.linear(a[j:j + 1], self.w2[e]) for j, e in enumerate(experts)])

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decode at batch 1 in few ops (per-op cost is a visible share of a 16-GEMM layer): the chosen experts'
        w13 rows stacked, one activation, their w2 rows stacked, one weighted index_add_. Each row is computed
        as in the grouped path below and added in ascending expert order into zeros as there, so a request's
        result does not depend on running alone or in a batch."""
        chosen = sorted((e, j) for j, e in enumerate(ids.tolist()) if 0 <= e < self.num_experts)
        if not chosen:  # every chosen expert is held by another expert-parallel rank
            return torch.zeros_like(x)
        experts = [e for e, _ in chosen]
        y = self.experts_down(experts, self.act(self.experts_up(experts, x))).to(x.dtype)
        y = y * weights.index_select(0, torch.tensor([j for _, j in chosen])).unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, torch.zeros(len(chosen), dtype=torch.long), y)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        y = self.routed(x, topk_weights, topk_ids)
        return tp_all_reduce(y) if self.reduce_results and self.tp_size > 1 else y

    def routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's weighted sum of the chosen experts (before any all-reduce)."""
        T, k = topk_ids.shape
        if T == 0:
            return torch.zeros_like(x)
        if self.ep_size > 1:  # ids of the experts held here; the others fall outside [0, num_experts)
            topk_ids = topk_ids - self.expert_offset
        if self.runner == "triton":  # every expert in two grouped GEMMs, no host synchronisation
            from ember.layers.moe_triton import fused_experts
            return fused_experts(self, x, topk_weights, topk_ids)
        if T == 1:  # decode at batch 1: the k chosen experts, no sort, no gather
            return self._one_token(x, topk_weights[0], topk_ids[0])
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens in order
        if self.ep_size > 1:  # only the pairs whose expert is held here
            order = order[((flat >= 0) & (flat < self.num_experts)).index_select(0, order)]
            if order.numel() == 0:
                return torch.zeros_like(x)
        experts, counts = torch.unique_consecutive(flat.index_select(0, order), return_counts=True)
        token_of = order // k
        xs = x.index_select(0, token_of)
        outs, start = [], 0
        for e, n in zip(experts.tolist(), counts.tolist()):  # one GEMM pair per expert that has tokens
            outs.append(self.expert_mlp(e, xs[start:start + n]))
            start += n
        y = torch.cat(outs)
        y = y * topk_weights.reshape(-1).index_select(0, order).unsqueeze(1).to(y.dtype)
        return torch.zeros(T, x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token_of, y).to(x.dtype)

    # ------------------------------------------------------------------------------------------- loading
    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor, shard_id: str,
                      expert_id: int | None = None) -> int:
        """Fill part of `w13` / `w2` from one checkpoint tensor -> elements written (ember/loader/weight_loading).

        shard_id: "gate" | "up" | "gate_up" (w13) or "down" (w2); expert_id: that expert's [rows, cols] matrix,
        or None for a stacked [E, rows, cols] tensor of every expert. The checkpoint holds the full expert
        width; this rank takes its slice. Shapes are checked."""
        kind = "w13" if param is self.w13 else "w2" if param is self.w2 else None
        if kind is None:
            raise ValueError("not an expert parameter of this layer")
        dest, src = param.data, tensor
        if expert_id is not None:  # one expert: the same as a stack of one
            if not 0 <= expert_id < self.total_experts:
                raise ValueError(f"expert {expert_id} out of range: the layer has {self.total_experts} experts")
            local = expert_id - self.expert_offset
            if not 0 <= local < self.num_experts:
                return 0  # held by another expert-parallel rank
            dest, src = dest[local:local + 1], tensor.unsqueeze(0)
        elif self.ep_size > 1:  # a stack of every expert: the ones held here
            if src.shape[0] != self.total_experts:
                raise ValueError(f"checkpoint shape {tuple(tensor.shape)}: expected {self.total_experts} experts")
            src = src.narrow(0, self.expert_offset, self.num_experts)
        what = f"{shard_id}, expert {'all' if expert_id is None else expert_id}"
        I, r = self.intermediate_size, self.shard_rank
        if kind == "w13" and shard_id == "gate_up":
            if src.dim() != 3 or src.shape[1] % 2:
                raise ValueError(f"checkpoint shape {tuple(tensor.shape)} is not a fused gate_up ({what})")
            pieces = ((dest[:, :I], src[:, :src.shape[1] // 2]), (dest[:, I:], src[:, src.shape[1] // 2:]))
            dim = 1
        elif kind == "w13" and shard_id in ("gate", "up"):
            pieces, dim = ((dest[:, :I] if shard_id == "gate" else dest[:, I:], src),), 1
        elif kind == "w2" and shard_id == "down":
            pieces, dim = ((dest, src),), 2
        else:
            raise ValueError(f"shard {shard_id!r} does not belong to {kind}")
        n = 0
        for d, s in pieces:
            full = list(d.shape)
            full[dim] *= self.shard_size  # the checkpoint's full width
            if list(s.shape) != full:
                raise ValueError(f"checkpoint shape {tuple(tensor.shape)} does not fit the model's "
                                 f"{tuple(full[1:] if expert_id is not None else full)} ({what})")
            d.copy_(s.narrow(dim, r * I, I))
            n += d.numel()
        return n

    def load_expert_weight(self, shard: str, tensor: torch.Tensor, expert: int | None = None) -> int:
        """weight_loader addressed by shard alone ("gate"|"up"|"gate_up"|"down")."""
        with torch.no_grad():
            return self.weight_loader(self.w2 if shard == "down" else self.w13, tensor, shard, expert)
