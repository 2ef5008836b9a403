"""Batched sampling: every request's parameters become a row of a tensor, applied in one pass.

Order (as in vLLM/SGLang): logit_bias, min_tokens (ban EOS), penalties (ember/engine/penalties.py), temperature,
then the truncations top_k / top_p / min_p / top_a on probabilities, then a draw. Greedy rows take the argmax.
Seeded rows draw from their own generator so a seeded request gives the same tokens whatever else is
in the batch. Work that no request in the batch asks for is skipped.
"""
from __future__ import annotations

import torch

from ember.engine.penalties import PenaltyCounts, penalize_seen
from ember.engine.request import Req
from ember.host_to_device import device_column, device_tensor


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device, device_penalties: bool | None = None):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        if device_penalties is None:  # (on CPU the host form is the faster one)
            device_penalties = str(device).startswith("cuda")
        self.penalties = PenaltyCounts(vocab_size, device) if device_penalties else None

    def _col(self, values, dtype=torch.float32):
        return device_column(values, self.device, dtype)

    def apply_penalties_and_bias(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """logits with logit_bias, min_tokens and the penalties applied: a copy when any applies, else logits itself
        (greedy rows with nothing to apply need no [B, V] copy)."""
        B, V = logits.shape
        sps = [r.sampling for r in reqs]
        bias = any(sp.logit_bias for sp in sps)
        ban = [i for i, (r, sp) in enumerate(zip(reqs, sps)) if r.num_output < sp.min_new_tokens]
        counted = any(sp.frequency_penalty or sp.presence_penalty for sp in sps)
        repetition = any(sp.repetition_penalty != 1.0 for sp in sps)
        if not (bias or ban or counted or repetition):
            return logits
        logits = logits.clone()
        if bias:
            rows, cols, vals = [], [], []
            for i, sp in enumerate(sps):
                for tok, bias in sp.logit_bias.items():
                    if tok < V:
                        rows.append(i), cols.append(tok), vals.append(bias)
            flat = device_tensor([r * V + c for r, c in zip(rows, cols)], logits.device)
            logits.view(-1).index_add_(0, flat, device_tensor(vals, logits.device, logits.dtype))
        if ban:
            stop_ids = set(self.eos_token_ids)
            flat = [i * V + t for i in ban for t in stop_ids | set(sps[i].stop_token_ids) if t < V]
            logits.view(-1).index_fill_(0, device_tensor(flat, logits.device, torch.long), float("-inf"))
        if counted or repetition:  # (ember/engine/penalties.py: on the device, or at the seen tokens' indices)
            if self.penalties is not None and all(isinstance(r, Req) for r in reqs):
                # (not a request that finished at the step overlap just read, grammars: its row is dropped)
                rows = [i for i, (r, sp) in enumerate(zip(reqs, sps)) if sp.penalized and not r.finished]
                if rows:
                    self.penalties.apply(logits, [reqs[i] for i in rows], rows)
            else:
                penalize_seen(logits, reqs, counted, repetition)
        return logits

    def sample(self, logits: torch.Tensor, reqs: list[Req], grammar_mask=None):
        """logits: [B, V] float32 (raw model output). Returns (next_ids [B] list, logprob info or None).
        grammar_mask: (packed bitmask, rows) from GrammarBackend.bitmask, applied after the penalties."""
        next_ids = self.sample_ids(logits, reqs, grammar_mask).tolist()  # (the step's one device sync)
        logprob_info = None
        if any(r.sampling.logprobs is not None for r in reqs):
            logprob_info = self.logprobs(logits, next_ids, [r.sampling.logprobs for r in reqs])
        return next_ids, logprob_info

    def sample_ids(self, logits: torch.Tensor, reqs: list[Req], grammar_mask=None) -> torch.Tensor:
        """The sampled token ids [B], left on the logits' device (nothing here waits for the device)."""
        raw = logits
        logits = self.apply_penalties_and_bias(raw, reqs)
        if grammar_mask is not None:
            from ember.engine.grammar import GrammarBackend
            if logits is raw:  # (the mask writes into it: logprobs read raw)
                logits = raw.clone()
            GrammarBackend.apply(logits, grammar_mask)
        sps = [r.sampling for r in reqs]
        next_ids = logits.max(dim=-1).indices  # = argmax (the first of equal maxima), 2.5x faster on CPU
        if not all(sp.greedy for sp in sps):  # (decided on the host: no device sync before the one below)
            greedy = device_tensor([sp.greedy for sp in sps], logits.device)
            temps = self._col([sp.temperature if not sp.greedy else 1.0 for sp in sps])
            probs, token_ids = self.candidates(torch.softmax(logits / temps, dim=-1), sps)
            sampled = self._draw(probs, token_ids, reqs)
            next_ids = torch.where(greedy, next_ids, sampled)
        return next_ids

    def candidates(self, probs: torch.Tensor, sps) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncate by top_k / top_p / min_p / top_a. Returns (probs [B, W], token ids [B, W]): W = V in
        vocabulary order, or, when sorting is needed, the sorted candidates (only the top max(top_k) when
        every sampling row has a top_k: a partial sort instead of sorting the whole vocabulary)."""
        B, V = probs.shape
        ks = [1 if sp.greedy else (min(sp.top_k, V) if sp.top_k > 0 else V) for sp in sps]  # (top_k > V: all)
        token_ids = torch.arange(V, device=probs.device).expand(B, V)
        if any(sp.top_k > 0 or sp.top_p < 1.0 for sp in sps if not sp.greedy):
            K = max(ks)
            probs, token_ids = probs.topk(K, dim=-1) if K < V else probs.sort(dim=-1, descending=True)
            ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
            top_p = self._col([sp.top_p for sp in sps])
            cum = probs.cumsum(dim=-1)
            drop = (ranks >= self._col(ks, torch.long)) | ((cum - probs) > top_p)  # smallest set reaching top_p
            drop[:, 0] = False
            probs = probs.masked_fill(drop, 0.0)
        if any(sp.min_p > 0 or sp.top_a > 0 for sp in sps):
            pmax = probs.max(dim=-1, keepdim=True).values
            min_p = self._col([sp.min_p for sp in sps])
            top_a = self._col([sp.top_a for sp in sps])
            threshold = torch.maximum(min_p * pmax, top_a * pmax * pmax)
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs, token_ids

    def _draw(self, probs: torch.Tensor, token_ids: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """Exponential-race sampling (argmax p / E, E ~ Exp(1)), equivalent to multinomial. A seeded row's
        noise for a token is a hash of (seed, position, token id): the same whatever else is in the batch,
        however the candidates are ordered, and after a preemption."""
        noise = torch.empty_like(probs).exponential_()
        seeded = [i for i, r in enumerate(reqs) if r.sampling.seed is not None and not r.sampling.greedy]
        if seeded:
            rows = device_tensor(seeded, probs.device)
            seeds = device_tensor([reqs[i].sampling.seed for i in seeded], probs.device).unsqueeze(1)
            positions = device_tensor([reqs[i].num_output for i in seeded], probs.device).unsqueeze(1)
            u = _hash_uniform(seeds, positions, token_ids[rows])
            noise[rows] = -torch.log(u).to(noise.dtype)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        return token_ids.gather(1, choice).squeeze(1)

    @staticmethod
    def logprobs(raw: torch.Tensor, next_ids, top_ns: list[int | None]):
        """Per row: (logprob of the chosen token, [(id, logprob)] top-n), from the raw distribution."""
        return Sampler.logprob_lists(*Sampler.logprobs_on_device(raw, next_ids, top_ns), top_ns)

    @staticmethod
    def logprobs_on_device(raw: torch.Tensor, next_ids, top_ns: list[int | None]):
        """(chosen token's logprob [B], top-n logprobs [B, k], their ids [B, k]) on raw's device, k the largest n
        (None when no row asks for alternatives); next_ids: a list or a tensor on the device."""
        lp = torch.log_softmax(raw.float(), dim=-1)
        k = max(n or 0 for n in top_ns)
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        ids = next_ids if isinstance(next_ids, torch.Tensor) else torch.tensor(next_ids, device=lp.device)
        return lp.gather(1, ids.long().unsqueeze(1)).squeeze(1), top_v, top_i

    @staticmethod
    def logprob_lists(chosen: torch.Tensor, top_v, top_i, top_ns: list[int | None]):
        """logprobs_on_device's tensors (read here) -> per row: (logprob of the chosen token, [(id, logprob)])."""
        chosen = chosen.tolist()
        top_v, top_i = (top_v.tolist(), top_i.tolist()) if top_v is not None else (None, None)
        out = []
        for i, n in enumerate(top_ns):
            if n is None:
                out.append(None)
                continue
            out.append((chosen[i], list(zip(top_i[i][:n], top_v[i][:n])) if n else []))
        return out


_MASK32 = 0xFFFFFFFF


def _hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) numbers from a counter-based hash (murmur3's finalizer) of (seed, position, token):
    vectorized, stateless and deterministic. Products wrap in int64; only the low 32 bits are kept."""
    x = (token_ids * 0x9E3779B1 + seeds * 0x85EBCA77 + positions * 0xC2B2AE3D + 0x165667B1) & _MASK32
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x85EBCA6B) & _MASK32
        x = x ^ (x >> 13)
        x = (x * 0xC2B2AE35) & _MASK32
        x = x ^ (x >> 16)
    return (x.double() + 0.5) / 2.0 ** 32
