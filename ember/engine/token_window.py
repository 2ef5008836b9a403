"""A window of a request's token ids, indexed by absolute position like Req.token_ids: what travels to the other
ranks of a tensor-parallel engine (ember/distributed/driver.py) instead of the whole list, and how an MTP draft step
reads its tokens shifted by k + 1 positions (ember/speculative/mtp.py)."""
from __future__ import annotations


class TokenWindow:
    """token_ids[offset:] of a longer list; window[i] is ids[i - offset], len() the full list's length. A negative
    index counts from the end, as on a list."""
    __slots__ = ("offset", "ids")

    def __init__(self, offset: int, ids: list[int]):
        self.offset, self.ids = offset, ids

    def __len__(self) -> int:
        return self.offset + len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            if i.step is not None:
                raise IndexError("a TokenWindow slice takes no step")
            start = self.offset if i.start is None else i.start
            stop = len(self) if i.stop is None else i.stop
            if start < self.offset:
                raise IndexError(f"position {start} is before the window (it starts at {self.offset})")
            return self.ids[start - self.offset:max(stop - self.offset, 0)]
        if i < 0:
            return self.ids[i]
        if i < self.offset:
            raise IndexError(f"position {i} is before the window (it starts at {self.offset})")
        return self.ids[i - self.offset]
