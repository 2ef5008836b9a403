"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (with SGLang's extra
response fields: matched_stop, reasoning_content, usage.reasoning_tokens, metadata.weight_version)."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ember.api.errors import APIError
from ember.api.protocol import ChatCompletionRequest, CompletionRequest
from ember.api.reasoning import (
    ReasoningRequest, parse_reasoning_request, plan_reasoning, template_switches, thinking_budget,
)
from ember.api.serving import (
    MAX_N, SSE_DONE, ClientDisconnected, SSEResponse, SubResult, check_overload,
    json_schema_text, new_id, now, parse_body, parse_logit_bias, 
    resolve_max_new_tokens, run_to_completion, stream_items, sse, sse_error, start_stream, validate_sampling,
)
from ember.engine.engine_client import EngineRequestError
from ember.engine.io_struct import GenerateReq
from ember.engine.sampling_params import SamplingParams
from ember.frontend.output_processor import (
    DEFAULT_TOOL_PARSERS, ChoiceOutput, Delta, ForcedToolOutput, forced_tool_schema, make_output_parser,
)
from ember.frontend.tokenizer_manager import PromptError

if TYPE_CHECKING:
    from ember.api.app import ServerState

router = APIRouter()

METADATA = {"weight_version": "default"}
SAMPLING_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def _state(request: Request) -> "ServerState":
    return request.app.state.ember


# ---------------------------------------------------------------------------- helpers
def build_sampling(req, max_new_tokens: int, vocab_size: int, logprobs: int | None,
                   defaults: dict | None = None) -> SamplingParams:
    """`defaults`: the model's recommended values for fields the request leaves unset."""
    kw = dict(defaults or {})
    for name in ("temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    stop = req.stop
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    json_schema = json_schema_text(req.json_schema)
    regex, ebnf = req.regex, req.ebnf
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            json_schema = json_schema or '{"type": "object"}'
        elif rf.type == "json_schema":
            spec = rf.json_schema or {}
            schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
            if schema is None and rf.schema_ is not None:
                schema = rf.schema_
            if schema is None:
                raise APIError("response_format.json_schema.schema is required for type json_schema", 400,
                               "response_format")
            json_schema = json_schema_text(schema)
        elif rf.type == "regex":
            regex = rf.regex
        elif rf.type == "ebnf":
            ebnf = rf.ebnf
        else:
            raise APIError(f"response_format type {rf.type!r} is not supported", 400, "response_format")
    sp = SamplingParams(
        max_new_tokens=max_new_tokens, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos, min_new_tokens=req.min_tokens,
        logit_bias=parse_logit_bias(req.logit_bias), skip_special_tokens=req.skip_special_tokens,
        logprobs=logprobs, json_schema=json_schema, regex=regex, ebnf=ebnf, **kw)
    validate_sampling(sp, vocab_size, SAMPLING_NAMES)
    return sp


def _check_n(req) -> int:
    n = req.n
    if not 1 <= n <= MAX_N:
        raise APIError(f"n must be in [1, {MAX_N}], got {n}", 400, "n")
    if req.best_of is not None and req.best_of != n:
        raise APIError("best_of other than n is not supported", 400, "best_of")
    return n


def _sub_requests(base_id: str, prompts: list[list[int]], n: int, sp: SamplingParams,
                  return_prompt_logprobs: bool = False) -> list[GenerateReq]:
    total = len(prompts) * n
    reqs = []
    for p_idx, ids in enumerate(prompts):
        for j in range(n):
            idx = p_idx * n + j
            s = sp
            if total > 1:
                s = SamplingParams(**{**sp.__dict__, "stop": list(sp.stop), "stop_token_ids": list(sp.stop_token_ids),
                                      "logit_bias": dict(sp.logit_bias)})
                if sp.seed is not None:
                    s.seed = sp.seed + idx
            rid = base_id if total == 1 else f"{base_id}-{idx}"
            reqs.append(GenerateReq(rid=rid, input_ids=list(ids), sampling=s,
                                    return_prompt_logprobs=return_prompt_logprobs))
    return reqs


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
    n = _check_n(req)
    tm = state.tm

    # prompts -> token ids
    p = req.prompt
    if isinstance(p, str):
        prompt_texts, prompts = [p], [tm.encode(p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompt_texts, prompts = list(p), [tm.encode(x) for x in p]
    elif isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        prompt_texts, prompts = [None], [list(p)]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        prompt_texts, prompts = [None] * len(p), [list(x) for x in p]
    else:
        raise APIError("prompt must be a non-empty string, list of strings, list of token ids, or list of "
                       "token-id lists", 400, "prompt")
    for ids in prompts:
        try:
            tm.check_token_ids(ids, "prompt")
        except PromptError as e:
            raise APIError(str(e), 400, "prompt") from e
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise APIError(f"logprobs must be in [0, 20], got {req.logprobs}", 400, "logprobs")
    max_new = [resolve_max_new_tokens(req.max_tokens, len(ids), tm.context_length, kv_capacity=state.kv_capacity)
               for ids in prompts]
    sp = build_sampling(req, max_new[0], tm.vocab_size, req.logprobs, state.sampling_defaults)
    check_overload(state.engine, state.args.max_queued_requests, len(prompts) * n)

    base_id = req.rid or new_id()
    reqs = _sub_requests(base_id, prompts, n, sp, return_prompt_logprobs=bool(req.echo and req.logprobs is not None))
    for r, m in zip(reqs, [m for m in max_new for _ in range(n)]):
        r.sampling.max_new_tokens = m if len(reqs) > 1 else r.sampling.max_new_tokens
    model = _model_name(state, req)
    created = now()
    prompt_lens = [len(x) for x in prompts]

    def prompt_text(p_idx: int) -> str:
        t = prompt_texts[p_idx]
        return t if t is not None else tm.decode(prompts[p_idx], skip_special_tokens=False)

    if not req.stream:
        results = await run_to_completion(state, base_id, reqs, request)
        if results is None:
            return JSONResponse({}, status_code=499)  # the client went away
        choices = []
        for idx, r in enumerate(results):
            p_idx = idx // n
            text = r.text
            lp = None
            if req.logprobs is not None:
                lpb = _CompletionLogprobs(state, req.logprobs)
                lp = lpb.block(r.token_ids, r.logprobs, r.prompt_logprobs,
                               prompts[p_idx] if req.echo else None)
            if req.echo:
                text = prompt_text(p_idx) + text
            choices.append({"index": idx, "text": text, "logprobs": lp,
                            "finish_reason": _finish_reason(r.finish_reason), "matched_stop": _matched(r)})
        return {"id": base_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(results, prompt_lens, n), "metadata": METADATA}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        on_close, gen, first = await start_stream(state, base_id, reqs, request)
    except ClientDisconnected:
        return JSONResponse({}, status_code=499)

    async def stream():
        results = [SubResult() for _ in reqs]
        lpbs = [_CompletionLogprobs(state, req.logprobs or 0) for _ in reqs]
        echoed = [False] * len(reqs)
        try:
            async for idx, out in stream_items(first, gen):
                results[idx].add(out)
                p_idx = idx // n
                text = out.text_delta
                lp = None
                echo_ids = None
                if req.echo and not echoed[idx]:
                    echoed[idx] = True
                    text = prompt_text(p_idx) + text
                    echo_ids = prompts[p_idx]
                if req.logprobs is not None:
                    lp = lpbs[idx].block(out.new_token_ids, out.logprobs or [], out.prompt_logprobs, echo_ids)
                if text or out.finished or lp:
                    chunk = {"id": base_id, "object": "text_completion", "created": created, "model": model,
                             "choices": [{"index": idx, "text": text, "logprobs": lp,
                                          "finish_reason": out.finish_reason if out.finished else None,
                                          "matched_stop": _matched(out) if out.finished else None}],
                             "usage": None}
                    yield sse(chunk)
            if include_usage:
                yield sse({"id": base_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": _usage(results, prompt_lens, n)})
        except EngineRequestError as e:
            yield sse_error(e.message, e.status)
        finally:
            on_close()
        yield SSE_DONE

    return SSEResponse(stream(), on_close=on_close)


# ---------------------------------------------------------------------------- /v1/chat/completions
def _tool_call_dict(call: dict, index: int) -> dict:
    return {"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function", "index": index,
            "function": {"name": call.get("name"), "arguments": call.get("arguments") or ""}}


@dataclass
class PreparedChat:
    """A chat request turned into what the engine and the output parsers need (shared with the
    Anthropic-style /v1/messages, which maps its request onto a ChatCompletionRequest)."""
    prompt_ids: list[int]
    sp: SamplingParams
    rr: ReasoningRequest
    top_n: int | None
    new_output: Callable[[], "ChoiceOutput | ForcedToolOutput"]


def prepare_chat(state: "ServerState", req: ChatCompletionRequest, raw: dict) -> PreparedChat:
    """Tools, reasoning effort, chat template, max tokens, sampling, constrained tool calls, parsers."""
    tm = state.tm
    args = state.args
    tools = None
    tool_choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if req.tools and tool_choice != "none":
        tools = [t for t in raw.get("tools") or []]
        if not isinstance(tool_choice, str):  # a named tool: offer just that one
            name = tool_choice.function.name
            tools = [t for t in tools if (t.get("function") or {}).get("name") == name]
            if not tools:
                raise APIError(f"tool_choice names {name!r}, which is not in tools", 400, "tool_choice")
    if tool_choice == "required" or not isinstance(tool_choice, str):
        if not req.tools:
            raise APIError("tool_choice requires tools", 400, "tool_choice")

    rr = parse_reasoning_request(req)
    template_kwargs = template_switches(rr, req.chat_template_kwargs or {})
    messages = raw.get("messages")
    try:
        prompt_text = tm.render_chat(messages, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message,
                                     template_kwargs=template_kwargs)
        plan = plan_reasoning(rr, args.reasoning_parser, prompt_text, template_kwargs)
        prompt_ids = tm.encode_chat(prompt_text + plan.prompt_suffix)
    except PromptError as e:
        raise APIError(str(e), 400, e.param or "messages") from e
    if not prompt_ids:
        raise APIError("the rendered prompt is empty", 400, "messages")

    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = resolve_max_new_tokens(requested, len(prompt_ids), tm.context_length, param, state.kv_capacity)
    top_n = None
    if req.logprobs:
        top_n = req.top_logprobs or 0
        if not 0 <= top_n <= 20:
            raise APIError(f"top_logprobs must be in [0, 20], got {top_n}", 400, "top_logprobs")
    elif req.top_logprobs:
        raise APIError("top_logprobs requires logprobs=true", 400, "top_logprobs")
    sp = build_sampling(req, max_new, tm.vocab_size, top_n, state.sampling_defaults)

    # tool_choice "required" or a named function: the engine constrains the output to JSON tool calls
    forced = tools is not None and (tool_choice == "required" or not isinstance(tool_choice, str))
    named = None if not forced or isinstance(tool_choice, str) else tool_choice.function.name
    if forced:
        if sp.json_schema or sp.regex or sp.ebnf:
            raise APIError("response_format cannot be combined with tool_choice required or a named tool", 400,
                           "response_format")
        try:
            sp.json_schema = json.dumps(forced_tool_schema(tools, named, req.parallel_tool_calls is not False))
        except ValueError as e:
            raise APIError(str(e), 400, "tool_choice") from e

    # reasoning effort: the engine closes the thinking block when its budget is spent
    if not (forced or sp.json_schema or sp.regex or sp.ebnf):
        budget = thinking_budget(rr, plan, max_new)
        if budget is not None:
            sp.thinking_budget, sp.think_end = budget, plan.think_end

    # output parsers
    reasoning_parser = args.reasoning_parser if req.separate_reasoning and not forced and plan.use_parser else None
    tool_parser = None
    if tools:
        tool_parser = args.tool_call_parser or DEFAULT_TOOL_PARSERS.get(state.model_type or "")
    force_reasoning = plan.force_reasoning

    def new_output():
        if forced:
            return ForcedToolOutput(named)
        try:
            return ChoiceOutput(make_output_parser(reasoning_parser, tool_parser, tools, force_reasoning))
        except Exception as e:  # noqa: BLE001 - e.g. parsers not available
            raise APIError(f"could not set up the output parser: {e}", 500) from e

    return PreparedChat(prompt_ids, sp, rr, top_n, new_output)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = _state(request)
    req, raw = await parse_body(request, ChatCompletionRequest)
    state.require_ready()
    n = _check_n(req)
    chat = prepare_chat(state, req, raw)
    prompt_ids, sp, rr, top_n = chat.prompt_ids, chat.sp, chat.rr, chat.top_n
    tm = state.tm
    args = state.args
    outputs = [chat.new_output() for _ in range(n)]
    check_overload(state.engine, args.max_queued_requests, n)
    base_id = req.rid or new_id()
    reqs = _sub_requests(base_id, [prompt_ids], n, sp)
    model = _model_name(state, req)
    created = now()

    if not req.stream:
        results = await run_to_completion(state, base_id, reqs, request)
        if results is None:
            return JSONResponse({}, status_code=499)  # the client went away
        choices = []
        reasoning_tokens = 0
        for idx, (r, o) in enumerate(zip(results, outputs)):
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
                lp = {"content": _chat_logprob_entries(state, r.token_ids, r.logprobs, top_n or 0)}
            choices.append({
                "index": idx,
                "message": {"role": "assistant", "content": content, "reasoning_content": reasoning,
                            "reasoning": reasoning, "tool_calls": tool_calls},
                "logprobs": lp, "finish_reason": finish, "matched_stop": matched})
        return {"id": base_id, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(results, [len(prompt_ids)], n, reasoning_tokens),
                "metadata": METADATA}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        on_close, gen, first = await start_stream(state, base_id, reqs, request)
    except ClientDisconnected:
        return JSONResponse({}, status_code=499)

    def chunk(idx: int, delta: dict, finish=None, matched=None, logprobs=None) -> str:
        return sse({"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                                 "matched_stop": matched}],
                    "usage": None})

    def delta_dict(d: Delta, idx: int, seen_calls: set) -> dict:
        out = {}
        if d.content:
            out["content"] = d.content
        if d.reasoning and not rr.exclude:
            out["reasoning_content"] = out["reasoning"] = d.reasoning
        if d.tool_calls:
            calls = []
            for c in d.tool_calls:
                entry = {"index": c.index, "type": "function", "function": {"arguments": c.arguments or ""}}
                if c.index not in seen_calls:
                    seen_calls.add(c.index)
                    entry["id"] = c.id or f"call_{uuid.uuid4().hex[:24]}"
                elif c.id:
                    entry["id"] = c.id
                if c.name:
                    entry["function"]["name"] = c.name
                calls.append(entry)
            out["tool_calls"] = calls
        return out

    async def stream():
        results = [SubResult() for _ in reqs]
        seen_calls = [set() for _ in reqs]
        held = [""] * len(reqs)  # reasoning held back (stream_reasoning=false)
        try:
            for idx in range(n):
                yield chunk(idx, {"role": "assistant", "content": ""})
            async for idx, out in stream_items(first, gen):
                results[idx].add(out)
                o = outputs[idx]
                d = o.feed(out.text_delta)
                lp = None
                if req.logprobs and out.new_token_ids:
                    lp = {"content": _chat_logprob_entries(state, out.new_token_ids, out.logprobs or [],
                                                           top_n or 0)}
                if out.finished:
                    tail = o.finish()
                    d = Delta(d.content + tail.content, d.reasoning + tail.reasoning, d.tool_calls + tail.tool_calls)
                if not req.stream_reasoning:  # the reasoning in one piece, once it is complete
                    held[idx] += d.reasoning
                    d.reasoning = ""
                    if held[idx] and (d.content or d.tool_calls or out.finished):
                        d.reasoning, held[idx] = held[idx], ""
                dd = delta_dict(d, idx, seen_calls[idx])
                if dd or lp:
                    yield chunk(idx, dd, logprobs=lp)
                if out.finished:
                    finish = out.finish_reason
                    matched = _matched(out)
                    if o.tool_calls and finish == "stop":
                        finish, matched = "tool_calls", None
                    yield chunk(idx, {}, finish, matched)
            if include_usage:
                rt = sum(tm.count_tokens(o.reasoning) for o in outputs)
                yield sse({"id": base_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": _usage(results, [len(prompt_ids)], n, rt)})
        except EngineRequestError as e:
            yield sse_error(e.message, e.status)
        finally:
            on_close()
        yield SSE_DONE

    return SSEResponse(stream(), on_close=on_close)
