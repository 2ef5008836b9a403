"""What a request carries for its images and videos from the API process to the engine (pickled over ZMQ:
numpy arrays, no tensors), and the prefix-cache keys of their placeholder tokens."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# Placeholder tokens are keyed in the prefix cache by an id past any vocabulary, derived from the item's
# content hash: two different images never share KV, the same image reused hits the cache.
KEY_BASE = 1 << 40


@dataclass
class MMItem:
    kind: str  # "image" | "video"
    offset: int  # index of its first token in the prompt
    length: int  # tokens it spans
    data: dict  # processor outputs for this item alone (numpy), e.g. pixel_values + grid_thw
    # span-relative indices of the tokens that take its embedding rows, in order (None: every token of the
    # span; Step3p7 interleaves <patch_start>/<patch_end>/<patch_newline> text tokens with the rows)
    embed_index: np.ndarray | None = None
    digest: bytes = b""  # content hash (of the processed pixels)
    embeds: object = None  # engine side: the encoder's output, computed once, dropped after prefill

    def __post_init__(self):
        if not self.digest:
            h = hashlib.blake2b(digest_size=16)
            h.update(self.kind.encode())
            for k in sorted(self.data):
                a = np.ascontiguousarray(self.data[k])
                h.update(k.encode() + str(a.shape).encode() + a.tobytes())
            self.digest = h.digest()

    @property
    def key_id(self) -> int:
        return KEY_BASE + int.from_bytes(self.digest[:5], "little")

    def __getstate__(self):  # the embeddings never travel
        return {k: v for k, v in self.__dict__.items() if k != "embeds"} | {"embeds": None}


@dataclass
class MultimodalInputs:
    items: list[MMItem] = field(default_factory=list)
    mrope_positions: np.ndarray | None = None  # [3, prompt_len] (M-RoPE models)
    mrope_delta: int = 0  # position of generated token i = prompt_len + i + delta

    def keyed_ids(self, prompt_ids: list[int]) -> list[int]:
        """The prompt with every placeholder token replaced by its item's key id (what the radix cache sees)."""
        ids = list(prompt_ids)
        for it in self.items:
            idx = range(it.length) if it.embed_index is None else it.embed_index
            for i in idx:
                ids[it.offset + int(i)] = it.key_id
        return ids

    @property
    def num_media_tokens(self) -> int:  # (the tokens each item spans, its structural tokens included)
        return sum(it.length for it in self.items)
