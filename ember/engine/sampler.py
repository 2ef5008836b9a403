"""Batched sampling: every request's parameters become a row of a tensor, applied in one pass.

Order (as in vLLM/SGLang): logit_bias, min_tokens (ban EOS), penalties, temperature, then the
truncations top_k / top_p / min_p / top_a on probabilities, then a draw. Greedy rows take the argmax.
Seeded rows draw from their own generator so a seeded request gives the same tokens whatever else is
in the batch. Work that no request in the batch asks for is skipped.
"""
from __future__ import annotations

import torch

from ember.engine.request import Req


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device

    def _col(self, values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=self.device).unsqueeze(1)

    def apply_penalties_and_bias(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        B, V = logits.shape
        sps = [r.sampling for r in reqs]
        if any(sp.logit_bias for sp in sps):
            rows, cols, vals = [], [], []
            for i, sp in enumerate(sps):
                for tok, bias in sp.logit_bias.items():
                    if tok < V:
                        rows.append(i), cols.append(tok), vals.append(bias)
            logits[rows, cols] += torch.tensor(vals, device=logits.device)
        ban = [i for i, (r, sp) in enumerate(zip(reqs, sps)) if r.num_output < sp.min_new_tokens]
        if ban:
            stop_ids = set(self.eos_token_ids)
            for i in ban:
                banned = list(stop_ids | set(sps[i].stop_token_ids))
                logits[i, banned] = float("-inf")
        if any(sp.frequency_penalty or sp.presence_penalty for sp in sps):
            counts = self._token_counts([r.output_ids for r in reqs], V, logits.device)
            freq = self._col([sp.frequency_penalty for sp in sps])
            pres = self._col([sp.presence_penalty for sp in sps])
            logits -= freq * counts + pres * (counts > 0).float()
        if any(sp.repetition_penalty != 1.0 for sp in sps):
            seen = self._token_counts([r.token_ids for r in reqs], V, logits.device) > 0
            rep = self._col([sp.repetition_penalty for sp in sps]).expand(B, V)
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        return logits

    @staticmethod
    def _token_counts(id_lists: list[list[int]], V: int, device) -> torch.Tensor:
        B = len(id_lists)
        longest = max((len(x) for x in id_lists), default=0)
        counts = torch.zeros(B, V + 1, device=device)
        if longest:
            idx = torch.full((B, longest), V, dtype=torch.long)  # column V collects the padding
            for i, ids in enumerate(id_lists):
                idx[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            counts.scatter_add_(1, idx.to(device), torch.ones(B, longest, device=device))
        return counts[:, :V]

    def sample(self, logits: torch.Tensor, reqs: list[Req], grammar_mask=None):
        """logits: [B, V] float32 (raw model output). Returns (next_ids [B] list, logprob info or None).
        grammar_mask: (packed bitmask, rows) from GrammarBackend.bitmask, applied after the penalties."""
        raw = logits
        logits = self.apply_penalties_and_bias(logits.clone(), reqs)
        if grammar_mask is not None:
            from ember.engine.grammar import GrammarBackend
            GrammarBackend.apply(logits, grammar_mask)
        sps = [r.sampling for r in reqs]
        greedy = torch.tensor([sp.greedy for sp in sps], device=logits.device)
        next_ids = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            temps = self._col([sp.temperature if not sp.greedy else 1.0 for sp in sps])
            probs = torch.softmax(logits / temps, dim=-1)
            probs = self._truncate(probs, sps)
            sampled = self._draw(probs, reqs)
            next_ids = torch.where(greedy, next_ids, sampled)
        next_ids = next_ids.tolist()
        logprob_info = None
        if any(sp.logprobs is not None for sp in sps):
            logprob_info = self.logprobs(raw, next_ids, [sp.logprobs for sp in sps])
        return next_ids, logprob_info

    def _truncate(self, probs: torch.Tensor, sps) -> torch.Tensor:
        need_sort = any(sp.top_k > 0 or sp.top_p < 1.0 for sp in sps)
        if need_sort:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
            top_k = self._col([sp.top_k if sp.top_k > 0 else probs.shape[-1] for sp in sps], torch.long)
            top_p = self._col([sp.top_p for sp in sps])
            cum = sorted_p.cumsum(dim=-1)
            drop = (ranks >= top_k) | ((cum - sorted_p) > top_p)  # keep the smallest set reaching top_p
            drop[:, 0] = False
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        if any(sp.min_p > 0 or sp.top_a > 0 for sp in sps):
            pmax = probs.max(dim=-1, keepdim=True).values
            min_p = self._col([sp.min_p for sp in sps])
            top_a = self._col([sp.top_a for sp in sps])
            threshold = torch.maximum(min_p * pmax, top_a * pmax * pmax)
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _draw(self, probs: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """Exponential-race sampling (argmax p / E, E ~ Exp(1)), equivalent to multinomial."""
        noise = torch.empty_like(probs).exponential_()
        for i, r in enumerate(reqs):
            sp = r.sampling
            if sp.seed is not None and not sp.greedy:
                # seeded by (seed, position): reproducible alone, in any batch, and after preemption
                g = torch.Generator(device="cpu").manual_seed((sp.seed * 1_000_003 + r.num_output) % (2 ** 63))
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=g).to(probs.device)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def logprobs(raw: torch.Tensor, next_ids: list[int], top_ns: list[int | None]):
        """Per row: (logprob of the chosen token, [(id, logprob)] top-n), from the raw distribution."""
        lp = torch.log_softmax(raw.float(), dim=-1)
        k = max(n or 0 for n in top_ns)
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        chosen = lp.gather(1, torch.tensor(next_ids, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
        out = []
        for i, n in enumerate(top_ns):
            if n is None:
                out.append(None)
                continue
            tops = list(zip(top_i[i, :n].tolist(), top_v[i, :n].tolist())) if n else []
            out.append((chosen[i], tops))
        return out
