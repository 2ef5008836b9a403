"""SGLang's native routes: /generate, /health, /health_generate, /get_model_info, /get_server_info,
/flush_cache, /abort_request, and the parser helpers /separate_reasoning and
/parse_function_call."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

import ember
from ember.api.errors import APIError
from ember.api.protocol import (
    AbortRequest, GenerateRequest, NativeSamplingParams, ParseFunctionCallRequest, SeparateReasoningRequest,
)
from ember.api.request_builder import fan_out, native_sampling, prompts_to_ids
from ember.api.runner import Formatter, run
from ember.api.serving import (
    MAX_N, SubResult, check_overload, collect, engine_stats, new_id, parse_body, resolve_max_new_tokens, sse,
)
from ember.engine.io_struct import GenerateReq
from ember.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.api.app import ServerState

router = APIRouter()


def _state(request: Request) -> "ServerState":
    return request.app.state.ember


# ---------------------------------------------------------------------------- health and info
# Empty bodies: documented as such in the OpenAPI schema (schemathesis checks responses against it)
HEALTH_RESPONSES = {200: {"description": "Ready (empty body)"},
                    503: {"description": "Loading, the engine failed, or the server is draining"}}


@router.get("/health", response_class=Response, responses=HEALTH_RESPONSES)
@router.head("/health", response_class=Response, responses=HEALTH_RESPONSES)
async def health(request: Request):
    state = _state(request)
    if not state.ready:
        return Response(status_code=503, content="the model is loading" if state.engine.failed is None
                        else "the engine failed", media_type="text/plain")
    return Response(status_code=200)


@router.get("/health_generate", response_class=Response, responses=HEALTH_RESPONSES)
async def health_generate(request: Request):
    state = _state(request)
    if not state.ready:
        return Response(status_code=503)
    sp = SamplingParams(max_new_tokens=1, temperature=0.0)
    ids = state.tm.encode("Hi") or [0]
    req = GenerateReq(rid=f"health-{new_id()}", input_ids=ids, sampling=sp)
    try:
        await asyncio.wait_for(collect(state.engine, [req], None), timeout=60)
    except Exception:  # noqa: BLE001
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/get_model_info")
@router.get("/model_info")
async def get_model_info(request: Request):
    state = _state(request)
    state.require_ready()
    info = state.engine.info
    return {
        "model_path": state.args.model_path or info.model_dir,
        "tokenizer_path": state.args.tokenizer_path or state.args.model_path or info.model_dir,
        "model_dir": info.model_dir,
        "served_model_name": state.served_model_name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": info.model_type,
        "architectures": info.architectures,
        "context_length": info.context_length,
        "vocab_size": info.vocab_size,
    }


@router.get("/get_server_info")
@router.get("/server_info")
async def get_server_info(request: Request):
    state = _state(request)
    args = dataclasses.asdict(state.args)
    if args.get("api_key"):
        args["api_key"] = "<hidden>"
    stats = await engine_stats(state)
    return {**args, "version": ember.__version__, "ready": state.ready, "engine_stats": stats,
            "internal_states": [stats], "context_length": state.tm.context_length if state.tm else None}


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request):
    state = _state(request)
    state.require_ready()
    out = await state.engine.control("flush_cache")
    if out.ok:
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")
    raise APIError("Cache not flushed: requests are running or waiting. Retry when the server is idle.", 400)


@router.post("/abort_request")
async def abort_request(request: Request):
    state = _state(request)
    body, _ = await parse_body(request, AbortRequest)
    state.require_ready()
    if body.abort_all:
        rids = state.engine.active_rids()
    else:
        if not body.rid:
            raise APIError("rid is required (or abort_all: true)", 400, "rid")
        rids = list(state.groups.get(body.rid, [])) or [body.rid]
    for rid in rids:
        state.engine.abort(rid)
    return {"success": True, "aborted": len(rids)}


# ---------------------------------------------------------------------------- /generate
def _pick(value, i, default):
    if isinstance(value, list):
        return value[i] if i < len(value) else default
    return value if value is not None else default


def _finish_info(r: SubResult) -> dict | None:
    if r.finish_reason is None:
        return None
    if r.finish_reason == "stop":
        return {"type": "stop", "matched": r.matched_stop}
    if r.finish_reason == "length":
        return {"type": "length", "length": r.completion_tokens}
    return {"type": r.finish_reason, "message": "request aborted" if r.finish_reason == "abort" else None}


@router.api_route("/generate", methods=["POST", "PUT"])
async def generate(request: Request):
    state = _state(request)
    body, _ = await parse_body(request, GenerateRequest)
    state.require_ready()
    tm = state.tm
    received = time.time()

    if (body.text is None) == (body.input_ids is None):
        raise APIError("give exactly one of text or input_ids", 400, "text")
    param = "text" if body.text is not None else "input_ids"
    _, prompts, batched = prompts_to_ids(tm, body.text if body.text is not None else body.input_ids, param)

    # sampling params (one dict or one per prompt)
    sps_in = body.sampling_params
    if isinstance(sps_in, list) and len(sps_in) != len(prompts):
        raise APIError(f"sampling_params has {len(sps_in)} entries for {len(prompts)} prompts", 400,
                       "sampling_params")
    sps, ns, owners, wants_prompt_lp = [], [], [], []  # owners: per engine request, its logprob options
    for i, ids in enumerate(prompts):
        p = _pick(sps_in, i, None) or NativeSamplingParams()
        if not 1 <= p.n <= MAX_N:
            raise APIError(f"sampling_params.n must be in [1, {MAX_N}], got {p.n}", 400, "sampling_params.n")
        return_logprob = bool(_pick(body.return_logprob, i, False))
        top_num = int(_pick(body.top_logprobs_num, i, 0) or 0)
        start_len = int(_pick(body.logprob_start_len, i, -1))
        max_new = resolve_max_new_tokens(p.max_new_tokens, len(ids), tm.context_length, "max_new_tokens",
                                         state.kv_capacity)
        sps.append(native_sampling(p, max_new, tm.vocab_size, top_num if return_logprob else None))
        ns.append(p.n)
        wants_prompt_lp.append(return_logprob and start_len >= 0)
        owners += [(return_logprob, top_num, start_len)] * p.n
    single = not batched and sum(ns) == 1
    rids_in = body.rid
    if single:
        base_id = (rids_in[0] if isinstance(rids_in, list) and rids_in else rids_in) or new_id()
    else:
        base_id = rids_in if isinstance(rids_in, str) else new_id()
    reqs = fan_out(base_id, prompts, sps, ns, rids=rids_in if isinstance(rids_in, list) else None,
                   prompt_logprobs=wants_prompt_lp)
    check_overload(state.engine, state.args.max_queued_requests, len(reqs))
    fmt = _GenerateFormatter(tm, body, reqs, owners, single, received)
    return await run(state, request, base_id, reqs, body.stream, fmt)


class _GenerateFormatter(Formatter):
    """SGLang's shape: {text, output_ids, meta_info} per request (a list when batched or n > 1); a stream
    sends the whole output so far with every event."""

    def __init__(self, tm, body: GenerateRequest, reqs: list[GenerateReq], owners: list, single: bool,
                 received: float):
        self.tm, self.body, self.reqs, self.owners, self.single, self.received = tm, body, reqs, owners, single, received

    def meta(self, k: int, r: SubResult, finished: bool) -> dict:
        return_logprob, top_num, start_len = self.owners[k]
        m = {"id": self.reqs[k].rid,
             "finish_reason": _finish_info(r) if finished else None,
             "prompt_tokens": r.prompt_tokens or len(self.reqs[k].input_ids),
             "weight_version": "default",
             "total_retractions": 0,
             "completion_tokens": r.completion_tokens or len(r.token_ids),
             "cached_tokens": r.cached_tokens,
             "e2e_latency": time.time() - self.received}
        if r.spec_verify_ct:  # speculative decoding: decode steps (each a verify) and tokens per step
            m["spec_verify_ct"] = r.spec_verify_ct
            m["spec_accept_length"] = m["completion_tokens"] / r.spec_verify_ct
        if return_logprob:
            text_too = self.body.return_text_in_logprobs

            def tok(t):
                return self.tm.token_text(t) if text_too else None

            m["output_token_logprobs"] = []
            m["output_top_logprobs"] = []
            for t, lp in zip(r.token_ids, r.logprobs):
                chosen, top = lp if isinstance(lp, (tuple, list)) and len(lp) == 2 else (lp, [])
                m["output_token_logprobs"].append([float(chosen), t, tok(t)])
                m["output_top_logprobs"].append([[float(l), tt, tok(tt)] for tt, l in (top or [])[:top_num]])
            if start_len >= 0:
                plps = list(r.prompt_logprobs or [])
                ids = self.reqs[k].input_ids
                plps += [None] * (len(ids) - len(plps))
                m["input_token_logprobs"] = [[lp, t, tok(t)] for t, lp in list(zip(ids, plps))[start_len:]]
        return m

    def result(self, k: int, r: SubResult, finished: bool = True) -> dict:
        return {"text": r.text, "output_ids": list(r.token_ids), "meta_info": self.meta(k, r, finished)}

    def response(self, results):
        out = [self.result(k, r) for k, r in enumerate(results)]
        return out[0] if self.single else out

    def on_output(self, k, out, result):
        event = self.result(k, result, out.finished)
        if not self.single:
            event["index"] = k
        yield sse(event)


# ---------------------------------------------------------------------------- parser helpers
@router.post("/separate_reasoning")
async def separate_reasoning(request: Request):
    """{text, reasoning_parser?, force_reasoning?} -> {text, reasoning_text}: the split the chat route
    makes for a finished output (reasoning_parser defaults to the server's --reasoning-parser)."""
    from ember.parsers import get_reasoning_parser
    state = _state(request)
    body, _ = await parse_body(request, SeparateReasoningRequest)
    name = body.reasoning_parser or state.args.reasoning_parser
    if not name:
        raise APIError("reasoning_parser is required (the server has no --reasoning-parser)", 400,
                       "reasoning_parser")
    try:
        parser = get_reasoning_parser(name, force_reasoning=body.force_reasoning)
    except ValueError as e:
        raise APIError(str(e), 400, "reasoning_parser") from e
    reasoning, text = parser.parse_full(body.text)
    return {"text": text, "reasoning_text": reasoning}


@router.post("/parse_function_call")
async def parse_function_call(request: Request):
    """{text, tools, tool_call_parser?} -> {normal_text, calls: [{tool_index, name, parameters}]}, as the
    chat route parses a finished output (tool_index: the call's position; parameters: JSON text)."""
    from ember.frontend.output_processor import DEFAULT_TOOL_PARSERS
    from ember.parsers import get_tool_call_parser
    state = _state(request)
    body, raw = await parse_body(request, ParseFunctionCallRequest)
    name = body.tool_call_parser or state.args.tool_call_parser or DEFAULT_TOOL_PARSERS.get(state.model_type or "")
    if not name:
        raise APIError("tool_call_parser is required (the server has no --tool-call-parser)", 400,
                       "tool_call_parser")
    try:
        parser = get_tool_call_parser(name, raw.get("tools") or [])
    except ValueError as e:
        raise APIError(str(e), 400, "tool_call_parser") from e
    normal_text, calls = parser.parse_full(body.text)
    return {"normal_text": normal_text,
            "calls": [{"tool_index": i, "name": c.name, "parameters": c.arguments} for i, c in enumerate(calls)]}
