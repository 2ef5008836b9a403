"""The one runner of engine requests for every API: it sends the fan-out of one HTTP request, then either
collects it (non-streaming) or streams it as server-sent events, handles a client that goes away (its
engine requests are aborted; 499) and engine errors (a status code before the first byte, an error event
after). What differs per API is only the shape, given by a Formatter."""
from __future__ import annotations

from typing import Any, Iterable

from fastapi import Request
from fastapi.responses import JSONResponse

from ember.api.serving import (
    SSE_DONE, ClientDisconnected, SSEResponse, SubResult, run_to_completion, sse_error, start_stream, stream_items,
)
from ember.engine.engine_client import EngineRequestError
from ember.engine.io_struct import GenerateReq, TokenOut


class Formatter:
    """Per-API shaping of results. `response` for a non-streamed answer; for a stream, `start` (given the
    first output, or None), `on_output` per engine output (`result`: that request's output so far),
    `finish` after the last, `error` for an engine error mid-stream; `done` ends the stream if not None."""
    done: str | None = SSE_DONE

    def response(self, results: list[SubResult]) -> Any:
        raise NotImplementedError

    def start(self, first: TokenOut | None) -> Iterable[str]:
        return ()

    def on_output(self, idx: int, out: TokenOut, result: SubResult) -> Iterable[str]:
        raise NotImplementedError

    def finish(self, results: list[SubResult]) -> Iterable[str]:
        return ()

    def error(self, e: EngineRequestError) -> str:
        return sse_error(e.message, e.status)


def client_gone() -> JSONResponse:
    return JSONResponse({}, status_code=499)


async def run(state, request: Request, base_id: str, reqs: list[GenerateReq], stream: bool, fmt: Formatter):
    """Run the engine requests of one HTTP request and answer it in the formatter's shape."""
    if not stream:
        results = await run_to_completion(state, base_id, reqs, request)
        if results is None:
            return client_gone()
        return fmt.response(results)

    try:
        on_close, gen, first = await start_stream(state, base_id, reqs, request)
    except ClientDisconnected:
        return client_gone()

    async def events():
        results = [SubResult() for _ in reqs]
        try:
            for event in fmt.start(first[1] if first is not None else None):
                yield event
            async for idx, out in stream_items(first, gen):
                results[idx].add(out)
                for event in fmt.on_output(idx, out, results[idx]):
                    yield event
            for event in fmt.finish(results):
                yield event
        except EngineRequestError as e:
            yield fmt.error(e)
        finally:
            on_close()
        if fmt.done is not None:
            yield fmt.done

    return SSEResponse(events(), on_close=on_close)
