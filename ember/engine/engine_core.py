"""The engine loop body: requests in, one scheduled model step at a time, token outputs out.

Used in-process by `ember.Engine` and inside the engine process behind the HTTP server.
"""
from __future__ import annotations

import logging
import time

import torch

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.grammar import GrammarBackend
from ember.engine.io_struct import GenerateReq, TokenOut
from ember.distributed.driver import make_runner
from ember.engine.radix_cache import RadixCache
from ember.engine.request import Req
from ember.engine.sampler import Sampler
from ember.engine.scheduler import Scheduler
from ember.server_args import ServerArgs

logger = logging.getLogger("ember.engine")


def eos_token_ids_of(model_dir, hf_config, tokenizer) -> list[int]:
    ids = set()
    for src in (hf_config, getattr(hf_config, "text_config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    try:
        from transformers import GenerationConfig
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    except Exception:  # no generation_config.json
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


class EngineCore:
    def __init__(self, server_args: ServerArgs | None = None, **kwargs):
        from transformers import AutoConfig, AutoTokenizer
        from ember.loader import resolve_model_dir

        self.args = args = server_args or ServerArgs.from_kwargs(**kwargs)
        self.step_rids: list[str] | None = None  # the requests of the step running now
        self.fault_hook = None  # tests only: called once a step has scheduled its batch
        torch.manual_seed(args.random_seed)
        self.model_dir = resolve_model_dir(args.model_path)
        self.hf_config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=args.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or self.model_dir,
                                                       trust_remote_code=args.trust_remote_code)
        self.runner = make_runner(self.model_dir, self.hf_config, args)  # rank 0 of --tp-size ranks
        cfg = self.runner.config
        self.vocab_size = cfg.vocab_size
        self.context_length = args.context_length or cfg.max_position_embeddings
        self.eos_token_ids = eos_token_ids_of(self.model_dir, self.hf_config, self.tokenizer)
        kv = self.runner.kv_cache
        radix = None
        if not args.disable_radix_cache:  # hybrid models: the tree keeps the window of the sliding layers too
            swa = "swa" in kv.groups
            radix = RadixCache(kv.allocators["full"], kv.page_size, kv.allocators.get("swa"),
                               self.runner.window if swa else None)
        self.radix = radix
        self.scheduler = Scheduler(kv.allocators, kv.page_size, window=self.runner.window, radix=radix,
                                   max_running=args.max_running_requests,
                                   chunk_size=min(args.chunked_prefill_size, args.max_prefill_tokens))
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids, self.runner.device)
        self.grammar = GrammarBackend(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self._compiling: list[tuple[Req, object]] = []  # requests waiting for their grammar
        self._aborted: list[Req] = []
        self._think_end_ids: dict[str, list[int]] = {}
        self.num_generated = 0
        from ember.speculative import make_spec_worker
        self.spec = make_spec_worker(self, args)  # None unless --speculative-algorithm
        from ember.engine.overlap import make_overlap
        self.overlap = make_overlap(self, args)  # launches decode step N+1 before reading step N's tokens (CUDA)

    # ------------------------------------------------------------------ requests
    def add_request(self, g: GenerateReq) -> None:
        sp = g.sampling
        if not g.input_ids:
            raise ValueError("the prompt is empty")
        sp.validate(self.vocab_size)
        if any(not 0 <= t < self.vocab_size for t in g.input_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        total = len(g.input_ids) + sp.max_new_tokens
        if total > self.context_length:
            raise ValueError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{total} tokens ({len(g.input_ids)} in the messages, {sp.max_new_tokens} in the completion). "
                f"Please reduce the length of the messages or completion.")
        capacity = self.runner.kv_cache.allocators["full"].total * self.runner.kv_cache.page_size
        if total > capacity:
            raise ValueError(f"request needs {total} tokens of KV cache but the pool holds only {capacity}")
        req = Req(g.rid, list(g.input_ids), sp, return_prompt_logprobs=g.return_prompt_logprobs)
        req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, sp.stop, sp.skip_special_tokens)
        if g.mm is not None:
            self._attach_media(req, g.mm)
        compiling = self.grammar.submit(sp)
        if compiling is None:
            self.scheduler.add(req)
        else:
            self._compiling.append((req, compiling))

    def _admit_compiled(self) -> None:
        """Requests whose grammar finished compiling join the scheduler; a bad grammar fails the request."""
        still = []
        for req, fut in self._compiling:
            if not fut.done():
                still.append((req, fut))
            elif fut.exception() is not None:
                req.finished, req.finish_reason = True, "abort"
                req.error = f"invalid grammar: {fut.exception()}"
                self._aborted.append(req)
            else:
                req.grammar = self.grammar.matcher(fut.result())
                self.scheduler.add(req)
        self._compiling = still

    def abort(self, rid: str) -> None:
        req = self.scheduler.remove(rid)
        for pair in self._compiling:
            if pair[0].rid == rid:
                self._compiling.remove(pair)
                req = pair[0]
                break
        if req is not None:
            req.finished, req.finish_reason = True, "abort"
            self._aborted.append(req)

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or bool(self._aborted or self._compiling)
                or (self.overlap is not None and self.overlap.pending))

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    def flush_cache(self) -> bool:
        if self.scheduler.has_work():
            return False
        if self.overlap is not None:  # a step in flight whose requests have all finished: nothing to report
            self.overlap.resolve()
        return self.radix.reset() if self.radix is not None else True

    def stats(self) -> dict:
        kv = self.runner.kv_cache
        full = kv.allocators["full"]
        return {
            "page_size": kv.page_size,
            "total_pages": full.total,
            "free_pages": full.num_free,
            "cached_pages": self.radix.num_pages if self.radix is not None else 0,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "total_preemptions": self.scheduler.total_preemptions,
            "speculative": self.spec.stats() if self.spec is not None else None,
            "avg_spec_accept_length": self.spec.stats()["avg_accept_length"] if self.spec is not None else None,
            "pools": {g: {"total": a.total, "free": a.num_free, "cached": self._cached_pages(g)}
                      for g, a in kv.allocators.items()},
            "memory_plan": self.runner.memory_plan.to_dict() if hasattr(self.runner, "memory_plan") else None,
            "weights_path": vars(self.runner.weights_path) if hasattr(self.runner, "weights_path") else None,
        }

    def _cached_pages(self, group: str) -> int:
        if self.radix is None:
            return 0
        return self.radix.num_swa_pages if group == "swa" else self.radix.num_pages

    def _attach_media(self, req: Req, mm) -> None:
        """Images/video: the model must take them; placeholder tokens are keyed by content in the prefix cache."""
        if not hasattr(self.runner.model, "encode_items"):
            name = str(self.model_dir).rstrip("/").split("/")[-1]
            raise ValueError(f"model {name} does not accept image or "
                             "video inputs (text only)")
        req.mm = mm
        req.token_ids = mm.keyed_ids(req.prompt_ids)

    def prompt_logits(self, token_ids: list[int], mm=None) -> torch.Tensor:
        """Logits [len, vocab] at every prompt position, computed outside the batch loop (prompt
        logprobs, tests). Uses temporary pages; needs an idle engine or a pool with room."""
        from ember.engine.sampling_params import SamplingParams
        req = Req("_prompt_logits", list(token_ids), SamplingParams())
        if mm is not None:
            self._attach_media(req, mm)
        for g in self.runner.kv_cache.groups:
            req.page_tables[g] = []
        if not self.scheduler._try_alloc(req, len(token_ids)):
            raise RuntimeError("no free KV pages for prompt logits")
        try:
            return self.runner.forward([req], [len(token_ids)], all_positions=True)
        finally:
            self.scheduler.release(req)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[TokenOut]:
        if self._compiling:
            self._admit_compiled()
        outs = [self._report(r) for r in self._aborted]
        self._aborted.clear()
        self.step_rids = None
        batch = self.scheduler.schedule()
        overlapped = self.overlap is not None and batch is not None and self.overlap.takes(batch)
        if self.overlap is not None and not overlapped:
            outs += self.overlap.resolve()  # a step in flight: its tokens are read before any other step runs
            if batch is not None:  # requests that finished at that step leave this one
                batch = batch.without([r.finished for r in batch.reqs])
        if batch is None:
            return outs
        # the requests this step runs: if it raises, the engine process fails these and keeps the rest
        self.step_rids = [r.rid for r in batch.reqs]
        if self.fault_hook is not None:  # tests: EMBER_TEST_FAULT_STEPS (ember/engine/engine_process.py)
            self.fault_hook()
        for req in batch.reqs:  # first forward of a request: how long it queued (sglang:queue_time_seconds)
            if req.queue_time is None:
                req.queue_time = time.monotonic() - req.arrival
        if self.spec is not None:  # draft, verify in one forward, accept, roll back (ember/speculative)
            return outs + self.spec.step(self, batch)
        if overlapped:  # launched; what comes back is the step before it (ember/engine/overlap.py)
            return outs + self.overlap.launch(batch)
        wants_prompt = [r.return_prompt_logprobs and r.kv_len < len(r.prompt_ids) for r in batch.reqs]
        if any(wants_prompt):
            logits, full = self.runner.forward(batch.reqs, batch.extend_lens, full_rows=wants_prompt)
            for i, rows in full.items():
                self._record_prompt_logprobs(batch.reqs[i], rows)
        else:
            logits = self.runner.forward(batch.reqs, batch.extend_lens)
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.kv_len += n
            if n > 1:  # a prefill chunk: share its pages with requests that arrive meanwhile
                self.scheduler.cache_prefix(req)
        ready = [i for i, r in enumerate(batch.reqs) if r.extend_len == 0]  # prefill done: sample
        for req in [batch.reqs[i] for i in ready if batch.reqs[i].sampling.max_new_tokens == 0]:
            req.finished, req.finish_reason = True, "length"  # prompt only (e.g. echo + logprobs scoring)
            self.scheduler.finish(req)
            outs.append(self._report(req))
        ready = [i for i in ready if not batch.reqs[i].finished]
        if ready:
            reqs = [batch.reqs[i] for i in ready]
            mask = self.grammar.bitmask([r.grammar for r in reqs]) if any(r.grammar for r in reqs) else None
            rows = logits if len(ready) == logits.shape[0] else logits[ready]  # (a [B, V] copy only when needed)
            next_ids, logprobs = self.sampler.sample(rows, reqs, mask)
            for j, (req, tok) in enumerate(zip(reqs, next_ids)):
                self._append_token(req, tok, logprobs[j] if logprobs else None)
                if req.finished:
                    self.scheduler.finish(req)
                outs.append(self._report(req))
        return outs

    @staticmethod
    def _record_prompt_logprobs(req: Req, rows: torch.Tensor) -> None:
        """rows: logits at positions kv_len.. of this chunk; position p predicts prompt token p + 1."""
        if req.prompt_logprobs is None or req.kv_len == 0:  # (again after a preemption)
            req.prompt_logprobs = [None]  # the first token has no context
        lp = torch.log_softmax(rows.float(), dim=-1)
        start = req.kv_len
        targets = req.prompt_ids[start + 1:start + 1 + rows.shape[0]]
        if targets:
            idx = torch.tensor(targets, device=lp.device).unsqueeze(1)
            req.prompt_logprobs += lp[:len(targets)].gather(1, idx).squeeze(1).tolist()

    def _apply_thinking_budget(self, req: Req) -> None:
        """Close the thinking block once its budget is spent (reasoning effort)."""
        sp = req.sampling
        if req.thinking_closed:
            return
        end_ids = self._think_end_ids.get(sp.think_end)
        if end_ids is None:  # tokenized once per end tag, not once per token
            end_ids = self._think_end_ids[sp.think_end] = self.tokenizer.encode(sp.think_end, add_special_tokens=False)
        if sp.think_end in req.detok.text or req.output_ids[-len(end_ids):] == end_ids:
            req.thinking_closed = True  # the model closed it itself
        elif req.num_output >= sp.thinking_budget:
            req.forced_ids = list(end_ids)
            req.thinking_closed = True

    def _append_token(self, req: Req, tok: int, logprob, index: int | None = None) -> None:
        """A sampled token joins the request (index: it replaces the placeholder there, ember/engine/overlap.py),
        then the stop conditions."""
        sp = req.sampling
        if req.forced_ids:
            tok, logprob = req.forced_ids.pop(0), None
        if index is None:
            req.token_ids.append(tok)
            num_output = req.num_output
        else:
            req.token_ids[index] = tok
            num_output = index + 1 - len(req.prompt_ids)
        req.pending_ids.append(tok)
        if logprob is not None:
            req.pending_logprobs.append(logprob)
        self.num_generated += 1
        if req.grammar is not None and not req.grammar.is_terminated():
            req.grammar.accept_token(tok)
        is_stop_token = (tok in sp.stop_token_ids) or (not sp.ignore_eos and tok in self.eos_token_ids)
        # a grammar that has accepted its end admits nothing more: the request ends there (as SGLang), even
        # with ignore_eos, since the matcher cannot give a next-token mask after its end
        if is_stop_token or (req.grammar is not None and req.grammar.is_terminated()):
            req.finished, req.finish_reason, req.matched_stop = True, "stop", tok
        else:
            matched = req.detok.add(tok)
            if matched is not None:
                req.finished, req.finish_reason, req.matched_stop = True, "stop", matched
        if not req.finished and num_output >= sp.max_new_tokens:
            req.finished, req.finish_reason = True, "length"
        if not req.finished and sp.thinking_budget is not None:
            self._apply_thinking_budget(req)
        if req.finished and not isinstance(req.matched_stop, str):
            req.detok.flush()  # emit a trailing incomplete character rather than lose it

    def _report(self, req: Req) -> TokenOut:
        out = TokenOut(
            rid=req.rid, new_token_ids=req.pending_ids, text_delta=req.detok.take_delta(final=req.finished),
            finished=req.finished, finish_reason=req.finish_reason, matched_stop=req.matched_stop,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=req.num_output - (req.token_ids[-1] < 0),  # (not the next step's placeholder: overlap)
            cached_tokens=req.cached_tokens or 0, logprobs=req.pending_logprobs or None, error=req.error,
            queue_time=req.queue_time)
        if req.prompt_logprobs is not None and len(req.prompt_logprobs) == len(req.prompt_ids):
            out.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None
            req.return_prompt_logprobs = False  # sent once; a recompute after preemption skips it
        req.pending_ids, req.pending_logprobs = [], []
        return out
