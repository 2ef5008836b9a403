"""The Anthropic-style Messages API: POST /v1/messages (and /v1/messages/count_tokens), for clients
written against the `anthropic` SDK.

A request is mapped onto a ChatCompletionRequest and goes through the chat route's own preparation
(`openai_routes.prepare_chat`: chat template with tools, reasoning effort and thinking budget, sampling
defaults, constrained decoding for tool_choice any / tool, the reasoning and tool-call parsers). Only
the shapes differ: content blocks in (text, tool_use, tool_result) and out (thinking, text, tool_use),
Anthropic's stop reasons and usage, its SSE event sequence, and its error JSON.

Mapping: system -> a system message; tool_use blocks -> assistant tool_calls; tool_result blocks ->
tool messages; thinking blocks in the history -> reasoning_content; tools[].input_schema ->
function parameters; tool_choice auto/any/tool/none -> auto/required/named/none
(disable_parallel_tool_use -> parallel_tool_calls=false); stop_sequences -> stop;
thinking {enabled, budget_tokens} -> reasoning.max_tokens, {disabled} -> effort none;
output_config.effort as in ember/api/reasoning.py, output_config.format (json_schema) -> response_format. A conversation ending with an assistant turn is
continued (Anthropic's prefill). Usage follows Anthropic: input_tokens are the prompt tokens that were
not read from the prefix cache, cache_read_input_tokens the ones that were.
"""
from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from ember.api.errors import APIError, anthropic_error_body, validation_message
from ember.api.openai_routes import prepare_chat
from ember.api.protocol import ChatCompletionRequest, OutputConfig, _Lenient
from ember.api.serving import (
    ClientDisconnected, SSEResponse, SubResult, check_overload, parse_body, run_to_completion, sse,
    start_stream, stream_items,
)
from ember.engine.engine_client import EngineRequestError
from ember.engine.io_struct import GenerateReq
from ember.frontend.output_processor import Delta

if TYPE_CHECKING:
    from ember.api.app import ServerState

router = APIRouter()


# ---------------------------------------------------------------------------- request models
class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(_Lenient):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # custom tools only ("custom" or absent)


class AnthropicToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Lenient):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]  # adaptive, between_tools: the default
    budget_tokens: int | None = None


class JSONOutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class AnthropicOutputConfig(OutputConfig):
    format: JSONOutputFormat | None = None  # structured output: response_format json_schema


class CountTokensRequest(_Lenient):
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: AnthropicOutputConfig | None = None
    max_tokens: int | None = Field(default=None, ge=1)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted, not used


# ---------------------------------------------------------------------------- request -> chat
def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise APIError(f"{param} must be a string", 400, param)
    return value


def _block_type(block: dict, param: str) -> str:
    kind = block.get("type")
    if kind in ("image", "document"):
        raise APIError(f"{param}: {kind} blocks are not supported: the served model takes text only", 400, param)
    if not isinstance(kind, str):
        raise APIError(f"{param} has no 'type'", 400, param)
    return kind


def _texts(blocks: list[dict], param: str) -> str:
    """The text of a list of text blocks (system, tool_result content)."""
    parts = []
    for j, block in enumerate(blocks):
        p = f"{param}.{j}"
        if not isinstance(block, dict) or _block_type(block, p) != "text":
            raise APIError(f"{p}: only text blocks are supported here", 400, p)
        parts.append(_text(block.get("text"), f"{p}.text"))
    return "\n".join(parts)


def _chat_turns(i: int, m: AnthropicMessage) -> list[dict]:
    """One Anthropic message as chat messages (a user turn with tool results gives tool messages first)."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    texts, calls, thinking, results = [], [], [], []
    for j, block in enumerate(m.content):
        p = f"messages.{i}.content.{j}"
        kind = _block_type(block, p)
        if kind == "text":
            texts.append(_text(block.get("text"), f"{p}.text"))
        elif kind == "tool_use" and m.role == "assistant":
            args = block.get("input", {})
            if not isinstance(args, dict):
                raise APIError(f"{p}.input must be an object", 400, f"{p}.input")
            calls.append({"id": _text(block.get("id"), f"{p}.id"), "type": "function",
                          "function": {"name": _text(block.get("name"), f"{p}.name"),
                                       "arguments": json.dumps(args, ensure_ascii=False)}})
        elif kind == "tool_result" and m.role == "user":
            content = block.get("content", "")
            if isinstance(content, list):
                content = _texts(content, f"{p}.content")
            results.append({"role": "tool", "tool_call_id": _text(block.get("tool_use_id"), f"{p}.tool_use_id"),
                            "content": _text(content, f"{p}.content")})
        elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
            if kind == "thinking":
                thinking.append(_text(block.get("thinking", ""), f"{p}.thinking"))
        else:
            raise APIError(f"{p}: blocks of type {kind!r} are not supported in a {m.role} message", 400, p)
    turns = results
    if texts or calls or thinking or not results:
        turn = {"role": m.role, "content": "\n".join(texts)}
        if calls:
            turn["tool_calls"] = calls
        if thinking:
            turn["reasoning_content"] = "\n".join(thinking)
        turns = turns + [turn]
    return turns


def _tool(i: int, t: AnthropicTool) -> dict:
    if t.type not in (None, "custom"):
        raise APIError(f"tools.{i}: server tools ({t.type!r}) are not supported; give a custom tool with "
                       f"name, description and input_schema", 400, f"tools.{i}.type")
    fn = {"name": t.name}
    if t.description is not None:
        fn["description"] = t.description
    fn["parameters"] = t.input_schema or {"type": "object", "properties": {}}
    return {"type": "function", "function": fn}


def chat_request(req: CountTokensRequest) -> tuple[ChatCompletionRequest, dict]:
    """The ChatCompletionRequest (and its raw dict) that the Anthropic request means."""
    messages = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _texts(req.system, "system")
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        messages.extend(_chat_turns(i, m))
    chat: dict[str, Any] = {"messages": messages, "max_tokens": req.max_tokens}
    last = messages[-1]
    if last["role"] == "assistant" and not last.get("tool_calls"):
        chat["continue_final_message"] = True  # Anthropic's prefill: the answer continues that turn
    for name in ("model", "temperature", "top_p", "top_k", "stream"):
        value = getattr(req, name, None)
        if value is not None:
            chat[name] = value
    if getattr(req, "stop_sequences", None):
        chat["stop"] = list(req.stop_sequences)
    if req.tools:
        chat["tools"] = [_tool(i, t) for i, t in enumerate(req.tools)]
    tc = req.tool_choice
    if tc is not None:
        if tc.type == "tool":
            if not tc.name:
                raise APIError("tool_choice of type 'tool' needs a name", 400, "tool_choice.name")
            chat["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
        else:
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[tc.type]
        if tc.disable_parallel_tool_use:
            chat["parallel_tool_calls"] = False
    th = req.thinking
    if th is not None and th.type == "disabled":
        chat["reasoning"] = {"enabled": False}
    elif th is not None and th.type == "enabled" and th.budget_tokens is not None:
        if th.budget_tokens < 0:
            raise APIError(f"thinking.budget_tokens must be >= 0, got {th.budget_tokens}", 400,
                           "thinking.budget_tokens")
        chat["reasoning"] = {"max_tokens": th.budget_tokens}
    oc = req.output_config
    if oc is not None:
        chat["output_config"] = {"effort": oc.effort}
        if oc.format is not None:
            chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": oc.format.schema_}}
    try:
        return ChatCompletionRequest.model_validate(chat), chat
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise APIError(message, 400, param) from e


# ---------------------------------------------------------------------------- response
def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {}  # cut short by max_tokens
    return value if isinstance(value, dict) else {}


def _has_text(content: str, tool_calls) -> bool:
    """A text block is sent unless it is only whitespace next to tool calls."""
    return bool(content.strip()) or bool(content and not tool_calls)


def _stop_reason(result: SubResult, tool_calls) -> tuple[str, str | None]:
    if result.finish_reason == "length":
        return "max_tokens", None
    if tool_calls:
        return "tool_use", None
    if result.finish_reason == "stop" and isinstance(result.matched_stop, str):
        return "stop_sequence", result.matched_stop
    return "end_turn", None


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict:
    cached = min(cached, prompt_tokens)
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _result_usage(r: SubResult, prompt_len: int) -> dict:
    return _usage(r.prompt_tokens or prompt_len, r.cached_tokens, r.completion_tokens or len(r.token_ids))


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\n" + sse(data)


class BlockEvents:
    """Parser deltas -> content_block_start / _delta / _stop events, one block open at a time, in the
    order the output comes: thinking, text, tool_use. Whitespace-only text is held back until real text
    follows (then it opens the text block) or the end (sent unless tool calls came), as the
    non-streamed response leaves it out next to tool calls."""

    def __init__(self):
        self.index = -1
        self.open = None  # "thinking", "text", ("tool_use", parser call index), or None
        self.pending = ""
        self.tool_used = False
        self.calls: dict[int, dict] = {}  # parser call index -> {"name", "args" (not yet sent), "started"}

    def _stop(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _start(self, key, block: dict) -> list[str]:
        events = self._stop()
        self.index += 1
        self.open = key
        events.append(_event("content_block_start",
                             {"type": "content_block_start", "index": self.index, "content_block": block}))
        return events

    def _delta(self, delta: dict) -> str:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _text(self, text: str) -> list[str]:
        events = [] if self.open == "text" else self._start("text", {"type": "text", "text": ""})
        self.pending = ""
        return events + [self._delta({"type": "text_delta", "text": text})]

    def feed(self, d: Delta) -> list[str]:
        events = []
        if d.reasoning:
            if self.open != "thinking":
                events += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": d.reasoning}))
        if d.content:
            text = self.pending + d.content
            if self.open == "text" or text.strip():
                events += self._text(text)
            else:
                self.pending = text
        for c in d.tool_calls:
            call = self.calls.setdefault(c.index, {"name": None, "args": "", "started": False})
            call["name"] = call["name"] or c.name
            call["args"] += c.arguments or ""
            if self.open != ("tool_use", c.index):
                if call["started"] or not call["name"]:
                    continue  # a late delta of a closed call, or no name yet
                call["started"], self.tool_used, self.pending = True, True, ""
                events += self._start(("tool_use", c.index),
                                      {"type": "tool_use", "id": _tool_id(), "name": call["name"], "input": {}})
            if call["args"]:
                events.append(self._delta({"type": "input_json_delta", "partial_json": call["args"]}))
                call["args"] = ""
        return events

    def finish(self) -> list[str]:
        events = self._text(self.pending) if self.pending and not self.tool_used else []
        return events + self._stop()


def message_content(o) -> list[dict]:
    """The content blocks of a finished output (ChoiceOutput or ForcedToolOutput)."""
    blocks = []
    if o.reasoning:
        blocks.append({"type": "thinking", "thinking": o.reasoning, "signature": ""})
    if _has_text(o.content, o.tool_calls):
        blocks.append({"type": "text", "text": o.content})
    for c in o.tool_calls:
        blocks.append({"type": "tool_use", "id": _tool_id(), "name": c["name"], "input": _tool_input(c["arguments"])})
    return blocks


# ---------------------------------------------------------------------------- routes
def _state(request: Request) -> "ServerState":
    return request.app.state.ember


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(anthropic_error_body(e.message, e.status), status_code=e.status)


@router.post("/v1/messages")
async def messages(request: Request):
    try:
        return await _messages(request)
    except APIError as e:
        return _error(e)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request):
    try:
        state = _state(request)
        req, _ = await parse_body(request, CountTokensRequest)
        state.require_ready()
        creq, raw = chat_request(req)
        return {"input_tokens": len(prepare_chat(state, creq, raw).prompt_ids)}
    except APIError as e:
        return _error(e)


async def _messages(request: Request):
    state = _state(request)
    req, _ = await parse_body(request, MessagesRequest)
    state.require_ready()
    creq, raw = chat_request(req)
    chat = prepare_chat(state, creq, raw)
    check_overload(state.engine, state.args.max_queued_requests, 1)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    gen_reqs = [GenerateReq(rid=msg_id, input_ids=list(chat.prompt_ids), sampling=chat.sp)]
    model = req.model or state.served_model_name
    prompt_len = len(chat.prompt_ids)
    o = chat.new_output()

    def message(content: list[dict], stop_reason, stop_sequence, usage: dict) -> dict:
        return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    if not req.stream:
        results = await run_to_completion(state, msg_id, gen_reqs, request)
        if results is None:
            return JSONResponse({}, status_code=499)  # the client went away
        r = results[0]
        o.feed(r.text)
        o.finish()
        return message(message_content(o), *_stop_reason(r, o.tool_calls), _result_usage(r, prompt_len))

    try:
        on_close, gen, first = await start_stream(state, msg_id, gen_reqs, request)
    except ClientDisconnected:
        return JSONResponse({}, status_code=499)

    async def stream():
        result = SubResult()
        blocks = BlockEvents()
        try:
            out0 = first[1] if first is not None else None  # the prefetched first output
            start_usage = _usage((out0 and out0.prompt_tokens) or prompt_len, out0.cached_tokens if out0 else 0, 0)
            yield _event("message_start", {"type": "message_start",
                                           "message": message([], None, None, start_usage)})
            yield _event("ping", {"type": "ping"})
            async for _, out in stream_items(first, gen):
                result.add(out)
                for ev in blocks.feed(o.feed(out.text_delta)):
                    yield ev
                if out.finished:
                    for ev in blocks.feed(o.finish()):
                        yield ev
            for ev in blocks.finish():
                yield ev
            stop_reason, stop_sequence = _stop_reason(result, o.tool_calls)
            yield _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": _result_usage(result, prompt_len)})
            yield _event("message_stop", {"type": "message_stop"})
        except EngineRequestError as e:
            yield _event("error", anthropic_error_body(e.message, e.status))
        finally:
            on_close()

    return SSEResponse(stream(), on_close=on_close)
