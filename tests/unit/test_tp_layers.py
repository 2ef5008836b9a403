"""Tensor-parallel layer arithmetic without processes: the ranks' shards, built by setting ember.distributed's
rank, hold the right slices, and their partial results add up to the single-rank layer's (what the all-reduce
does between processes; tests/models/test_tensor_parallel.py runs the real thing)."""
from __future__ import annotations

import pytest
import torch

import ember.distributed as dist
from ember.layers.linear import QKVParallelLinear, RowParallelLinear, keep_tp_semantics
from ember.layers.moe import MoEExperts, route_softmax


def as_rank(monkeypatch, rank: int, size: int, ep: int = 1):
    monkeypatch.setattr(dist, "_tp_rank", rank)
    monkeypatch.setattr(dist, "_tp_size", size)
    monkeypatch.setattr(dist, "_ep_size", ep)


def test_uneven_kv_groups(monkeypatch):
    """SmolLM2: 9 query heads in 3 KV groups on 2 ranks -> whole groups, 2 + 1; o_proj takes the same columns."""
    D, H = 4, 8
    w = {"q": torch.randn(9 * D, H), "k": torch.randn(3 * D, H), "v": torch.randn(3 * D, H)}
    parts = []
    for rank, (heads, kv) in enumerate([(6, 2), (3, 1)]):
        as_rank(monkeypatch, rank, 2)
        qkv = QKVParallelLinear(H, D, 9, 3)
        assert (qkv.num_heads, qkv.num_kv_heads) == (heads, kv)
        for s, t in w.items():
            qkv.weight_loader(qkv.weight, t, s)
        parts.append(qkv.weight.data.split(qkv.split_sizes))
        o = RowParallelLinear(9 * D, H, input_shard=qkv.o_proj_shard)
        full_o = torch.randn(H, 9 * D)
        o.weight_loader(o.weight, full_o)
        assert torch.equal(o.weight.data, full_o[:, rank * 6 * D:rank * 6 * D + heads * D])
    for i, s in enumerate("qkv"):
        assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), w[s])


@pytest.mark.parametrize("ep", [1, 2])
def test_moe_shards_add_up(monkeypatch, ep):
    """tp=2: each expert's intermediate dim halved (ep=1) or half the experts, whole (ep=2); partials sum up."""
    torch.manual_seed(0)
    E, H, I, T = 8, 16, 32, 5
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    x = torch.randn(T, H)
    weights, ids = route_softmax(torch.randn(T, E), 2, True)
    as_rank(monkeypatch, 0, 1)
    full = MoEExperts(E, H, I)
    full.load_expert_weight("gate_up", w13)
    full.load_expert_weight("down", w2)
    for t in (T, 1):  # the batched path and the batch-1 decode path
        want = full.routed(x[:t], weights[:t], ids[:t])
        got = 0
        for rank in range(2):
            as_rank(monkeypatch, rank, 2, ep)
            part = MoEExperts(E, H, I)
            for e in range(E):  # per-expert checkpoint tensors: a rank keeps only its own
                part.load_expert_weight("gate", w13[e, :I], e)
                part.load_expert_weight("up", w13[e, I:], e)
                part.load_expert_weight("down", w2[e], e)
            assert part.num_experts == E // ep and part.intermediate_size == I * ep // 2
            got = got + part.routed(x[:t], weights[:t], ids[:t])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quantized_parallel_layers_keep_their_collective(monkeypatch):
    from ember.layers.linear import ParallelLMHead
    from ember.layers.quantization import Int8Linear
    as_rank(monkeypatch, 1, 2)
    row = RowParallelLinear(8, 4, bias=True)
    q = keep_tp_semantics(row, Int8Linear(row))
    assert type(q).__name__ == "_RowReduced" and q.inner.bias is None  # rank 0 adds the bias, once
    head = ParallelLMHead(10, 8)
    assert type(keep_tp_semantics(head, Int8Linear(head))).__name__ == "_VocabGathered"
    as_rank(monkeypatch, 0, 1)
    row = RowParallelLinear(8, 4, bias=True)
    assert isinstance(keep_tp_semantics(row, Int8Linear(row)), Int8Linear)  # tp=1: unchanged


@pytest.mark.parametrize("method", ["int8", "w8a8_int8"])  # torch's int8 linears; ember's one-call expert kernel
def test_quantized_experts_keep_their_expert_slice(monkeypatch, method):
    from ember.layers.moe_quant import QuantMoEExperts
    as_rank(monkeypatch, 1, 2, ep=2)
    part = MoEExperts(8, 32, 32)
    part.w13.data.normal_(), part.w2.data.normal_()
    q = QuantMoEExperts(part, method)
    assert (q.ep_size, q.expert_offset, q.num_experts) == (2, 4, 4)
    x = torch.randn(3, 32)
    weights, ids = route_softmax(torch.randn(3, 8), 2, True)
    got, want = q.routed(x, weights, ids), part.routed(x, weights, ids)
    assert (got - want).norm() < 0.05 * want.norm()  # int8 rounding only: the same experts ran
