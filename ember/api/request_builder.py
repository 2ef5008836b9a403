"""The one builder of internal requests: every API (OpenAI completions and chat, the Anthropic-style
Messages API, SGLang's native /generate) turns its body into token ids and a SamplingParams here, and
`fan_out` makes the engine requests (n samples per prompt, seeds offset per sample). Route modules import
this module, never each other."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ember.api.errors import APIError
from ember.api.protocol import ChatCompletionRequest, NativeSamplingParams
from ember.api.reasoning import (
    ReasoningRequest, parse_reasoning_request, plan_reasoning, template_switches, thinking_budget,
)
from ember.api.serving import MAX_N, json_schema_text, parse_logit_bias, resolve_max_new_tokens, validate_sampling
from ember.engine.io_struct import GenerateReq
from ember.engine.sampling_params import SamplingParams
from ember.frontend.output_processor import (
    DEFAULT_TOOL_PARSERS, ChoiceOutput, ForcedToolOutput, forced_tool_schema, make_output_parser,
)
from ember.frontend.tokenizer_manager import PromptError

if TYPE_CHECKING:
    from ember.api.app import ServerState

SAMPLING_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


# ---------------------------------------------------------------------------- prompts
def prompts_to_ids(tm, value, param: str) -> tuple[list[str | None], list[list[int]], bool]:
    """(texts or None per prompt, token ids per prompt, batched) of a prompt given as a string, a list of
    strings, a list of token ids or a list of token-id lists; each checked against the vocabulary."""
    if isinstance(value, str):
        texts, prompts, batched = [value], [tm.encode(value)], False
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        texts, prompts, batched = list(value), [tm.encode(x) for x in value], True
    elif isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        texts, prompts, batched = [None], [list(value)], False
    elif isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        texts, prompts, batched = [None] * len(value), [list(x) for x in value], True
    else:
        raise APIError(f"{param} must be a non-empty string, list of strings, list of token ids, or list of "
                       "token-id lists", 400, param)
    for ids in prompts:
        try:
            tm.check_token_ids(ids, param)
        except PromptError as e:
            raise APIError(str(e), 400, e.param or param) from e
    return texts, prompts, batched


# ---------------------------------------------------------------------------- sampling
def build_sampling(req, max_new_tokens: int, vocab_size: int, logprobs: int | None,
                   defaults: dict | None = None) -> SamplingParams:
    """`defaults`: the model's recommended values for fields the request leaves unset."""
    kw = dict(defaults or {})
    for name in ("temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if kw.get("top_p") == 0:  # seed 002 allows 0: nothing but the most likely token
        kw["top_p"], kw["top_k"] = 1.0, 1
    stop = req.stop
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    json_schema = json_schema_text(req.json_schema)
    regex, ebnf = req.regex, req.ebnf
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            # an object, as OpenAI promises (spelled so that the engine compiles it as a schema, not as
            # its builtin any-JSON grammar, which also allows `[0]`)
            json_schema = json_schema or '{"type":"object"}'
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


def native_sampling(p: NativeSamplingParams, max_new: int, vocab_size: int, logprobs: int | None) -> SamplingParams:
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


# ---------------------------------------------------------------------------- fan-out
def check_n(req) -> int:
    n = req.n
    if not 1 <= n <= MAX_N:
        raise APIError(f"n must be in [1, {MAX_N}], got {n}", 400, "n")
    if req.best_of is not None and req.best_of != n:
        raise APIError("best_of other than n is not supported", 400, "best_of")
    return n


def clone_sampling(sp: SamplingParams, seed_offset: int = 0) -> SamplingParams:
    """An independent copy for one more sample (its own lists; the seed moved on, so samples differ)."""
    return dataclasses.replace(sp, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids),
                               logit_bias=dict(sp.logit_bias),
                               seed=None if sp.seed is None else sp.seed + seed_offset)


def fan_out(base_id: str, prompts: list[list[int]], sps: list[SamplingParams], ns: list[int],
            rids: list[str | None] | None = None, prompt_logprobs: list[bool] | None = None,
            mm=None) -> list[GenerateReq]:
    """The engine requests of one HTTP request: ns[i] samples of prompt i with sps[i]. Ids: base_id when
    there is one request, else rids[i] (a caller's id for a single sample) or f"{base_id}-{k}"."""
    total = sum(ns)
    reqs = []
    for i, (ids, sp, n) in enumerate(zip(prompts, sps, ns)):
        for j in range(n):
            k = len(reqs)
            rid = base_id if total == 1 else ((rids[i] if rids and n == 1 else None) or f"{base_id}-{k}")
            reqs.append(GenerateReq(rid=rid, input_ids=list(ids), sampling=sp if total == 1 else clone_sampling(sp, j),
                                    return_prompt_logprobs=bool(prompt_logprobs and prompt_logprobs[i]),
                                    mm=mm))
    return reqs


# ---------------------------------------------------------------------------- chat
@dataclass
class PreparedChat:
    """A chat request turned into what the engine and the output parsers need (shared with the
    Anthropic-style /v1/messages, which maps its request onto a ChatCompletionRequest)."""
    prompt_ids: list[int]
    sp: SamplingParams
    rr: ReasoningRequest
    top_n: int | None
    new_output: Callable[[], "ChoiceOutput | ForcedToolOutput"]
    mm: object = None  # images/video (ember.multimodal.inputs.MultimodalInputs); prompt_ids then count their tokens


# ---------------------------------------------------------------------------- images and video
def media_planner(state: "ServerState"):
    """The served model's MediaPlanner (created on first use: it reads the model's configs)."""
    planner = getattr(state, "_media_planner", None)
    if planner is None:
        from ember.loader import resolve_model_dir
        from ember.multimodal.planner import MediaPlanner
        planner = MediaPlanner(resolve_model_dir(state.args.model_path), state.tm.tokenizer, state.served_model_name)
        state._media_planner = planner
    return planner


def has_media(raw: dict) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") in ("image_url", "video_url") for p in m["content"])
        for m in raw.get("messages") or [])


def _file_store(app):
    """The Files API store (shared with ember/api/files_routes.py through app.state), for stepfile:// media."""
    store = getattr(app.state, "file_store", None) if app is not None else None
    if store is None and app is not None:
        from ember.api.file_store import FileStore
        args = app.state.ember.args
        try:
            store = app.state.file_store = FileStore(args.file_storage_path, args.file_max_bytes)
        except OSError:
            return None
    return store


async def load_chat_media(state: "ServerState", raw: dict, app=None) -> tuple[dict, list | None]:
    """(raw with media parts replaced by placeholder text, the decoded and preprocessed media or None):
    fetched concurrently off the event loop; MediaErrors become 400/413 naming the part."""
    if not has_media(raw):
        return raw, None
    file_store = _file_store(app)
    from ember.multimodal.fetch import MediaLimits
    from ember.multimodal.video import MediaError
    try:
        planner = media_planner(state)
        limits = MediaLimits.from_args(state.args)
        messages, refs = planner.split_messages(raw.get("messages"), limits.max_items)
        media = await planner.load(refs, limits, file_store)
    except MediaError as e:
        raise APIError(str(e), e.status, "messages") from None
    return dict(raw, messages=messages), media


def prepare_chat(state: "ServerState", req: ChatCompletionRequest, raw: dict, media: list | None = None) -> PreparedChat:
    """Tools, reasoning effort, chat template, max tokens, sampling, constrained tool calls, parsers.
    media: from load_chat_media (raw then holds its placeholders), expanded into the prompt here."""
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
    mm = None
    if media:
        try:
            prompt_ids, mm = media_planner(state).expand(prompt_ids, media)
        except ValueError as e:
            raise APIError(f"images/videos do not match the prompt's placeholders: {e}", 400, "messages") from e

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

    return PreparedChat(prompt_ids, sp, rr, top_n, new_output, mm)
