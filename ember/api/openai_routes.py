"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (with SGLang's extra
response fields: matched_stop, reasoning_content, usage.reasoning_tokens, metadata.weight_version).
Requests are built by request_builder.py and run by runner.py; this module only shapes the answers."""
from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from ember.api.errors import APIError
from ember.api.protocol import ChatCompletionRequest, CompletionRequest
from ember.api.request_builder import (
    build_sampling, check_n, fan_out, load_chat_media, prepare_chat, prompts_to_ids,
)
from ember.api.runner import Formatter, run
from ember.api.serving import SubResult, check_overload, new_id, now, parse_body, resolve_max_new_tokens, sse
from ember.frontend.output_processor import Delta

if TYPE_CHECKING:
    from ember.api.app import ServerState

router = APIRouter()

METADATA = {"weight_version": "default"}


def _state(request: Request) -> "ServerState":
    return request.app.state.ember


# ---------------------------------------------------------------------------- helpers
def _usage(results: list[SubResult], prompt_lens: list[int], n: int, reasoning_tokens: int = 0) -> dict:
    prompt_tokens = 0
    cached = 0
    for p_idx, plen in enumerate(prompt_lens):
        first = results[p_idx * n]
        prompt_tokens += first.prompt_tokens or plen
        cached += first.cached_tokens
    completion = sum(r.completion_tokens or len(r.token_ids) for r in results)
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "reasoning_tokens": reasoning_tokens,
    }


def _finish_reason(reason: str | None) -> str | None:
    return reason


def _matched(result_or_out) -> int | str | None:
    if getattr(result_or_out, "finish_reason", None) != "stop":
        return None
    return result_or_out.matched_stop


def _model_name(state, req) -> str:
    return req.model or state.served_model_name


# ---------------------------------------------------------------------------- logprobs
def _chat_logprob_entries(state, token_ids: list[int], logprobs: list, top_n: int) -> list[dict]:
    tm = state.tm
    entries = []
    for tid, lp in zip(token_ids, logprobs):
        chosen, top = lp if isinstance(lp, (tuple, list)) and len(lp) == 2 else (lp, [])
        tok = tm.token_text(tid)
        entry = {"token": tok, "logprob": float(chosen), "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
        for t, l in (top or [])[:top_n]:
            s = tm.token_text(t)
            entry["top_logprobs"].append({"token": s, "logprob": float(l), "bytes": list(s.encode("utf-8"))})
        entries.append(entry)
    return entries


class _CompletionLogprobs:
    def __init__(self, state, top_n: int):
        self.state = state
        self.top_n = top_n
        self.offset = 0

    def block(self, token_ids: list[int], logprobs: list, prompt_logprobs: list | None = None,
              prompt_ids: list[int] | None = None) -> dict:
        tm = self.state.tm
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(tid, chosen, top):
            tok = tm.token_text(tid)
            out["tokens"].append(tok)
            out["token_logprobs"].append(None if chosen is None else float(chosen))
            out["top_logprobs"].append(None if top is None else {tm.token_text(t): float(l) for t, l in top[:self.top_n]})
            out["text_offset"].append(self.offset)
            self.offset += len(tok)

        if prompt_ids is not None:
            plps = list(prompt_logprobs or [])
            plps += [None] * (len(prompt_ids) - len(plps))
            for tid, lp in zip(prompt_ids, plps):
                add(tid, lp, None)
        for tid, lp in zip(token_ids, logprobs):
            chosen, top = lp if isinstance(lp, (tuple, list)) and len(lp) == 2 else (lp, [])
            add(tid, chosen, list(top or []))
        return out


# ---------------------------------------------------------------------------- /v1/models
@router.get("/v1/models")
async def list_models(request: Request):
    state = _state(request)
    state.require_ready()  # 503 until the model is loaded (SGLang's wait_for_server polls this route)
    return {"object": "list", "data": [state.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = _state(request)
    state.require_ready()
    card = state.model_card()
    card["id"] = model_id if model_id else card["id"]
    return card


# ---------------------------------------------------------------------------- /v1/completions
@router.post("/v1/completions")
async def completions(request: Request):
    state = _state(request)
    req, _raw = await parse_body(request, CompletionRequest)
    state.require_ready()
    if req.suffix:
        raise APIError("suffix is not supported by this server", 400, "suffix")
    n = check_n(req)
    tm = state.tm
    prompt_texts, prompts, _ = prompts_to_ids(tm, req.prompt, "prompt")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise APIError(f"logprobs must be in [0, 20], got {req.logprobs}", 400, "logprobs")
    max_new = [resolve_max_new_tokens(req.max_tokens, len(ids), tm.context_length, kv_capacity=state.kv_capacity)
               for ids in prompts]
    sp = build_sampling(req, max_new[0], tm.vocab_size, req.logprobs, state.sampling_defaults)
    sps = [sp] + [dataclasses.replace(sp, max_new_tokens=m) for m in max_new[1:]]
    check_overload(state.engine, state.args.max_queued_requests, len(prompts) * n)
    base_id = req.rid or new_id()
    echo_logprobs = bool(req.echo and req.logprobs is not None)
    reqs = fan_out(base_id, prompts, sps, [n] * len(prompts), prompt_logprobs=[echo_logprobs] * len(prompts))
    fmt = _CompletionFormatter(state, req, base_id, prompt_texts, prompts, n, len(reqs))
    return await run(state, request, base_id, reqs, req.stream, fmt)


class _CompletionFormatter(Formatter):
    def __init__(self, state, req: CompletionRequest, base_id: str, prompt_texts, prompts, n: int, total: int):
        self.state, self.req, self.base_id, self.n = state, req, base_id, n
        self.prompt_texts, self.prompts = prompt_texts, prompts
        self.model, self.created = _model_name(state, req), now()
        self.prompt_lens = [len(x) for x in prompts]
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.lpbs = [_CompletionLogprobs(state, req.logprobs or 0) for _ in range(total)]
        self.echoed = [False] * total

    def prompt_text(self, p_idx: int) -> str:
        t = self.prompt_texts[p_idx]
        return t if t is not None else self.state.tm.decode(self.prompts[p_idx], skip_special_tokens=False)

    def response(self, results: list[SubResult]) -> dict:
        req, choices = self.req, []
        for idx, r in enumerate(results):
            p_idx = idx // self.n
            text, lp = r.text, None
            if req.logprobs is not None:
                lp = _CompletionLogprobs(self.state, req.logprobs).block(
                    r.token_ids, r.logprobs, r.prompt_logprobs, self.prompts[p_idx] if req.echo else None)
            if req.echo:
                text = self.prompt_text(p_idx) + text
            choices.append({"index": idx, "text": text, "logprobs": lp,
                            "finish_reason": _finish_reason(r.finish_reason), "matched_stop": _matched(r)})
        return {"id": self.base_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(results, self.prompt_lens, self.n), "metadata": METADATA}

    def on_output(self, idx, out, result):
        req = self.req
        p_idx = idx // self.n
        text, lp, echo_ids = out.text_delta, None, None
        if req.echo and not self.echoed[idx]:
            self.echoed[idx] = True
            text = self.prompt_text(p_idx) + text
            echo_ids = self.prompts[p_idx]
        if req.logprobs is not None:
            lp = self.lpbs[idx].block(out.new_token_ids, out.logprobs or [], out.prompt_logprobs, echo_ids)
        if text or out.finished or lp:
            yield sse({"id": self.base_id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [{"index": idx, "text": text, "logprobs": lp,
                                    "finish_reason": out.finish_reason if out.finished else None,
                                    "matched_stop": _matched(out) if out.finished else None}],
                       "usage": None})

    def finish(self, results):
        if self.include_usage:
            yield sse({"id": self.base_id, "object": "text_completion", "created": self.created,
                       "model": self.model, "choices": [], "usage": _usage(results, self.prompt_lens, self.n)})


# ---------------------------------------------------------------------------- /v1/chat/completions
def _tool_call_dict(call: dict, index: int) -> dict:
    return {"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function", "index": index,
            "function": {"name": call.get("name"), "arguments": call.get("arguments") or ""}}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = _state(request)
    req, raw = await parse_body(request, ChatCompletionRequest)
    state.require_ready()
    n = check_n(req)
    raw, media = await load_chat_media(state, raw, request.app)  # image_url / video_url parts
    chat = prepare_chat(state, req, raw, media)
    outputs = [chat.new_output() for _ in range(n)]
    check_overload(state.engine, state.args.max_queued_requests, n)
    base_id = req.rid or new_id()
    reqs = fan_out(base_id, [chat.prompt_ids], [chat.sp], [n], mm=chat.mm)
    return await run(state, request, base_id, reqs, req.stream, _ChatFormatter(state, req, chat, outputs, base_id))


class _ChatFormatter(Formatter):
    def __init__(self, state, req: ChatCompletionRequest, chat, outputs, base_id: str):
        self.state, self.req, self.chat, self.outputs, self.base_id = state, req, chat, outputs, base_id
        self.n = len(outputs)
        self.model, self.created = _model_name(state, req), now()
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.seen_calls = [set() for _ in outputs]
        self.held = [""] * self.n  # reasoning held back (stream_reasoning=false)

    def response(self, results: list[SubResult]) -> dict:
        req, rr, tm = self.req, self.chat.rr, self.state.tm
        choices = []
        reasoning_tokens = 0
        for idx, (r, o) in enumerate(zip(results, self.outputs)):
            o.feed(r.text)
            o.finish()
            tool_calls = [_tool_call_dict(c, i) for i, c in enumerate(o.tool_calls)] or None
            finish = _finish_reason(r.finish_reason)
            matched = _matched(r)
            if tool_calls and finish == "stop":
                finish, matched = "tool_calls", None
            reasoning_tokens += tm.count_tokens(o.reasoning)
            reasoning = None if rr.exclude else (o.reasoning or None)
            content = o.content
            if tool_calls and not content.strip():
                content = None
            lp = None
            if req.logprobs:
                lp = {"content": _chat_logprob_entries(self.state, r.token_ids, r.logprobs, self.chat.top_n or 0)}
            choices.append({
                "index": idx,
                "message": {"role": "assistant", "content": content, "reasoning_content": reasoning,
                            "reasoning": reasoning, "tool_calls": tool_calls},
                "logprobs": lp, "finish_reason": finish, "matched_stop": matched})
        return {"id": self.base_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(results, [len(self.chat.prompt_ids)], self.n, reasoning_tokens),
                "metadata": METADATA}

    def chunk(self, idx: int, delta: dict, finish=None, matched=None, logprobs=None) -> str:
        return sse({"id": self.base_id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model,
                    "choices": [{"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                                 "matched_stop": matched}],
                    "usage": None})

    def delta_dict(self, d: Delta, idx: int) -> dict:
        out = {}
        if d.content:
            out["content"] = d.content
        if d.reasoning and not self.chat.rr.exclude:
            out["reasoning_content"] = out["reasoning"] = d.reasoning
        if d.tool_calls:
            # One entry per call index in a chunk, as OpenAI streams them: the parser yields a call's name and
            # its arguments as two deltas of one feed when a whole <tool_call> block arrives at once, and a
            # client that reads one entry per index per chunk would lose the arguments.
            calls, by_index = [], {}
            seen = self.seen_calls[idx]
            for c in d.tool_calls:
                prev = by_index.get(c.index)
                if prev is not None:
                    prev["function"]["arguments"] += c.arguments or ""
                    if c.name and not prev["function"].get("name"):
                        prev["function"]["name"] = c.name
                    continue
                entry = {"index": c.index, "type": "function", "function": {"arguments": c.arguments or ""}}
                by_index[c.index] = entry
                if c.index not in seen:
                    seen.add(c.index)
                    entry["id"] = c.id or f"call_{uuid.uuid4().hex[:24]}"
                elif c.id:
                    entry["id"] = c.id
                if c.name:
                    entry["function"]["name"] = c.name
                calls.append(entry)
            out["tool_calls"] = calls
        return out

    def start(self, first):
        for idx in range(self.n):
            yield self.chunk(idx, {"role": "assistant", "content": ""})

    def on_output(self, idx, out, result):
        req = self.req
        o = self.outputs[idx]
        d = o.feed(out.text_delta)
        lp = None
        if req.logprobs and out.new_token_ids:
            lp = {"content": _chat_logprob_entries(self.state, out.new_token_ids, out.logprobs or [],
                                                   self.chat.top_n or 0)}
        if out.finished:
            tail = o.finish()
            d = Delta(d.content + tail.content, d.reasoning + tail.reasoning, d.tool_calls + tail.tool_calls)
        if not req.stream_reasoning:  # the reasoning in one piece, once it is complete
            self.held[idx] += d.reasoning
            d.reasoning = ""
            if self.held[idx] and (d.content or d.tool_calls or out.finished):
                d.reasoning, self.held[idx] = self.held[idx], ""
        dd = self.delta_dict(d, idx)
        if dd or lp:
            yield self.chunk(idx, dd, logprobs=lp)
        if out.finished:
            finish = out.finish_reason
            matched = _matched(out)
            if o.tool_calls and finish == "stop":
                finish, matched = "tool_calls", None
            yield self.chunk(idx, {}, finish, matched)

    def finish(self, results):
        if self.include_usage:
            rt = sum(self.state.tm.count_tokens(o.reasoning) for o in self.outputs)
            yield sse({"id": self.base_id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [],
                       "usage": _usage(results, [len(self.chat.prompt_ids)], self.n, rt)})
