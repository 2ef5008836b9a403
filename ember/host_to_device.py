"""Host data to the device, and device results to the host, without waiting for the device.

`tensor.to("cuda")` from ordinary (pageable) memory makes PyTorch synchronize the stream after the copy: the host
waits for every kernel queued before it. Per step the batch builder, the attention backends and the sampler copy a
dozen small tensors up, so each of those waits would stall the host behind the step in flight and undo overlap
scheduling (ember/engine/overlap.py). From pinned memory with non_blocking=True the copy is queued like a kernel
(PyTorch's pinned-memory cache keeps the source alive until it has run). The other way, `to_host` queues a copy
into pinned memory that the host reads once an event says it has run. On CPU these are plain tensors.
"""
from __future__ import annotations

import array

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` (queued, not waited for, on CUDA)."""
    if not str(device).startswith("cuda"):
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A device tensor's copy into pinned host memory, queued behind the work before it; read it once that work is
    done (a CUDA event: ember/engine/overlap.py). A CPU tensor is returned as it is."""
    if t is None or not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def device_tensor(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), by to_device."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def device_ints(values: list[int], device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """device_tensor for a flat list of Python ints, through an array.array: ~3.5x faster than torch.tensor on the
    thousands of page ids a decode step sends up (315 vs 90 us for 5,632 ints on the session-18 CPU)."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    return to_device(torch.frombuffer(array.array(_ARRAY_CODES[dtype], values), dtype=dtype), device)


_ARRAY_CODES = {torch.int32: "i", torch.int64: "q"}


def device_column(values, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One value per row as a [B, 1] column on `device` (per-request sampling parameters against [B, V] rows)."""
    return device_tensor(values, device, dtype).unsqueeze(1)
