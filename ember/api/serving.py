"""Shared machinery under the runner (runner.py) and the builder (request_builder.py): body parsing, the
limits every route checks (context length, queue), merged outputs of a fan-out, client-disconnect
handling and SSE."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from ember.api.errors import APIError, error_body, validation_message
from ember.engine.engine_client import EngineClient, EngineRequestError
from ember.engine.io_struct import GenerateReq, TokenOut
from ember.engine.sampling_params import SamplingParams

MAX_N = 64


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> int:
    return int(time.time())


async def parse_body(request: Request, model: type[BaseModel]) -> tuple[BaseModel, dict]:
    """The validated body and the raw JSON. Malformed JSON and schema violations raise APIError(400)."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone while sending the body: nobody reads the answer, no traceback either
        raise APIError("The client disconnected while sending the request.", 499) from None
    try:
        data = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"Malformed JSON in the request body: {e}", 400, "body") from e
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object", 400, "body")
    try:
        return model.model_validate(data), data
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise APIError(message, 400, param) from e


# ---------------------------------------------------------------------------- limits
def resolve_max_new_tokens(requested: int | None, prompt_len: int, context_length: int,
                           param: str = "max_tokens", kv_capacity: int | None = None) -> int:
    """max_new_tokens for the engine; 400 when the prompt and the completion do not fit the context.
    Without a requested value: whatever room is left (in the context and in the KV cache)."""
    if requested is not None and requested < 0:
        raise APIError(f"{param} must be >= 0, got {requested}", 400, param)
    if prompt_len >= context_length and requested != 0:
        raise APIError(
            f"This model's maximum context length is {context_length} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for the completion. Please reduce the length of "
            f"the prompt.", 400, "messages" if param != "max_new_tokens" else "text")
    if requested is None:
        room = context_length - prompt_len
        if kv_capacity:
            room = min(room, kv_capacity - prompt_len)
        if room <= 0:
            raise APIError(f"The prompt has {prompt_len} tokens, more than the KV cache holds ({kv_capacity} "
                           f"tokens).", 400, "messages" if param != "max_new_tokens" else "text")
        return room
    if prompt_len + requested > context_length:
        raise APIError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion "
            f"({param})). Please reduce the length of the prompt or {param}.", 400, param)
    return requested


def check_overload(engine: EngineClient, max_queued: int | None, incoming: int = 1) -> None:
    """503 when admitting `incoming` more requests would grow the waiting queue past --max-queued-requests."""
    if max_queued is None:
        return
    if engine.queue_length_estimate(incoming) > max_queued:
        raise APIError(f"The server is overloaded: the waiting queue is full (--max-queued-requests "
                       f"{max_queued}). Retry later.", 503, None, "ServiceUnavailableError")


def validate_sampling(sp: SamplingParams, vocab_size: int, names: dict[str, str] | None = None) -> None:
    try:
        sp.validate(vocab_size)
    except ValueError as e:
        msg = str(e)
        field_name = msg.split(" ", 1)[0]
        if names:
            for internal, public in names.items():
                if msg.startswith(internal + " "):
                    msg = public + msg[len(internal):]
                    field_name = public
                    break
        raise APIError(msg, 400, field_name) from e


def parse_logit_bias(bias: dict | None, param: str = "logit_bias") -> dict[int, float]:
    out = {}
    for k, v in (bias or {}).items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError) as e:
            raise APIError(f"{param} keys must be token ids (integers), got {k!r}", 400, param) from e
    return out


def json_schema_text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------- running requests
@dataclass
class SubResult:
    """Everything one engine request produced."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    spec_verify_ct: int = 0

    def add(self, out: TokenOut) -> None:
        self.spec_verify_ct = getattr(out, "spec_verify_ct", 0) or self.spec_verify_ct
        self.text += out.text_delta
        self.token_ids.extend(out.new_token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or len(self.token_ids)
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            self.matched_stop = out.matched_stop


class RequestGroup:
    """The engine requests of one HTTP request, registered so /abort_request can find them by id."""

    def __init__(self, registry: dict[str, list[str]], base_id: str, reqs: list[GenerateReq]):
        self.registry = registry
        self.base_id = base_id
        self.reqs = reqs

    def __enter__(self):
        for r in self.reqs:
            if r.rid in self.registry:
                raise APIError(f"request id {r.rid!r} is already in use", 400, "rid")
        if self.base_id in self.registry:
            raise APIError(f"request id {self.base_id!r} is already in use", 400, "rid")
        self.registry[self.base_id] = [r.rid for r in self.reqs]
        return self

    def __exit__(self, *exc):
        self.registry.pop(self.base_id, None)
        return False


class MergedOutputs:
    """(index, TokenOut) from several engine requests as they come. The requests are sent at once
    (so they count against the queue limit right away); aclose() aborts whatever is unfinished."""

    def __init__(self, engine: EngineClient, reqs: list[GenerateReq]):
        self.streams = []
        try:
            for r in reqs:
                self.streams.append(engine.generate(r))
        except BaseException:
            for st in self.streams:
                st.close()
            raise
        metrics = getattr(engine, "metrics", None)  # ember.api.metrics: every API's outputs pass here
        self.tracker = metrics.track(len(reqs)) if metrics is not None else None
        self._q: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._remaining = len(self.streams)
        if len(self.streams) > 1:
            self._q = asyncio.Queue()
            self._tasks = [asyncio.create_task(self._pump(i, st)) for i, st in enumerate(self.streams)]

    _DONE = object()

    async def _pump(self, i: int, st) -> None:
        try:
            async for out in st:
                self._q.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            self._q.put_nowait((i, e))
        finally:
            self._q.put_nowait((i, self._DONE))

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, TokenOut]:
        try:
            if self._q is None:
                i, item = 0, await self.streams[0].__anext__()
            else:
                while True:
                    if not self._remaining:
                        raise StopAsyncIteration
                    i, item = await self._q.get()
                    if item is self._DONE:
                        self._remaining -= 1
                        continue
                    if isinstance(item, Exception):
                        raise item
                    break
            if self.tracker is not None:
                self.tracker.on_output(i, item)
            return i, item
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        for t in self._tasks:
            if not t.done():
                t.cancel()
        for st in self.streams:
            st.close()

    async def aclose(self) -> None:
        self.close()


def merged_outputs(engine: EngineClient, reqs: list[GenerateReq]) -> MergedOutputs:
    return MergedOutputs(engine, reqs)


class ClientDisconnected(Exception):
    pass


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(engine: EngineClient, reqs: list[GenerateReq], request: Request | None) -> list[SubResult]:
    """Run requests to completion. Raises ClientDisconnected (after aborting them) if the client goes away."""
    results = [SubResult() for _ in reqs]

    gen = merged_outputs(engine, reqs)

    async def run():
        async for i, out in gen:
            results[i].add(out)
        return results

    try:
        if request is None:
            return await run()
        task = asyncio.create_task(run())
        watcher = asyncio.create_task(wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise ClientDisconnected()
    finally:
        gen.close()


async def engine_stats(state) -> dict:
    """The engine's stats (KV pools, queues, speculation), or the last ones it reported if it does not answer."""
    if not state.ready:
        return {}
    try:
        out = await state.engine.control("get_stats", timeout=10)
        return dict(out.data) if out.ok else {}
    except Exception:  # noqa: BLE001
        return dict(state.engine.stats)


def engine_error(e: EngineRequestError) -> APIError:
    return APIError(e.message, e.status, None)


async def run_to_completion(state, base_id: str, reqs: list[GenerateReq], request: Request
                            ) -> list[SubResult] | None:
    """Run a non-streaming request group to the end. None when the client went away (its requests are
    aborted in the engine); an engine-side rejection becomes its APIError."""
    with RequestGroup(state.groups, base_id, reqs):
        try:
            return await collect(state.engine, reqs, request)
        except EngineRequestError as e:
            raise engine_error(e) from e
        except ClientDisconnected:
            return None


# ---------------------------------------------------------------------------- SSE
def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(message: str, status: int = 500) -> str:
    return sse(error_body(message, status))


class SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client going away and then cancels the stream
    (so the engine request is aborted), whatever ASGI spec version the server speaks."""
    media_type = "text/event-stream"

    def __init__(self, content, on_close=None, **kw):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        headers.update(kw.pop("headers", None) or {})
        super().__init__(content, headers=headers, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    finally:
                        tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            # also when the stream never started (client gone at once): abort and unregister
            if self.on_close is not None:
                self.on_close()


async def start_stream(state, base_id: str, reqs: list[GenerateReq], request: Request):
    """Register and send the requests of a streaming response and wait for the first output, so that
    errors the engine finds still get a status code. Returns (group, outputs, first output).
    Raises APIError or ClientDisconnected with everything cleaned up."""
    group = RequestGroup(state.groups, base_id, reqs)
    group.__enter__()
    try:
        gen = merged_outputs(state.engine, reqs)
        try:
            first = await prefetch_first(gen, request)
        except BaseException:
            gen.close()
            raise
    except EngineRequestError as e:
        group.__exit__(None, None, None)
        raise engine_error(e) from e
    except BaseException:
        group.__exit__(None, None, None)
        raise

    def on_close():
        gen.close()
        group.__exit__(None, None, None)

    return on_close, gen, first


async def stream_items(first, gen):
    """The (index, TokenOut) items of a started stream: the prefetched first one, then the rest."""
    item = first
    while item is not None:
        yield item
        try:
            item = await gen.__anext__()
        except StopAsyncIteration:
            item = None


async def prefetch_first(agen: AsyncIterator, request: Request):
    """Wait for the first item of a stream while watching for a disconnect, so errors found by the engine
    (bad input) can still be answered with a status code. Returns (first item or None when empty)."""
    task = asyncio.ensure_future(agen.__anext__())
    watcher = asyncio.create_task(wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        await agen.aclose()
        raise
    if task.done():
        watcher.cancel()
        try:
            return task.result()
        except StopAsyncIteration:
            return None
        except BaseException:
            await agen.aclose()
            raise
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, StopAsyncIteration, Exception):  # noqa: BLE001
        pass
    await agen.aclose()
    raise ClientDisconnected()
