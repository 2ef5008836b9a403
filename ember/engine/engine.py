"""`ember.Engine`: the engine in-process, for offline batch generation (like sglang.Engine / vllm.LLM)."""
from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

from ember.engine.engine_core import EngineCore
from ember.engine.io_struct import GenerateReq, TokenOut
from ember.engine.sampling_params import SamplingParams


def _to_params(sp) -> SamplingParams:
    if sp is None:
        return SamplingParams()
    if isinstance(sp, SamplingParams):
        return SamplingParams(**{k: v for k, v in vars(sp).items()})
    return SamplingParams(**sp)


class _Collector:
    """Accumulates a request's TokenOuts into the final result dict."""

    def __init__(self, rid: str):
        self.rid, self.text, self.output_ids, self.logprobs, self.last = rid, "", [], [], None

    def add(self, out: TokenOut) -> None:
        self.text += out.text_delta
        self.output_ids += out.new_token_ids
        self.logprobs += out.logprobs or []
        self.last = out

    def result(self) -> dict:
        o = self.last
        finish = {"type": o.finish_reason}
        if o.finish_reason == "stop":
            finish["matched"] = o.matched_stop
        elif o.finish_reason == "length":
            finish["length"] = o.completion_tokens
        meta = {"id": self.rid, "finish_reason": finish, "matched_stop": o.matched_stop,
                "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                "cached_tokens": o.cached_tokens}
        if o.spec_verify_ct:  # speculative decoding (SGLang's names)
            meta["spec_verify_ct"] = o.spec_verify_ct
            meta["spec_accept_length"] = o.completion_tokens / o.spec_verify_ct
        if self.logprobs:
            meta["output_token_logprobs"] = self.logprobs
        return {"text": self.text, "output_ids": self.output_ids, "meta_info": meta}


class Engine:
    """Engine(model_path=..., **server_args).generate(prompts, sampling_params)."""

    def __init__(self, model_path: str | None = None, **server_args):
        self.core = EngineCore(model_path=model_path, **server_args)
        self.tokenizer = self.core.tokenizer

    def _requests(self, prompt, sampling_params, input_ids):
        if input_ids is not None:
            single = bool(input_ids) and isinstance(input_ids[0], int)
            id_lists = [input_ids] if single else list(input_ids)
        else:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            id_lists = [self.tokenizer.encode(p) for p in prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        if len(params) != len(id_lists):
            raise ValueError("sampling_params list must match the number of prompts")
        reqs = [GenerateReq(uuid.uuid4().hex, ids, _to_params(sp)) for ids, sp in zip(id_lists, params)]
        return reqs, single

    def generate(self, prompt=None, sampling_params=None, input_ids=None):
        """Generate for one prompt (returns a dict) or a list (returns a list of dicts)."""
        reqs, single = self._requests(prompt, sampling_params, input_ids)
        collectors = {r.rid: _Collector(r.rid) for r in reqs}
        try:
            for r in reqs:
                self.core.add_request(r)
            pending = set(collectors)
            while pending:
                for out in self.core.step():
                    if out.rid in collectors:
                        collectors[out.rid].add(out)
                        if out.finished:
                            pending.discard(out.rid)
        except BaseException:
            for rid in collectors:
                self.core.abort(rid)
            while self.core.has_work() and not self.core.scheduler.has_work():
                self.core.step()
            raise
        results = [collectors[r.rid].result() for r in reqs]
        return results[0] if single else results

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None,
                             stream: bool = False) -> AsyncIterator[dict] | dict:
        """Async variant. With stream=True, an async iterator of incremental dicts
        ({"text": delta, "output_ids": new ids, "finished", "meta_info"})."""
        reqs, _ = self._requests(prompt, sampling_params, input_ids)
        if len(reqs) != 1:
            raise ValueError("async_generate takes one prompt")
        req = reqs[0]
        self.core.add_request(req)
        if not stream:
            collector = _Collector(req.rid)
            async for out in self._drive(req.rid):
                collector.add(out)
            return collector.result()
        return self._stream(req.rid)

    async def _stream(self, rid):
        collector = _Collector(rid)
        async for out in self._drive(rid):
            collector.add(out)
            res = collector.result()
            yield {"text": out.text_delta, "output_ids": out.new_token_ids, "finished": out.finished,
                   "meta_info": res["meta_info"]}

    async def _drive(self, rid):
        try:
            while True:
                for out in self.core.step():
                    if out.rid == rid:
                        yield out
                        if out.finished:
                            return
                await asyncio.sleep(0)
        finally:
            self.core.abort(rid)

    def flush_cache(self) -> bool:
        return self.core.flush_cache()

    def shutdown(self) -> None:
        self.core.shutdown()  # the worker ranks of --tp-size > 1
