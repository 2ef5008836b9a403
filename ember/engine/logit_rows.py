"""Which rows of a step's tokens get logits when some requests want all of theirs (prompt logprobs, speculative
verify): every row of those, the last row of the others; and the split of the result back per request."""
from __future__ import annotations

import torch


def logit_rows(extend_lens, full_rows) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """(token indices to compute logits at, {request: (first, end) of its rows among them})."""
    index, spans, end = [], {}, 0
    for i, (n, full) in enumerate(zip(extend_lens, full_rows)):
        end += n
        start = len(index)
        index.extend(range(end - n, end) if full else [end - 1])
        spans[i] = (start, len(index))
    return index, spans


def split_rows(logits: torch.Tensor, spans: dict, full_rows) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(each request's last row [B, V], {request: all its rows} for those that asked)."""
    last = logits[torch.tensor([b - 1 for _, b in spans.values()], device=logits.device)]
    return last, {i: logits[a:b] for i, (a, b) in spans.items() if full_rows[i]}
