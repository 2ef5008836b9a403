"""Verification of draft tokens: the target's logits at every drafted position, sampled as without speculation.

Every drafter here proposes deterministically (argmax of a draft model, an n-gram continuation), so the draft
distribution q is one-hot. Rejection sampling then accepts draft d with probability min(1, p(d) / 1) = p(d) and
on rejection resamples from the residual max(0, p - q) / Z = p without d: exactly the law of "sample the
target's token t ~ p at this position and accept iff t == d, else emit t". We do the latter with the engine's
own sampler, row by row, each row seeing the request as it would be after the drafts before it (penalties,
min_tokens, grammar state, the seeded noise of that output position). So acceptance is lossless, greedy is the
argmax (exact), and a seeded request even draws the very same tokens as with speculation off.
`rejection_sample` below is the general rule (non-one-hot q) for drafters that sample.
"""
from __future__ import annotations

import torch

from ember.engine.request import OutputTokens


class DraftView(OutputTokens):
    """A request as the sampler sees it after `extra` more output tokens (the drafts before a verified row)."""
    __slots__ = ("sampling", "token_ids", "prompt_ids", "grammar")

    def __init__(self, req, extra: list[int]):
        self.sampling = req.sampling
        self.prompt_ids = req.prompt_ids
        self.token_ids = req.token_ids + extra if extra else req.token_ids
        self.grammar = req.grammar


def grammar_rows(grammar_backend, req, drafts: list[int]):
    """Bitmask rows for a constrained request at each verified position (after drafts[:j]), then the matcher is
    rolled back to where it was. Rows after a draft the grammar refuses stay all-allowed: they are never used
    (that draft cannot be accepted, so acceptance stops there)."""
    import xgrammar as xgr
    m = req.grammar
    mask = xgr.allocate_token_bitmask(len(drafts) + 1, grammar_backend.vocab_size)
    advanced = 0
    for j in range(len(drafts) + 1):
        if m.is_terminated():
            break
        m.fill_next_token_bitmask(mask, j)
        if j == len(drafts) or not m.accept_token(drafts[j]):
            break
        advanced += 1
    if advanced:
        m.rollback(advanced)
    return mask


def accept_length(sampled: list[int], drafts: list[int]) -> int:
    """How many drafts the target's own samples confirm (the first mismatch ends it)."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator=None) -> tuple[int, int]:
    """The general lossless rule for one request: p [k+1, V] target probabilities, q [k, V] draft probabilities,
    drafts [k]. Accept draft i with probability min(1, p_i(d) / q_i(d)); at the first rejection sample from
    max(0, p_i - q_i) normalized; if all are accepted, sample the bonus from p_k. Returns (accepted, next token)."""
    k = drafts.shape[0]
    for i in range(k):
        d = int(drafts[i])
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, d] <= p[i, d]:  # u < p/q without dividing by a zero q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))
