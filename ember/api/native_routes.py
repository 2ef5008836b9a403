"""SGLang's native routes: /generate, /health, /health_generate, /get_model_info, /get_server_info,
/flush_cache, /abort_request, /metrics (Prometheus text), and the parser helpers /separate_reasoning and
/parse_function_call."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import ember
from ember.api.errors import APIError
from ember.api.protocol import (
    AbortRequest, GenerateRequest, NativeSamplingParams, ParseFunctionCallRequest, SeparateReasoningRequest,
)
from ember.api.serving import (
    MAX_N, SSE_DONE, ClientDisconnected, SSEResponse, SubResult, check_overload, collect,
    json_schema_text, new_id, parse_body, parse_logit_bias,
    resolve_max_new_tokens, run_to_completion, stream_items, sse, sse_error, start_stream, validate_sampling,
)
from ember.engine.engine_client import EngineRequestError
from ember.engine.io_struct import GenerateReq
from ember.engine.sampling_params import SamplingParams
from ember.frontend.tokenizer_manager import PromptError

if TYPE_CHECKING:
    from ember.api.app import ServerState

router = APIRouter()


def _state(request: Request) -> "ServerState":
    return request.app.state.ember


# ---------------------------------------------------------------------------- health and info
@router.get("/health")
@router.head("/health")
async def health(request: Request):
    state = _state(request)
    if not state.ready:
        return Response(status_code=503, content="the model is loading" if state.engine.failed is None
                        else "the engine failed", media_type="text/plain")
    return Response(status_code=200)


@router.get("/health_generate")
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


async def _engine_stats(state) -> dict:
    if not state.ready:
        return {}
    try:
        out = await state.engine.control("get_stats", timeout=10)
        return dict(out.data) if out.ok else {}
    except Exception:  # noqa: BLE001
        return dict(state.engine.stats)


@router.get("/get_server_info")
@router.get("/server_info")
async def get_server_info(request: Request):
    state = _state(request)
    args = dataclasses.asdict(state.args)
    if args.get("api_key"):
        args["api_key"] = "<hidden>"
    stats = await _engine_stats(state)
    return {**args, "version": ember.__version__, "ready": state.ready, "engine_stats": stats,
            "internal_states": [stats], "context_length": state.tm.context_length if state.tm else None}


@router.get("/metrics")
async def metrics(request: Request):
    state = _state(request)
    stats = await _engine_stats(state)
    lines = []
    for key in ("total_pages", "free_pages", "cached_pages", "running", "waiting", "page_size",
                "total_preemptions"):
        if isinstance(stats.get(key), (int, float)):
            lines.append(f"# TYPE ember_{key} gauge")
            lines.append(f"ember_{key} {stats[key]}")
    lines.append("# TYPE ember_outstanding_requests gauge")
    lines.append(f"ember_outstanding_requests {state.engine.num_outstanding}")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


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
def _native_sampling(p: NativeSamplingParams, max_new: int, vocab_size: int, logprobs: int | None) -> SamplingParams:
    stop = [p.stop] if isinstance(p.stop, str) else [s for s in (p.stop or []) if s]
    sp = SamplingParams(
        max_new_tokens=max_new, min_new_tokens=p.min_new_tokens, stop=stop,
        stop_token_ids=list(p.stop_token_ids or []), temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        min_p=p.min_p, top_a=p.top_a, frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty, ignore_eos=p.ignore_eos, skip_special_tokens=p.skip_special_tokens,
        logit_bias=parse_logit_bias(p.logit_bias, "sampling_params.logit_bias"),
        seed=p.sampling_seed if p.sampling_seed is not None else p.seed,
        logprobs=logprobs, json_schema=json_schema_text(p.json_schema), regex=p.regex, ebnf=p.ebnf)
    validate_sampling(sp, vocab_size, {"min_tokens": "min_new_tokens", "top_logprobs": "top_logprobs_num"})
    return sp


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

    # inputs
    if (body.text is None) == (body.input_ids is None):
        raise APIError("give exactly one of text or input_ids", 400, "text")
    if body.text is not None:
        batched = isinstance(body.text, list)
        texts = body.text if batched else [body.text]
        if not texts:
            raise APIError("text is an empty list", 400, "text")
        prompts = [tm.encode(t) for t in texts]
    else:
        ids = body.input_ids
        batched = bool(ids) and isinstance(ids[0], list)
        prompts = [list(x) for x in ids] if batched else [list(ids)]
    for ids in prompts:
        try:
            tm.check_token_ids(ids, "input_ids" if body.input_ids is not None else "text")
        except PromptError as e:
            raise APIError(str(e), 400, e.param) from e

    # sampling params (one dict or one per prompt)
    sps_in = body.sampling_params
    if isinstance(sps_in, list):
        if len(sps_in) != len(prompts):
            raise APIError(f"sampling_params has {len(sps_in)} entries for {len(prompts)} prompts", 400,
                           "sampling_params")
    reqs: list[GenerateReq] = []
    base_id = new_id()
    rids_in = body.rid
    owners = []  # (prompt index, sample index)
    for i, ids in enumerate(prompts):
        p = _pick(sps_in, i, None) or NativeSamplingParams()
        if not 1 <= p.n <= MAX_N:
            raise APIError(f"sampling_params.n must be in [1, {MAX_N}], got {p.n}", 400, "sampling_params.n")
        return_logprob = bool(_pick(body.return_logprob, i, False))
        top_num = int(_pick(body.top_logprobs_num, i, 0) or 0)
        start_len = int(_pick(body.logprob_start_len, i, -1))
        max_new = resolve_max_new_tokens(p.max_new_tokens, len(ids), tm.context_length, "max_new_tokens",
                                         state.kv_capacity)
        sp = _native_sampling(p, max_new, tm.vocab_size, top_num if return_logprob else None)
        for j in range(p.n):
            s = sp if p.n == 1 else dataclasses.replace(sp, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids),
                                                        logit_bias=dict(sp.logit_bias),
                                                        seed=None if sp.seed is None else sp.seed + j)
            rid = _pick(rids_in, i, None) if p.n == 1 else None
            reqs.append(GenerateReq(rid=rid or "", input_ids=ids, sampling=s,
                                    return_prompt_logprobs=return_logprob and start_len >= 0))
            owners.append((i, return_logprob, top_num, start_len))
    single = not batched and len(reqs) == 1
    if single:
        base_id = reqs[0].rid or base_id
        reqs[0].rid = base_id
    else:
        if isinstance(rids_in, str):
            base_id = rids_in
        for k, r in enumerate(reqs):
            r.rid = r.rid or f"{base_id}-{k}"
    check_overload(state.engine, state.args.max_queued_requests, len(reqs))

    def meta(k: int, r: SubResult, finished: bool) -> dict:
        _, return_logprob, top_num, start_len = owners[k]
        m = {"id": reqs[k].rid,
             "finish_reason": _finish_info(r) if finished else None,
             "prompt_tokens": r.prompt_tokens or len(reqs[k].input_ids),
             "weight_version": "default",
             "total_retractions": 0,
             "completion_tokens": r.completion_tokens or len(r.token_ids),
             "cached_tokens": r.cached_tokens,
             "e2e_latency": time.time() - received}
        if return_logprob:
            text_too = body.return_text_in_logprobs

            def tok(t):
                return tm.token_text(t) if text_too else None

            m["output_token_logprobs"] = []
            m["output_top_logprobs"] = []
            for t, lp in zip(r.token_ids, r.logprobs):
                chosen, top = lp if isinstance(lp, (tuple, list)) and len(lp) == 2 else (lp, [])
                m["output_token_logprobs"].append([float(chosen), t, tok(t)])
                m["output_top_logprobs"].append([[float(l), tt, tok(tt)] for tt, l in (top or [])[:top_num]])
            if start_len >= 0:
                plps = list(r.prompt_logprobs or [])
                ids = reqs[k].input_ids
                plps += [None] * (len(ids) - len(plps))
                m["input_token_logprobs"] = [[lp, t, tok(t)] for t, lp in list(zip(ids, plps))[start_len:]]
        return m

    def result(k: int, r: SubResult, finished: bool = True) -> dict:
        return {"text": r.text, "output_ids": list(r.token_ids), "meta_info": meta(k, r, finished)}

    if not body.stream:
        results = await run_to_completion(state, base_id, reqs, request)
        if results is None:
            return JSONResponse({}, status_code=499)  # the client went away
        out = [result(k, r) for k, r in enumerate(results)]
        return out[0] if single else out

    try:
        on_close, gen, first = await start_stream(state, base_id, reqs, request)
    except ClientDisconnected:
        return JSONResponse({}, status_code=499)

    async def stream():
        results = [SubResult() for _ in reqs]
        try:
            async for k, out in stream_items(first, gen):
                results[k].add(out)
                event = result(k, results[k], out.finished)
                if not single:
                    event["index"] = k
                yield sse(event)
        except EngineRequestError as e:
            yield sse_error(e.message, e.status)
        finally:
            on_close()
        yield SSE_DONE

    return SSEResponse(stream(), on_close=on_close)


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
