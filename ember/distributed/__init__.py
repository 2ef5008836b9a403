"""Tensor-parallel state: which rank this process is and the collectives layers call.

At tp=1 the collectives are no-ops. With --tp-size > 1 every rank process (ember/distributed/launcher.py) sets the
group with `set_tp_group` after `torch.distributed.init_process_group`, before building the model: the parallel
layers shard by `tp_rank()` when they are constructed. One process holds one rank.
"""
from __future__ import annotations

import contextlib

import torch

_tp_group = None  # a torch.distributed ProcessGroup when tp > 1
_cpu_group = None  # a gloo group over the same ranks for control messages (ember/distributed/driver.py)
_tp_rank, _tp_size = 0, 1
_ep_size = 1  # expert parallel: the tp ranks split into ep groups of experts, each tp/ep ranks wide


def set_tp_group(group, rank: int, size: int, cpu_group=None) -> None:
    global _tp_group, _tp_rank, _tp_size, _cpu_group
    _tp_group, _tp_rank, _tp_size, _cpu_group = group, rank, size, cpu_group


def set_ep_size(size: int) -> None:
    """--ep-size: each MoE layer's experts are split over `size` groups of tp/ep ranks (ember/layers/moe.py)."""
    global _ep_size
    if size < 1 or _tp_size % size:
        raise ValueError(f"--ep-size {size} must divide --tp-size {_tp_size}")
    _ep_size = size


def current_state() -> tuple:
    return _tp_group, _tp_rank, _tp_size, _cpu_group, _ep_size


@contextlib.contextmanager
def bound_state(state: tuple):
    """Run with a tp state (from current_state()) and restore the previous one after: the process that drives
    ranks (rank 0, which may be a test process holding a tp=1 engine too) binds its engine's state around the
    model's construction and each forward."""
    global _tp_group, _tp_rank, _tp_size, _cpu_group, _ep_size
    saved = current_state()
    _tp_group, _tp_rank, _tp_size, _cpu_group, _ep_size = state
    try:
        yield
    finally:
        _tp_group, _tp_rank, _tp_size, _cpu_group, _ep_size = saved


def tp_group():
    return _tp_group


def cpu_group():
    return _cpu_group


def ep_size() -> int:
    return _ep_size


def ep_rank() -> int:
    """Which slice of the experts this rank holds (ranks r*tp/ep .. (r+1)*tp/ep - 1 hold slice r)."""
    return _tp_rank // (_tp_size // _ep_size)


def moe_tp_size() -> int:
    """Ranks that split each expert's intermediate dimension: tp / ep."""
    return _tp_size // _ep_size


def moe_tp_rank() -> int:
    return _tp_rank % (_tp_size // _ep_size)


def tp_rank() -> int:
    return _tp_rank


def tp_size() -> int:
    return _tp_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size == 1:
        return x
    import torch.distributed as dist
    dist.all_reduce(x, group=_tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's slice of the last dimension (vocab-parallel logits)."""
    if _tp_size == 1:
        return x
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(_tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_tp_group)
    return torch.cat(parts, dim=-1)


def tp_min_int(n: int) -> int:
    """The smallest of every rank's `n` (KV pages: every rank must hold the pages the one scheduler hands out)."""
    if _tp_size == 1:
        return n
    import torch.distributed as dist
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_cpu_group)
    return int(t.item())
