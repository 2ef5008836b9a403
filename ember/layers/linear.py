"""Linear and embedding layers that know how to load their own weights, sharded for tensor parallelism.

Every layer has `weight_loader(param, tensor, *shard_ids) -> elements written`: the layer, not the
model, knows which slice of a checkpoint tensor it holds (its tensor-parallel rank's rows or columns, or one
projection of a fused q/k/v or gate/up GEMM). At tp=1 every layer holds everything and the collectives are
no-ops; the same code shards when ember.distributed says tp > 1 (nano-vllm's design).

All are nn.Linear / nn.Embedding subclasses, so CPU quantization (ember/layers/quantization.py) replaces them
like any linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed import tp_all_gather_last_dim, tp_all_reduce, tp_rank, tp_size


def _check_copy(dest: torch.Tensor, src: torch.Tensor) -> int:
    if dest.shape != src.shape:
        raise ValueError(f"checkpoint shape {tuple(src.shape)} does not fit the model's {tuple(dest.shape)}")
    dest.copy_(src)
    return dest.numel()


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> int:
    """Unsharded parameters (norms, routers, biases of replicated layers): the whole tensor."""
    return _check_copy(param.data, loaded)


def _full(loaded: torch.Tensor, dim: int, expected: int) -> torch.Tensor:
    """The checkpoint tensor, after checking its sharded dimension holds every rank's part (no silent crop)."""
    if loaded.dim() <= dim or loaded.shape[dim] != expected:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)}: expected {expected} along dim {dim}")
    return loaded


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {parts}")
    return n // parts


class _ShardedLinear(nn.Linear):
    """nn.Linear holding this rank's part; subclasses say which part of a checkpoint tensor that is."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        super().__init__(in_features, out_features, bias=bias)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> int:
        return default_weight_loader(param, loaded)


class ReplicatedLinear(_ShardedLinear):
    """Every rank holds the whole weight (small projections, MoE routers)."""


class ColumnParallelLinear(_ShardedLinear):
    """Output features split over ranks: y_rank = x @ W[rows of rank].T (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        self.full_out = out_features
        super().__init__(in_features, _divide(out_features, tp_size(), "output features"), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        n = param.shape[0]
        return _check_copy(param.data, _full(loaded, 0, self.full_out).narrow(0, self.tp_rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections in one GEMM (gate and up); checkpoint shard i fills projection i."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias)
        self.local_sizes = [_divide(s, self.tp_size, "a merged projection") for s in self.output_sizes]

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is None:  # a checkpoint that stores the projections already fused
            parts = loaded.split(self.output_sizes, dim=0)
            return sum(self.weight_loader(param, p, i) for i, p in enumerate(parts))
        n = self.local_sizes[shard_id]
        dest = param.data.narrow(0, sum(self.local_sizes[:shard_id]), n)
        return _check_copy(dest, _full(loaded, 0, self.output_sizes[shard_id]).narrow(0, self.tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one GEMM, split by heads. With more ranks than KV heads, each KV head is replicated on
    tp / num_kv_heads ranks (every rank needs the KV heads its query heads attend to). KV heads that do not divide
    evenly go whole, with their query heads, as evenly as they can (SmolLM2's 3 KV heads on 2 ranks: 2 and 1);
    the output projection then takes the same uneven slice (`o_proj_shard`)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp, r = tp_size(), tp_rank()
        self.head_dim, self.total_heads, self.total_kv_heads = head_dim, num_heads, num_kv_heads
        if tp >= num_kv_heads:
            _divide(tp, num_kv_heads, "the tensor-parallel size over KV heads")
            self.num_heads = _divide(num_heads, tp, "attention heads")  # per rank
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
            self.q_start, self.kv_start = r * self.num_heads, r // self.kv_replicas  # in heads
        else:  # whole KV groups per rank, the first num_kv_heads % tp ranks one more
            group = _divide(num_heads, num_kv_heads, "attention heads over KV heads")
            base, extra = divmod(num_kv_heads, tp)
            self.num_kv_heads, self.kv_replicas = base + (r < extra), 1
            self.kv_start = r * base + min(r, extra)
            self.num_heads, self.q_start = self.num_kv_heads * group, self.kv_start * group
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.split_sizes = [self.q_size, self.kv_size, self.kv_size]  # this rank's q, k, v columns
        self.o_proj_shard = (self.q_start * head_dim, self.q_size)  # this rank's input columns of o_proj
        self.full_out = (num_heads + 2 * num_kv_heads) * head_dim
        _ShardedLinear.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        full_q, full_kv = self.total_heads * self.head_dim, self.total_kv_heads * self.head_dim
        if shard_id is None:  # fused qkv in the checkpoint
            q, k, v = _full(loaded, 0, full_q + 2 * full_kv).split([full_q, full_kv, full_kv], dim=0)
            return sum(self.weight_loader(param, t, s) for t, s in ((q, "q"), (k, "k"), (v, "v")))
        if shard_id == "q":
            dest = param.data.narrow(0, 0, self.q_size)
            src = _full(loaded, 0, full_q).narrow(0, self.q_start * self.head_dim, self.q_size)
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            dest = param.data.narrow(0, offset, self.kv_size)
            src = _full(loaded, 0, full_kv).narrow(0, self.kv_start * self.head_dim, self.kv_size)
        return _check_copy(dest, src)


class RowParallelLinear(_ShardedLinear):
    """Input features split over ranks: each rank multiplies its slice, the partial sums are all-reduced.
    The bias is added once (by rank 0, before the reduce). input_shard: (first column, columns) of this rank
    where the split is not even (an attention output over unevenly split heads: QKVParallelLinear.o_proj_shard)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True,
                 input_shard: tuple[int, int] | None = None):
        self.reduce_results = reduce_results
        self.full_in = in_features
        if input_shard is None:
            n = _divide(in_features, tp_size(), "input features")
            input_shard = (tp_rank() * n, n)
        self.input_start = input_shard[0]
        super().__init__(input_shard[1], out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: not sharded
            return default_weight_loader(param, loaded)
        n = param.shape[1]
        return _check_copy(param.data, _full(loaded, 1, self.full_in).narrow(1, self.input_start, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return tp_all_reduce(y) if self.reduce_results and self.tp_size > 1 else y


def _vocab_shard(vocab: int) -> tuple[int, int]:
    """(first row, rows) of this rank's vocabulary slice; the last slice is padded with zero rows."""
    per = -(-vocab // tp_size())
    return tp_rank() * per, per


class VocabParallelEmbedding(nn.Embedding):
    """The embedding table split by vocabulary rows; a token's row lives on one rank, the others add zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.full_vocab = num_embeddings
        self.vocab_start, rows = _vocab_shard(num_embeddings)
        self.tp_size = tp_size()
        super().__init__(rows, embedding_dim)

    def weight_loader(self, param, loaded, shard_id=None) -> int:
        rows = min(param.shape[0], max(0, loaded.shape[0] - self.vocab_start))
        if loaded.shape[0] != self.full_vocab or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not fit the model's "
                             f"{(self.full_vocab, *param.shape[1:])}")
        if self.tp_size == 1 and loaded.dtype == param.dtype and loaded.device == param.device \
                and loaded.is_contiguous() and loaded._base is None:
            param.data = loaded  # the largest tensor of most models: take it as read rather than hold two copies
            return param.numel()
        param.data[rows:].zero_()
        _check_copy(param.data[:rows], loaded.narrow(0, self.vocab_start, rows))
        return param.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return tp_all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(nn.Linear):
    """The output projection split by vocabulary rows; each rank's logits are gathered into the full vocab."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.full_vocab = num_embeddings
        self.vocab_start, rows = _vocab_shard(num_embeddings)
        self.tp_size = tp_size()
        super().__init__(embedding_dim, rows, bias=False)

    weight_loader = VocabParallelEmbedding.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.tp_size == 1:
            return y
        return tp_all_gather_last_dim(y)[..., :self.full_vocab]


class _RowReduced(nn.Module):
    """A quantized row-parallel layer: this rank's partial product, then the all-reduce."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_all_reduce(self.inner(x))


class _VocabGathered(nn.Module):
    """A quantized vocab-parallel lm_head: this rank's logits, then every rank's gathered into the vocabulary."""

    def __init__(self, inner: nn.Module, full_vocab: int):
        super().__init__()
        self.inner, self.full_vocab = inner, full_vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_all_gather_last_dim(self.inner(x))[..., :self.full_vocab]


def keep_tp_semantics(original: nn.Module, replacement: nn.Module) -> nn.Module:
    """`replacement` (a quantized form of `original`, ember/layers/quantization.py) with original's tensor-parallel
    behaviour: a row-parallel layer adds its bias on rank 0 only and all-reduces, a vocab-parallel head gathers."""
    if getattr(original, "tp_size", 1) == 1:
        return replacement
    if isinstance(original, RowParallelLinear):
        if original.tp_rank != 0 and getattr(replacement, "bias", None) is not None:
            replacement.bias = None
        return _RowReduced(replacement) if original.reduce_results else replacement
    if isinstance(original, ParallelLMHead):
        return _VocabGathered(replacement, original.full_vocab)
    return replacement
