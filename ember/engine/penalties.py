"""Frequency, presence and repetition penalties, in two forms of one rule.

The rule (OpenAI's and CTRL's): a logit drops by frequency x (times the token came out) + presence (once it has),
then, for a token of the prompt or the output, a positive logit is divided by repetition and a negative one
multiplied. Tokens never seen keep their logit.

- `penalize_seen`, the host form: each step the distinct (row, token) pairs of the rows' token lists are counted on
  the host and only those logits are touched. The cheaper form when the device is the CPU, where [B, V] passes over
  a 150k vocabulary are slow (repetition penalty, 300 tokens a row, 2 cores: 2.0 ms a step at 16 rows against the
  device form's 13.8, 8 at 64 against 105), and the one for rows that are not requests (speculative draft views).
- `PenaltyCounts`, the device form (SGLang's penalizers; the default on CUDA): each request's output-token counts
  and prompt tokens live as rows of [slots, V] tensors on the device, brought up to date each step by adding the
  tokens appended since the last one, and a step's tokens that the host has not read yet (overlap scheduling) are
  added on the device. The host sends B slot numbers a step instead of every token so far, and the overlap
  scheduler can take penalty requests: with Qwen2.5's generation_config (repetition_penalty 1.05, the default
  under --sampling-defaults model) that is every request.
"""
from __future__ import annotations

from itertools import chain

import torch

from ember.host_to_device import device_column, device_tensor


def frequency_presence(vals: torch.Tensor, counts: torch.Tensor, freq: torch.Tensor, pres: torch.Tensor):
    return vals - (freq * counts + pres * (counts > 0))


def repetition(vals: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    return torch.where(vals > 0, vals / rep, vals * rep)


def penalize_seen(logits: torch.Tensor, reqs, counted: bool, repeated: bool) -> None:
    """The host form, in place on logits [B, V]: the penalties at the flat indices of the tokens each row has seen
    (index_select / index_copy_, far cheaper than advanced indexing on CPU)."""
    V, sps, flat_logits = logits.shape[1], [r.sampling for r in reqs], logits.view(-1)
    if counted:
        flat, rows, counts = _seen_tokens([r.output_ids for r in reqs], V, logits.device)
        freq = torch.tensor([sp.frequency_penalty for sp in sps], device=logits.device)[rows]
        pres = torch.tensor([sp.presence_penalty for sp in sps], device=logits.device)[rows]
        flat_logits.index_copy_(0, flat, frequency_presence(flat_logits.index_select(0, flat), counts, freq, pres))
    if repeated:
        flat, rows, _ = _seen_tokens([r.token_ids for r in reqs], V, logits.device)
        rep = torch.tensor([sp.repetition_penalty for sp in sps], device=logits.device)[rows]
        flat_logits.index_copy_(0, flat, repetition(flat_logits.index_select(0, flat), rep))


def _seen_tokens(id_lists: list[list[int]], V: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each distinct (row, token id < V) pair in id_lists as (flat index row * V + token, row, count), counted
    by torch (a Counter per row each step cost ~2 ms at 16 rows of 300 tokens)."""
    lens = torch.tensor([len(ids) for ids in id_lists], dtype=torch.long)
    ids = torch.tensor(list(chain.from_iterable(id_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), lens)
    keep = ids < V
    flat, counts = torch.unique(rows[keep] * V + ids[keep], return_counts=True)
    return flat.to(device), (flat // V).to(device), counts.float().to(device)


class PenaltyCounts:
    """The device form: a slot per request that has penalties, held until it finishes.

    `counted[req]` is how many of req.token_ids its slot holds; tokens appended since are added at its next step.
    `record` adds a launched step's tokens on the device and counts the placeholder the request gets for it (overlap
    scheduling), so the real token that later replaces it is not added twice. Token lists that shrank (a
    speculative rollback) rebuild the slot."""

    def __init__(self, vocab_size: int, device):
        self.V, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, device=device)  # output tokens, per slot
        self.prompt_seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # prompt tokens, per slot
        self.slots: dict = {}  # req -> slot
        self.counted: dict = {}  # req -> tokens of req.token_ids in its slot
        self.free: list[int] = []

    def apply(self, logits: torch.Tensor, reqs, rows: list[int]) -> None:
        """In place on logits [B, V]: the penalties of reqs[i] (Req objects) on row rows[i], from its slot."""
        self._update(reqs)
        sps = [r.sampling for r in reqs]
        slots = device_tensor([self.slots[r] for r in reqs], self.device)
        every = rows == list(range(logits.shape[0]))
        index = None if every else device_tensor(rows, self.device)
        vals = logits if every else logits.index_select(0, index)
        counts = self.counts.index_select(0, slots)
        if any(sp.frequency_penalty or sp.presence_penalty for sp in sps):
            vals = frequency_presence(vals, counts, device_column([sp.frequency_penalty for sp in sps], self.device),
                                      device_column([sp.presence_penalty for sp in sps], self.device))
        if any(sp.repetition_penalty != 1.0 for sp in sps):
            seen = self.prompt_seen.index_select(0, slots) | (counts > 0)
            rep = device_column([sp.repetition_penalty for sp in sps], self.device)
            vals = torch.where(seen, repetition(vals, rep), vals)
        if every:
            logits.copy_(vals)
        else:
            logits.index_copy_(0, index, vals)

    def record(self, reqs, ids: torch.Tensor) -> None:
        """A launched step's tokens (ids [B] on the device, not read by the host yet) join the slots of the rows
        that have one; the placeholder each request gets next is then already counted."""
        rows = [i for i, r in enumerate(reqs) if r in self.slots]
        if not rows:
            return
        slots = device_tensor([self.slots[reqs[i]] for i in rows], self.device)
        flat = slots * self.V + ids[device_tensor(rows, self.device)].long()
        self.counts.view(-1).index_add_(0, flat, torch.ones(len(rows), device=self.device))
        for i in rows:
            self.counted[reqs[i]] = len(reqs[i].token_ids) + 1

    def _update(self, reqs) -> None:
        for req in [r for r in self.slots if r.finished]:
            self.free.append(self.slots.pop(req))
            del self.counted[req]
        adds, seen = [], []
        for req in reqs:
            slot, start = self.slots.get(req), self.counted.get(req, 0)
            if slot is None or len(req.token_ids) < start:  # new, or rolled back: rebuilt from its tokens
                if slot is None:
                    slot = self.slots[req] = self._take_slot()
                self.counts[slot].zero_()
                self.prompt_seen[slot].zero_()
                n = len(req.prompt_ids)
                seen += [slot * self.V + t for t in req.token_ids[:n] if t < self.V]  # (image placeholders: >= V)
                start = n
            adds += [slot * self.V + t for t in req.token_ids[start:] if t < self.V]
            self.counted[req] = len(req.token_ids)
        if seen:
            self.prompt_seen.view(-1).index_fill_(0, device_tensor(seen, self.device), True)
        if adds:
            ones = torch.ones(len(adds), device=self.device)
            self.counts.view(-1).index_add_(0, device_tensor(adds, self.device), ones)

    def _take_slot(self) -> int:
        if not self.free:  # grow by doubling
            n = self.counts.shape[0]
            grow = max(n, 4)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.V)])
            self.prompt_seen = torch.cat([self.prompt_seen, self.prompt_seen.new_zeros(grow, self.V)])
            self.free = list(range(n + grow - 1, n - 1, -1))
        return self.free.pop()
