"""Graceful shutdown of the API process (SIGTERM / SIGINT).

On the first signal the server keeps listening but answers every new request with 503 and Retry-After
(a load balancer sees it draining; a client that retries finds another replica), lets the requests in
flight finish for up to --graceful-shutdown-timeout seconds, then aborts the engine requests still
running (they end with finish_reason "abort"), waits for their answers to be sent, and only then lets
uvicorn stop. A second SIGINT (Ctrl-C twice) stops at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal

import uvicorn

from ember.api.errors import anthropic_error_body, error_body

logger = logging.getLogger("ember.server")

RETRY_AFTER_S = 5
ABORT_GRACE_S = 5.0  # after aborting: time for the aborted answers to reach their clients


class Lifecycle:
    """Counts HTTP requests in flight and knows whether the server is draining."""

    def __init__(self):
        self.draining = False
        self.inflight = 0
        self._idle: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.inflight == 0:
                self._idle.set()
        return self._idle

    def enter(self) -> None:
        self.inflight += 1
        self._event().clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._event().set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._event().wait(), max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            return self.inflight == 0


class DrainMiddleware:
    """Pure ASGI (streams pass through unbuffered): counts requests in flight; 503 while draining."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.lifecycle.draining:
            message = "The server is shutting down and takes no new requests. Retry on another server."
            if scope["path"].startswith("/v1/messages"):
                body = anthropic_error_body(message, 503)
            else:
                body = error_body(message, 503, None, "ServiceUnavailableError")
            data = json.dumps(body).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode()),
                                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": data})
            return
        self.lifecycle.enter()
        try:
            return await self.app(scope, receive, send)
        finally:
            self.lifecycle.leave()


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drains first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, engine, timeout: float):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.engine = engine
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it at exit and die by the signal (not 0).
        if self.lifecycle.draining or self.should_exit or self.loop is None:
            if sig == signal.SIGINT and self.lifecycle.draining:
                logger.warning("second interrupt: stopping now")
                self.force_exit = True
            self.should_exit = True
            return
        self.lifecycle.draining = True
        logger.info("got %s: draining (new requests get 503; %d in flight, up to %.0f s)",
                    signal.Signals(sig).name, self.lifecycle.inflight, self.timeout)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        try:
            if not await self.lifecycle.wait_idle(self.timeout):
                rids = self.engine.active_rids()
                logger.warning("graceful shutdown timeout (%.0f s): aborting %d request(s) still running",
                               self.timeout, len(rids))
                for rid in rids:
                    self.engine.abort(rid)
                await self.lifecycle.wait_idle(ABORT_GRACE_S)
            logger.info("drained; stopping")
        finally:
            self.should_exit = True
