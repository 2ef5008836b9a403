"""The MoE experts as two Triton GEMMs grouped by expert (the shape of SGLang's and vLLM's fused_moe), for CUDA.

The (token, choice) pairs are sorted by expert into blocks of BLOCK_M rows, every block one expert's
(`align_blocks`); one kernel then computes gate_up = x @ w13[e]^T for every block at once, the activation runs
on all rows, and the same kernel computes down = act @ w2[e]^T scaled by each pair's routing weight; the k rows
of a token are summed last. No loop over experts on the host and no host synchronisation: every size depends
only on the number of tokens, so a CUDA graph can hold the layer. Experts nobody chose get no block, so at batch
1 only the k chosen experts' weights are read.

On CPU it runs only under TRITON_INTERPRET=1 (Triton's interpreter: the tests check it against the torch path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.attention.triton_common import dot_precision
from ember.layers.fused_triton import silu_and_mul


def block_rows(num_pairs: int, num_experts: int) -> int:
    """BLOCK_M: 16 rows at decode (a block is mostly padding otherwise), up to 64 when experts get many rows."""
    return min(64, max(16, triton.next_power_of_2(max(1, num_pairs // max(1, num_experts)))))


def align_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (flat index token * k + choice) sorted by expert, each expert's run padded to whole blocks.
    -> (pair ids [S] int32, padding = T * k; each block's expert [S / block_m] int32, `num_experts` for a block
    to skip: pairs whose expert another expert-parallel rank holds (ids outside [0, num_experts)), and the tail).
    S = min(n + (E + 1)(block_m - 1), n * block_m) rounded up to block_m: the most the padding can take."""
    flat = topk_ids.reshape(-1).long()
    n, E, device = flat.numel(), num_experts, flat.device
    bucket = torch.where((flat >= 0) & (flat < E), flat, E)  # bucket E: experts not held here
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(bucket, stable=True)  # (pairs of one expert in token order)
    by_expert = bucket.index_select(0, order)
    shift = (ends - padded) - (torch.cumsum(counts, 0) - counts)  # padded start - unpadded start, per expert
    dest = torch.arange(n, device=device) + shift.index_select(0, by_expert)
    size = min(n + (E + 1) * (block_m - 1), n * block_m)
    size = -(-size // block_m) * block_m
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=device)
    sorted_ids.index_copy_(0, dest, order.int())
    block_starts = torch.arange(0, size, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).clamp_(max=E).int()
    return sorted_ids, block_expert


@triton.jit
def _grouped_gemm_kernel(A, W, C, SortedIds, BlockExpert, RouteWeights, num_pairs, num_experts, N, K,
                         stride_a, stride_we, stride_wn, stride_c,
                         A_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """C[pair, n] = sum_k A[pair // A_DIV, k] * W[e, n, k] (* RouteWeights[pair]) for the BLOCK_M pairs of one
    block (all of expert e) and BLOCK_N outputs; a block of expert `num_experts` is skipped."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    e = tl.load(BlockExpert + pid_m)
    if e >= num_experts:
        return
    pair = tl.load(SortedIds + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptr = A + (pair // A_DIV).to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    w_ptr = W + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k + k0 < K
        a = tl.load(a_ptr, mask=valid[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptr, mask=in_k[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    if MUL_WEIGHT:
        acc = acc * tl.load(RouteWeights + pair, mask=valid, other=0.0)[:, None]
    c_ptr = C + pair.to(tl.int64)[:, None] * stride_c + offs_n[None, :]
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor,
                 block_expert: torch.Tensor, block_m: int, a_div: int, route_weights: torch.Tensor | None = None):
    """out[pair] = a[pair // a_div] @ w[expert of pair]^T (* route_weights[pair]); w [E, N, K] with rows of K
    contiguous; rows of pairs in skipped blocks are left as they were."""
    E, N, K = w.shape
    assert a.stride(-1) == 1 and w.stride(-1) == 1 and out.stride(-1) == 1
    block_n, block_k = 64, 64 if K >= 64 else max(16, triton.next_power_of_2(K))
    grid = (block_expert.numel() * triton.cdiv(N, block_n),)
    _grouped_gemm_kernel[grid](
        a, w, out, sorted_ids, block_expert, route_weights if route_weights is not None else out,
        out.shape[0], E, N, K, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_DIV=a_div, MUL_WEIGHT=route_weights is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(w.dtype))


def fused_experts(experts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """MoEExperts.routed on the Triton kernels: x [T, H], topk ids already local to this rank (ids outside
    [0, num_experts) held elsewhere: they add nothing) -> [T, H] in x's dtype."""
    T, k = topk_ids.shape
    n = T * k
    block_m = block_rows(n, experts.num_experts)
    sorted_ids, block_expert = align_blocks(topk_ids, experts.num_experts, block_m)
    x = x.contiguous()
    gate_up = torch.empty(n, 2 * experts.intermediate_size, dtype=x.dtype, device=x.device)
    grouped_gemm(x, experts.w13, gate_up, sorted_ids, block_expert, block_m, a_div=k)
    act = silu_and_mul(gate_up, experts.swiglu_limit)  # (rows of pairs not held here: unread below)
    down = torch.zeros(n, experts.hidden_size, dtype=torch.float32, device=x.device)  # those rows add 0
    grouped_gemm(act, experts.w2, down, sorted_ids, block_expert, block_m, a_div=1,
                 route_weights=topk_weights.reshape(-1).float().contiguous())
    return down.view(T, k, -1).sum(dim=1).to(x.dtype)
