"""The Anthropic-style Messages API: POST /v1/messages (and /v1/messages/count_tokens), for clients
written against the `anthropic` SDK.

A request is mapped onto a ChatCompletionRequest and goes through the chat route's own preparation
(`request_builder.prepare_chat`: chat template with tools, reasoning effort and thinking budget, sampling
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
from ember.api.protocol import ChatCompletionRequest, OutputConfig, _Lenient
from ember.api.request_builder import fan_out, load_chat_media, prepare_chat
from ember.api.runner import Formatter, run
from ember.api.serving import SubResult, check_overload, parse_body, sse
from ember.engine.engine_client import EngineRequestError
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
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)  # Anthropic's range
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
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
    if kind == "document":
        raise APIError(f"{param}: document blocks are not supported", 400, param)
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
    texts, calls, thinking, results, images = [], [], [], [], []
    for j, block in enumerate(m.content):
        p = f"messages.{i}.content.{j}"
        kind = _block_type(block, p)
        if kind == "text":
            texts.append(_text(block.get("text"), f"{p}.text"))
        elif kind == "image" and m.role == "user":  # an image_url part where it stands among the texts
            images.append((len(texts), _image_url(block.get("source"), f"{p}.source")))
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
    if texts or calls or thinking or images or not results:
        turn = {"role": m.role, "content": "\n".join(texts)}
        if images:
            parts, k = [], 0
            for at, url in images + [(len(texts), None)]:
                if at > k:
                    parts.append({"type": "text", "text": "\n".join(texts[k:at])})
                    k = at
                if url is not None:
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            turn["content"] = parts
        if calls:
            turn["tool_calls"] = calls
        if thinking:
            turn["reasoning_content"] = "\n".join(thinking)
        turns = turns + [turn]
    return turns


def _image_url(source, param: str) -> str:
    """An Anthropic image source as the URL the media loader takes: base64 -> data: URL, url, file id."""
    if not isinstance(source, dict):
        raise APIError(f"{param} must be an object", 400, param)
    kind = source.get("type")
    if kind == "base64":
        media_type = _text(source.get("media_type", "image/png"), f"{param}.media_type")
        return f"data:{media_type};base64,{_text(source.get('data'), f'{param}.data')}"
    if kind == "url":
        return _text(source.get("url"), f"{param}.url")
    if kind == "file":
        return _text(source.get("file_id"), f"{param}.file_id")
    raise APIError(f"{param}.type must be base64, url or file, got {kind!r}", 400, f"{param}.type")


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
        raw, media = await load_chat_media(state, raw, request.app)
        return {"input_tokens": len(prepare_chat(state, creq, raw, media).prompt_ids)}
    except APIError as e:
        return _error(e)


async def _messages(request: Request):
    state = _state(request)
    req, _ = await parse_body(request, MessagesRequest)
    state.require_ready()
    creq, raw = chat_request(req)
    raw, media = await load_chat_media(state, raw, request.app)  # image blocks
    chat = prepare_chat(state, creq, raw, media)
    check_overload(state.engine, state.args.max_queued_requests, 1)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    reqs = fan_out(msg_id, [chat.prompt_ids], [chat.sp], [1], mm=chat.mm)
    fmt = _MessageFormatter(msg_id, req.model or state.served_model_name, len(chat.prompt_ids), chat.new_output())
    return await run(state, request, msg_id, reqs, req.stream, fmt)


class _MessageFormatter(Formatter):
    """Anthropic's message, or its event sequence: message_start, ping, content blocks (BlockEvents),
    message_delta (stop reason, usage), message_stop. No [DONE]; errors are `error` events."""
    done = None

    def __init__(self, msg_id: str, model: str, prompt_len: int, output):
        self.msg_id, self.model, self.prompt_len, self.o = msg_id, model, prompt_len, output
        self.blocks = BlockEvents()

    def message(self, content: list[dict], stop_reason, stop_sequence, usage: dict) -> dict:
        return {"id": self.msg_id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    def response(self, results: list[SubResult]) -> dict:
        r, o = results[0], self.o
        o.feed(r.text)
        o.finish()
        return self.message(message_content(o), *_stop_reason(r, o.tool_calls), _result_usage(r, self.prompt_len))

    def start(self, first):
        usage = _usage((first and first.prompt_tokens) or self.prompt_len, first.cached_tokens if first else 0, 0)
        yield _event("message_start", {"type": "message_start", "message": self.message([], None, None, usage)})
        yield _event("ping", {"type": "ping"})

    def on_output(self, idx, out, result):
        yield from self.blocks.feed(self.o.feed(out.text_delta))
        if out.finished:
            yield from self.blocks.feed(self.o.finish())

    def finish(self, results):
        yield from self.blocks.finish()
        stop_reason, stop_sequence = _stop_reason(results[0], self.o.tool_calls)
        yield _event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                       "usage": _result_usage(results[0], self.prompt_len)})
        yield _event("message_stop", {"type": "message_stop"})

    def error(self, e: EngineRequestError) -> str:
        return _event("error", anthropic_error_body(e.message, e.status))
