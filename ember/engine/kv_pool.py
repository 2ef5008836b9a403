"""The KV cache: fixed-size pages from one preallocated pool per layer group.

A request owns a page table (list of page ids) per group; the slot of token position `p` is
`page_table[p // page_size] * page_size + p % page_size`. Page 0 is never handed out: padding slots point
at it. Models with sliding-window layers get a second group ("swa") whose pages are returned as soon as
they fall out of the window, so those layers never hold more than the window per request.
"""
from __future__ import annotations

import math
import mmap

import torch


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"KV pool too small: {num_pages} pages")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # page 0 is the padding page

    @property
    def total(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        return pages

    def free(self, pages) -> None:
        self._free.extend(p for p in pages if p > 0)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero KV tensor. On CPU it lies in anonymous mapped memory, which the kernel zeroes page by page on first
    write: the pool takes memory as its pages are used (allocation is LIFO from the low pages), not all at start
    (torch.zeros writes every byte: Qwen2.5-0.5B's 32k-token pool is 768 MB resident before any request)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)  # (the tensor keeps the map alive)


LayerShape = tuple[int, int, int]  # (kv heads, key dim, value dim) per token; MLA: (1, latent + rope dim, 0)


class KVCache:
    def __init__(self, groups: dict[str, list[int]], pages_per_group: dict[str, int], page_size: int,
                 layer_shapes: dict[int, LayerShape], dtype: torch.dtype, device):
        self.page_size = page_size
        self.allocators = {g: PageAllocator(pages_per_group[g]) for g in groups}
        self.layer_group = {layer: g for g, layers in groups.items() for layer in layers}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for layer, g in self.layer_group.items():
            slots = pages_per_group[g] * page_size
            heads, k_dim, v_dim = layer_shapes[layer]
            self.k[layer] = _zeros((slots, heads, k_dim), dtype, device)
            self.v[layer] = _zeros((slots, heads, v_dim), dtype, device)

    @staticmethod
    def bytes_per_token(shapes: list[LayerShape], dtype: torch.dtype) -> int:
        """KV bytes one token takes in the layers of `shapes`."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(heads * (k_dim + v_dim) for heads, k_dim, v_dim in shapes) * size

    def layer(self, layer_id: int):
        return self.k[layer_id], self.v[layer_id]

    @property
    def groups(self) -> list[str]:
        return list(self.allocators)
