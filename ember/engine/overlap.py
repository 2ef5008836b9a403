"""Overlap scheduling (SGLang's overlap scheduler): the host launches decode step N+1 before it reads step N's
tokens, so on a GPU the host's work around a step (scheduling, building the batch, detokenizing, stop checks,
streaming) runs while the device computes, instead of the device idling through it.

How: a launched step's sampled tokens stay on the device, with a copy to the host enqueued right behind them;
each request gets the placeholder -(row + 1) as its next token, and the next step's input ids take the device's
tokens in place of placeholders (`ModelRunner.future_ids`). Once step N+1 is launched, step N's tokens are read
(waiting for step N alone) and go through the per-token path the engine uses without overlap
(`EngineCore._append_token`, at the placeholder's index). A request that finished at step N was already scheduled
into N+1: its row there is dropped and its KV for it is never used.

Only plain decode steps overlap (`plain`): one token per request, no thinking budget about to be spent, no
speculative decoding; grammars with the step before read once the forward is launched (their masks need its
tokens: SGLang's delayed sampling); penalties when their counts are kept on the device (on CUDA,
ember/engine/penalties.py: the host form reads the tokens so far); logprobs are computed on the device and read
with the tokens; images and video need nothing more at decode (M-RoPE positions do not depend on the tokens).
Any other step first resolves the step in flight and runs as before. On by default on CUDA at tp 1
(`--disable-overlap-schedule`); off on CPU, where the forward runs on the host and there is nothing to overlap (the
tests turn it on there to check that the tokens are the same).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.io_struct import TokenOut
from ember.engine.request import Req
from ember.engine.sampler import Sampler
from ember.host_to_device import to_host


@dataclass
class InFlight:
    """A launched step: its requests, the index of each one's placeholder in its token_ids, its sampled tokens on
    the device, and host copies of them and of their logprobs when asked (host_to_device.to_host), ready once
    `event` has passed (None on CPU, where they are ready at once)."""
    reqs: list[Req]
    index: list[int]
    device_ids: torch.Tensor
    host_ids: torch.Tensor
    logprobs: tuple | None = None  # Sampler.logprob_lists' arguments: the three tensors and the rows' top-n counts
    event: object = None

    def read(self) -> tuple[list[int], list]:
        """(tokens, per-row logprob info or Nones), waiting for this step only."""
        if self.event is not None:
            self.event.synchronize()
        if self.logprobs is None:
            return self.host_ids.tolist(), [None] * len(self.reqs)
        return self.host_ids.tolist(), Sampler.logprob_lists(*self.logprobs)


def plain(req: Req, device_penalties: bool) -> bool:
    """Whether a request's next token can be sampled before its previous one is known on the host: penalties only
    when their counts are kept on the device (ember/engine/penalties.py), no forced tokens, and a thinking budget
    only while neither the step in flight nor this one can spend it (reading the in-flight step, with this step's
    placeholder in place, must not yet force the end of thinking). Grammars: see OverlapStep.launch."""
    sp = req.sampling
    budget_far = (sp.thinking_budget is None or req.thinking_closed or req.num_output + 1 < sp.thinking_budget)
    return ((device_penalties or not sp.penalized) and budget_far and not req.forced_ids
            and not req.return_prompt_logprobs)


class OverlapStep:
    def __init__(self, core):
        self.core = core
        self.inflight: InFlight | None = None

    @property
    def pending(self) -> bool:
        return self.inflight is not None

    def takes(self, batch) -> bool:
        device_penalties = self.core.sampler.penalties is not None
        return all(n == 1 for n in batch.extend_lens) and all(plain(r, device_penalties) for r in batch.reqs)

    def launch(self, batch) -> list[TokenOut]:
        """Run `batch` (a plain decode step) without reading its tokens; then resolve the step before it. With
        grammars the step before is resolved first, once the forward is launched (SGLang's delayed sampling): the
        masks need its tokens accepted, and the host fills them while the device runs the forward."""
        core, prev = self.core, self.inflight
        core.runner.future_ids = prev.device_ids if prev is not None else None
        try:
            logits = core.runner.forward(batch.reqs, batch.extend_lens)
        finally:
            core.runner.future_ids = None
        outs, mask = [], None
        if any(r.grammar is not None for r in batch.reqs):
            outs, prev = (self._resolve(prev) if prev is not None else []), None
            matchers = [None if r.finished else r.grammar for r in batch.reqs]  # (finished just now: rows dropped)
            mask = core.grammar.bitmask(matchers)
        ids = core.sampler.sample_ids(logits, batch.reqs, mask)
        if core.sampler.penalties is not None:  # the tokens join the penalty counts on the device
            core.sampler.penalties.record(batch.reqs, ids)
        top_ns = [r.sampling.logprobs for r in batch.reqs]
        logprobs = None
        if any(n is not None for n in top_ns):
            logprobs = (*map(to_host, core.sampler.logprobs_on_device(logits, ids, top_ns)), top_ns)
        host, event = to_host(ids), None
        if ids.is_cuda:  # the host copies, enqueued behind the sampling and awaited only when resolved
            event = torch.cuda.Event()
            event.record()
        index = []
        for row, req in enumerate(batch.reqs):
            if req.finished:  # (read above: its row is dropped)
                index.append(None)
                continue
            req.kv_len += 1
            index.append(len(req.token_ids))
            req.token_ids.append(-(row + 1))
        self.inflight = InFlight(list(batch.reqs), index, ids, host, logprobs, event)
        return outs + (self._resolve(prev) if prev is not None else [])

    def resolve(self) -> list[TokenOut]:
        """Read the step in flight, if any, and report its tokens (before any other step reads token_ids)."""
        prev, self.inflight = self.inflight, None
        return self._resolve(prev) if prev is not None else []

    def _resolve(self, step: InFlight) -> list[TokenOut]:
        core, outs = self.core, []
        for req, i, tok, logprob in zip(step.reqs, step.index, *step.read()):
            if req.finished:  # finished (or aborted) at an earlier step: this row is dropped
                continue
            core._append_token(req, tok, logprob, index=i)
            if req.finished:  # drop the placeholder of a step launched since (the KV it writes is of this token)
                del req.token_ids[i + 1:]
                if req in core.scheduler.running:
                    core.scheduler.finish(req)
                else:  # preempted since it was launched: it waits, holding no pages
                    core.scheduler.remove(req.rid)
            outs.append(core._report(req))
        return outs


def make_overlap(core, args) -> OverlapStep | None:
    """The engine's OverlapStep: on CUDA at tp 1 without speculative decoding, unless --disable-overlap-schedule."""
    from ember.distributed import tp_size
    if args.disable_overlap_schedule or core.spec is not None or tp_size() > 1:
        return None
    return OverlapStep(core) if str(core.runner.device).startswith("cuda") else None
