"""The API process's handle on the engine process: spawn it, send requests, route outputs per request.

    client = EngineClient(server_args)
    client.start_process()              # spawn the engine (it starts loading the model at once)
    await client.start()                # inside the event loop: sockets + the output reader task
    await client.wait_ready()
    async for out in client.generate(GenerateReq(...)): ...
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import tempfile
import uuid
from typing import Callable

from ember.engine.engine_process import EngineFailed, EngineReady, EngineStats, ReqError, run_engine_process
from ember.engine.io_struct import AbortReq, ControlOut, ControlReq, GenerateReq, TokenOut

logger = logging.getLogger("ember.engine_client")


class EngineRequestError(Exception):
    """The engine rejected or failed a request; status is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message = message
        self.status = status


class EngineDeadError(EngineRequestError):
    def __init__(self, message: str = "the engine process is not running"):
        super().__init__(message, 503)


# OpenMP threads of the engine spin a little (GOMP_SPINCOUNT) before sleeping, even under
# OMP_WAIT_POLICY=PASSIVE (which alone makes them sleep at once): a decode step runs hundreds of small
# parallel regions back to back, and waking sleeping threads costs ~100 us per small GEMM, a fifth of a
# batch-1 step. Measured on one 896x1152 GEMM (BENCHMARKS.md): quiet machine 145 us (spin 0) -> 52 us
# (3,000) = 51 us (100,000); next to one busy process 80 us (0), 236 us (3,000), 3,212 us (100,000).
# So the spin stays short. A GOMP_SPINCOUNT the user sets wins.
ENGINE_OMP_SPINCOUNT = "3000"


@contextlib.contextmanager
def _engine_env():
    """The spawned engine inherits os.environ at start: set its OpenMP spin there, then restore ours."""
    if "GOMP_SPINCOUNT" in os.environ:
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = ENGINE_OMP_SPINCOUNT
    try:
        yield
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)


class EngineClient:
    def __init__(self, server_args):
        self.server_args = server_args
        self.info: EngineReady | None = None
        self.failed: EngineFailed | None = None
        self.stats: dict = {}
        self.proc: mp.process.BaseProcess | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._controls: dict[str, asyncio.Future] = {}
        self._ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._dir = tempfile.mkdtemp(prefix="ember-ipc-")
        self._in_addr = f"ipc://{os.path.join(self._dir, 'in')}"
        self._out_addr = f"ipc://{os.path.join(self._dir, 'out')}"
        self._ctx = None
        self._send_sock = None
        self._recv_sock = None
        self._closed = False
        self.aborts_sent = 0  # engine requests aborted (clients gone, /abort_request, shutdown): /metrics

    # ---------------------------------------------------------------- lifecycle
    def start_process(self) -> None:
        """Spawn the engine process. Call once, before or after start()."""
        ctx = mp.get_context("spawn")
        self.proc = ctx.Process(target=run_engine_process,
                                args=(self.server_args, self._in_addr, self._out_addr, os.getpid()),
                                name="ember-engine", daemon=True)
        with _engine_env():
            self.proc.start()
        logger.info("engine process started (pid %d)", self.proc.pid)

    async def start(self) -> None:
        """Bind the sockets and start the reader tasks (inside the running event loop)."""
        import zmq
        import zmq.asyncio
        self._ready = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        self._recv_sock = self._ctx.socket(zmq.PULL)
        self._recv_sock.setsockopt(zmq.RCVHWM, 0)
        self._recv_sock.bind(self._out_addr)
        self._sync_ctx = zmq.Context()
        self._send_sock = self._sync_ctx.socket(zmq.PUSH)
        self._send_sock.setsockopt(zmq.SNDHWM, 0)
        self._send_sock.setsockopt(zmq.LINGER, 0)
        self._send_sock.bind(self._in_addr)
        self._tasks.append(asyncio.create_task(self._reader(), name="ember-engine-reader"))
        self._tasks.append(asyncio.create_task(self._monitor(), name="ember-engine-monitor"))

    @property
    def is_ready(self) -> bool:
        return self.info is not None and self.failed is None and self.alive

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    async def wait_ready(self, timeout: float | None = None) -> EngineReady:
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self.failed is not None:
            raise RuntimeError(f"the engine failed to start: {self.failed.error}")
        return self.info

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine process (synchronous; safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self.proc is not None and self.proc.is_alive():
            try:
                self._send(ControlReq("shutdown", "shutdown"))
            except Exception:  # noqa: BLE001
                pass
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(2)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(2)
        for s in (self._send_sock, self._recv_sock):
            if s is not None:
                try:
                    s.close(linger=0)
                except Exception:  # noqa: BLE001
                    pass
        for c in (self._ctx, getattr(self, "_sync_ctx", None)):
            if c is not None:
                try:
                    c.term()
                except Exception:  # noqa: BLE001
                    pass
        try:
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
        except OSError:
            pass

    # ---------------------------------------------------------------- requests
    @property
    def num_outstanding(self) -> int:
        return len(self._queues)

    def queue_length_estimate(self, incoming: int = 0) -> int:
        """Requests that would be waiting for admission if `incoming` more arrived (an API-side estimate:
        what exceeds --max-running-requests, or what the engine last reported waiting)."""
        waiting = int(self.stats.get("waiting", 0) or 0)
        limit = int(self.server_args.max_running_requests or 0)
        return max(0, self.num_outstanding + incoming - limit, min(waiting, self.num_outstanding))

    def generate(self, req: GenerateReq) -> "RequestStream":
        """Send one request now; returns an async iterator of its TokenOuts until it finishes.
        Closing it early (aclose(), cancellation, or dropping it) aborts the request in the engine."""
        if not self.is_ready:
            raise EngineDeadError("the engine is not ready")
        if req.rid in self._queues:
            raise EngineRequestError(f"request id {req.rid!r} is already in use", 400)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req.rid] = q
        try:
            self._send(req)
        except Exception:
            self._queues.pop(req.rid, None)
            raise
        return RequestStream(self, req.rid, q)

    def _release(self, rid: str, q, abort: bool) -> None:
        if self._queues.get(rid) is q:
            del self._queues[rid]
        if abort:
            self.abort(rid)

    def abort(self, rid: str) -> None:
        if self.alive and not self._closed:
            self.aborts_sent += 1
            try:
                self._send(AbortReq(rid))
            except Exception:  # noqa: BLE001
                logger.warning("could not send abort for %s", rid, exc_info=True)

    def active_rids(self) -> list[str]:
        return list(self._queues)

    async def control(self, kind: str, timeout: float = 30.0) -> ControlOut:
        if not self.is_ready:
            raise EngineDeadError("the engine is not ready")
        cid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._controls[cid] = fut
        try:
            self._send(ControlReq(kind, cid))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._controls.pop(cid, None)

    # ---------------------------------------------------------------- internals
    def _send(self, obj) -> None:
        self._send_sock.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    async def _reader(self) -> None:
        while True:
            try:
                data = await self._recv_sock.recv()
                objs = pickle.loads(data)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                logger.error("bad message from the engine", exc_info=True)
                continue
            for obj in objs:
                try:
                    self._dispatch(obj)
                except Exception:  # noqa: BLE001
                    logger.error("failed to dispatch %r", type(obj), exc_info=True)

    def _dispatch(self, obj) -> None:
        if isinstance(obj, TokenOut):
            q = self._queues.get(obj.rid)
            if q is not None:
                q.put_nowait(obj)
        elif isinstance(obj, ReqError):
            q = self._queues.get(obj.rid)
            if q is not None:
                q.put_nowait(obj)
        elif isinstance(obj, EngineStats):
            self.stats = obj.stats
        elif isinstance(obj, ControlOut):
            fut = self._controls.get(obj.cid)
            if fut is not None and not fut.done():
                fut.set_result(obj)
        elif isinstance(obj, EngineReady):
            self.info = obj
            self.stats = obj.stats
            self._ready.set()
        elif isinstance(obj, EngineFailed):
            self.failed = obj
            self._ready.set()
            self._fatal(f"the engine failed to start: {obj.error}")
        else:
            logger.warning("unknown message from the engine: %r", type(obj))

    async def _monitor(self) -> None:
        """Notice an engine process that died: fail its requests and stop the server."""
        while True:
            await asyncio.sleep(0.5)
            if self.proc is None or self.proc.is_alive() or self._closed:
                continue
            await asyncio.sleep(0.5)  # let the reader take a last EngineFailed message
            if self.failed is None:
                self.failed = EngineFailed(error=f"the engine process exited with code {self.proc.exitcode}")
                self._ready.set()
                self._fatal(self.failed.error)
            for rid, q in list(self._queues.items()):
                q.put_nowait(ReqError(rid, self.failed.error, 503))
            for fut in self._controls.values():
                if not fut.done():
                    fut.set_exception(EngineDeadError(self.failed.error))
            return

    def _fatal(self, message: str) -> None:
        logger.error(message)  # the engine process logged the traceback
        if self.on_fatal is not None:
            self.on_fatal(message)


class RequestStream:
    """The outputs of one engine request (see EngineClient.generate)."""

    def __init__(self, client: EngineClient, rid: str, q: asyncio.Queue):
        self.client = client
        self.rid = rid
        self._q = q
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenOut:
        if self.done:
            raise StopAsyncIteration
        try:
            out = await self._q.get()
        except BaseException:  # cancelled: the consumer went away
            self.close()
            raise
        if isinstance(out, ReqError):
            self._finish()
            raise EngineRequestError(out.message, out.status)
        if out.finished:
            self._finish()
            if out.error and not out.new_token_ids and not out.text_delta:
                raise EngineRequestError(out.error, 400)  # the engine refused the request (e.g. a bad grammar)
        return out

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.client._release(self.rid, self._q, abort=False)

    def close(self) -> None:
        """Stop following the request; aborts it in the engine if it has not finished."""
        if not self.done:
            self.done = True
            self.client._release(self.rid, self._q, abort=True)

    async def aclose(self) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
