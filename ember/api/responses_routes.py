"""OpenAI's Responses API: POST /v1/responses (plain and streamed), GET and DELETE /v1/responses/{id}.

A request is mapped onto a ChatCompletionRequest (input items -> chat messages, function tools -> chat tools,
`reasoning.effort`, `text.format` -> response_format) and goes through the one builder (`prepare_chat`) and
runner like every other API; this module only translates and shapes. Stored responses (`store`, default true)
keep their whole conversation so `previous_response_id` continues it; they live in memory, newest
STORE_LIMIT kept.
"""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any, Literal, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ember.api.errors import APIError
from ember.api.protocol import ChatCompletionRequest
from ember.api.request_builder import fan_out, prepare_chat
from ember.api.runner import Formatter, run
from ember.api.serving import SubResult, check_overload, parse_body, sse

router = APIRouter()
STORE_LIMIT = 1000


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = True
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None


def _state(request: Request):
    return request.app.state.ember


def _store(request: Request) -> OrderedDict:
    store = getattr(request.app.state, "responses", None)
    if store is None:
        store = request.app.state.responses = OrderedDict()
    return store


# ---------------------------------------------------------------------------- request -> chat
def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text", "text"):
                parts.append(str(part.get("text", "")))
            else:
                raise APIError(f"{where}: content part type {kind!r} is not supported (input_text, output_text)",
                               400, "input")
        return "".join(parts)
    raise APIError(f"{where}: content must be a string or a list of parts", 400, "input")


def input_messages(items: list[dict]) -> list[dict]:
    """Responses input items -> chat messages (consecutive function calls become one assistant turn)."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise APIError(f"input[{i}] must be an object", 400, "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(f"input[{i}].role must be user, assistant, system or developer", 400, "input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text_of(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if not call["function"]["name"]:
                raise APIError(f"input[{i}]: a function_call needs a name", 400, "input")
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise APIError(f"input[{i}]: a function_call_output needs its call_id", 400, "input")
            out = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": out if isinstance(out, str) else _text_of(out, f"input[{i}].output")})
        elif kind == "reasoning":
            continue  # a previous turn's reasoning: chat templates drop it too
        else:
            raise APIError(f"input[{i}]: item type {kind!r} is not supported", 400, "input")
    return messages


def chat_body(req: ResponsesRequest, history: list[dict]) -> tuple[dict, list[dict]]:
    """The chat-completions body this Responses request means, and its messages (for the store)."""
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    messages = history + input_messages(items)
    if not messages:
        raise APIError("input must not be empty", 400, "input")
    sent = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + messages
    body: dict[str, Any] = {"model": req.model, "messages": sent, "parallel_tool_calls": req.parallel_tool_calls}
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.tools:
        tools = []
        for t in req.tools:
            if t.get("type") != "function":
                raise APIError(f"tool type {t.get('type')!r} is not supported (function tools only)", 400, "tools")
            tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                             "strict") if k in t}})
        body["tools"] = tools
    if req.tool_choice is not None:
        tc = req.tool_choice
        body["tool_choice"] = tc if isinstance(tc, str) else {"type": "function",
                                                              "function": {"name": tc.get("name")}}
    if req.reasoning and req.reasoning.get("effort"):
        body["reasoning_effort"] = req.reasoning["effort"]
    fmt = (req.text or {}).get("format")
    if fmt and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "response"), "schema": fmt.get("schema") or {}, "strict": fmt.get("strict")}}
    elif fmt and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt and fmt.get("type") not in (None, "text"):
        raise APIError(f"text.format type {fmt.get('type')!r} is not supported", 400, "text")
    return body, messages


# ---------------------------------------------------------------------------- routes
@router.post("/v1/responses")
async def create_response(request: Request):
    state = _state(request)
    req, _raw = await parse_body(request, ResponsesRequest)
    state.require_ready()
    store = _store(request)
    history: list[dict] = []
    if req.previous_response_id:
        prev = store.get(req.previous_response_id)
        if prev is None:
            raise APIError(f"Previous response with id '{req.previous_response_id}' not found.", 404,
                           "previous_response_id")
        history = prev["messages"]
    body, messages = chat_body(req, history)
    creq = ChatCompletionRequest.model_validate(body)
    chat = prepare_chat(state, creq, body)
    check_overload(state.engine, state.args.max_queued_requests, 1)
    rid = f"resp_{uuid.uuid4().hex}"
    reqs = fan_out(rid, [chat.prompt_ids], [chat.sp], [1])
    fmt = _ResponsesFormatter(state, req, chat, rid, messages, store)
    return await run(state, request, rid, reqs, req.stream, fmt)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request):
    entry = _store(request).get(response_id)
    if entry is None:
        raise APIError(f"No response found with id '{response_id}'.", 404, "response_id")
    return entry["response"]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    if _store(request).pop(response_id, None) is None:
        raise APIError(f"No response found with id '{response_id}'.", 404, "response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


# ---------------------------------------------------------------------------- shaping
class _ResponsesFormatter(Formatter):
    """Builds the output items (reasoning, message, function calls) from the chat output parser, all at once or
    as the Responses stream events (with sequence numbers the SDK's stream helper checks)."""
    done = None  # the Responses stream has no [DONE] line

    def __init__(self, state, req: ResponsesRequest, chat, rid: str, messages: list[dict], store: OrderedDict):
        self.state, self.req, self.chat, self.rid, self.messages, self.store = state, req, chat, rid, messages, store
        self.output = chat.new_output()
        self.created = int(time.time())
        self.seq = 0
        self.items: list[dict] = []  # output items in order
        self.open: dict[str, int] = {}  # "reasoning" / "message" / f"call{n}" -> index in items

    # -- the response object
    def envelope(self, status: str, usage: dict | None = None, incomplete: str | None = None) -> dict:
        req = self.req
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "model": req.model or self.state.served_model_name, "output": self.items, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "metadata": req.metadata or {}, "parallel_tool_calls":
            req.parallel_tool_calls is not False, "temperature": req.temperature, "top_p": req.top_p,
            "tool_choice": req.tool_choice or ("auto" if req.tools else "none"), "tools": req.tools or [],
            "max_output_tokens": req.max_output_tokens, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "text": req.text or {"format": {"type": "text"}}, "store": req.store, "truncation": "disabled",
            "usage": usage,
        }

    def usage(self, r: SubResult) -> dict:
        out = r.completion_tokens or len(r.token_ids)
        prompt = r.prompt_tokens or len(self.chat.prompt_ids)
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": r.cached_tokens},
                "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": self.state.tm.count_tokens(self.output.reasoning)},
                "total_tokens": prompt + out}

    def final(self, r: SubResult) -> dict:
        incomplete = "max_output_tokens" if r.finish_reason == "length" else None
        resp = self.envelope("incomplete" if incomplete else "completed", self.usage(r), incomplete)
        if self.req.store:
            turn = {"role": "assistant", "content": self.output.content}
            calls = [{"id": it["call_id"], "type": "function",
                      "function": {"name": it["name"], "arguments": it["arguments"]}}
                     for it in self.items if it["type"] == "function_call"]
            if calls:  # as the chat route answers: no content beside the calls when it is blank
                turn["tool_calls"] = calls
                turn["content"] = turn["content"] if turn["content"].strip() else None
            self.store[self.rid] = {"response": resp, "messages": self.messages + [turn]}
            while len(self.store) > STORE_LIMIT:
                self.store.popitem(last=False)
        return resp

    # -- items
    def _event(self, kind: str, **fields) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq, **fields})

    def _open(self, key: str, item: dict) -> list[str]:
        self.open[key] = len(self.items)
        self.items.append(item)
        events = [self._event("response.output_item.added", output_index=self.open[key], item=dict(item))]
        if item["type"] == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=self.open[key],
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        elif item["type"] == "reasoning":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=self.open[key],
                                      content_index=0, part={"type": "reasoning_text", "text": ""}))
        return events

    def _close(self, key: str) -> list[str]:
        idx = self.open.pop(key)
        item = self.items[idx]
        item["status"] = "completed"
        events = []
        if item["type"] == "message":
            text = item["content"][0]["text"]
            events += [self._event("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                                   text=text, logprobs=[]),
                       self._event("response.content_part.done", item_id=item["id"], output_index=idx,
                                   content_index=0, part=item["content"][0])]
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            events += [self._event("response.reasoning_text.done", item_id=item["id"], output_index=idx,
                                   content_index=0, text=text),
                       self._event("response.content_part.done", item_id=item["id"], output_index=idx,
                                   content_index=0, part=item["content"][0])]
        else:
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                                      name=item["name"], arguments=item["arguments"]))
        return events + [self._event("response.output_item.done", output_index=idx, item=item)]

    def apply(self, d) -> list[str]:
        """One parser delta into the items; the stream events it means."""
        events: list[str] = []
        if d.reasoning:
            if "reasoning" not in self.open:
                events += self._open("reasoning", {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}",
                                                   "summary": [], "status": "in_progress",
                                                   "content": [{"type": "reasoning_text", "text": ""}]})
            idx = self.open["reasoning"]
            self.items[idx]["content"][0]["text"] += d.reasoning
            events.append(self._event("response.reasoning_text.delta", item_id=self.items[idx]["id"],
                                      output_index=idx, content_index=0, delta=d.reasoning))
        if d.content:
            if "reasoning" in self.open:
                events += self._close("reasoning")
            if "message" not in self.open:
                events += self._open("message", {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}",
                                                 "status": "in_progress", "role": "assistant",
                                                 "content": [{"type": "output_text", "text": "", "annotations": []}]})
            idx = self.open["message"]
            self.items[idx]["content"][0]["text"] += d.content
            events.append(self._event("response.output_text.delta", item_id=self.items[idx]["id"], output_index=idx,
                                      content_index=0, delta=d.content, logprobs=[]))
        for c in d.tool_calls:
            key = f"call{c.index}"
            if "reasoning" in self.open:
                events += self._close("reasoning")
            if key not in self.open:
                events += self._open(key, {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}",
                                           "call_id": c.id or f"call_{uuid.uuid4().hex[:24]}", "name": c.name or "",
                                           "arguments": "", "status": "in_progress"})
            idx = self.open[key]
            if c.name and not self.items[idx]["name"]:
                self.items[idx]["name"] = c.name
            if c.arguments:
                self.items[idx]["arguments"] += c.arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=self.items[idx]["id"],
                                          output_index=idx, delta=c.arguments))
        return events

    def close_all(self) -> list[str]:
        events = []
        for key in list(self.open):
            events += self._close(key)
        return events

    # -- Formatter
    def response(self, results: list[SubResult]) -> dict:
        r = results[0]
        self.apply(self.output.feed(r.text))
        self.apply(self.output.finish())
        self.close_all()
        self.items = [it for it in self.items if not (it["type"] == "message" and not it["content"][0]["text"].strip()
                                                      and len(self.items) > 1)]
        return self.final(r)

    def start(self, first):
        yield self._event("response.created", response=self.envelope("in_progress"))
        yield self._event("response.in_progress", response=self.envelope("in_progress"))

    def on_output(self, idx, out, result):
        yield from self.apply(self.output.feed(out.text_delta))
        if out.finished:
            yield from self.apply(self.output.finish())

    def finish(self, results):
        yield from self.close_all()
        resp = self.final(results[0])
        kind = "response.incomplete" if resp["status"] == "incomplete" else "response.completed"
        yield self._event(kind, response=resp)

    def error(self, e) -> str:
        self.seq += 1
        return sse({"type": "error", "sequence_number": self.seq, "code": str(e.status), "message": e.message,
                    "param": None})
