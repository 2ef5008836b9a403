"""The engine process: owns the model, runs the scheduler loop, talks to the API process over ZMQ.

Messages in (API -> engine, one pickled object per message): GenerateReq, AbortReq, ControlReq.
Messages out (engine -> API, one pickled list per message): TokenOut, ControlOut, ReqError,
EngineStats, and once at start EngineReady or EngineFailed.

The process dies with its parent: a watchdog thread polls the parent pid (plus PR_SET_PDEATHSIG on Linux),
so killing the API process never leaves an engine behind holding memory. It ignores SIGINT and SIGTERM:
the API process stops it once its requests are drained (a signal sent to the whole process group must
not cut them short). A step that runs past --watchdog-timeout makes it exit (the API process follows).

Test hooks (environment variables, read once at start): EMBER_TEST_FAULT_STEPS="1,5" makes those engine
steps (counted from 1, steps that had work) raise before running; EMBER_TEST_HANG_STEPS="2" makes them
never return (for the watchdog).
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from ember.engine.io_struct import AbortReq, ControlOut, ControlReq, GenerateReq

logger = logging.getLogger("ember.engine")

STATS_INTERVAL_S = 0.25


def _steps_from_env(name: str) -> set[int]:
    value = os.environ.get(name, "")
    return {int(x) for x in value.split(",") if x.strip().isdigit()}


class InjectedFault(RuntimeError):
    """Raised by the EMBER_TEST_FAULT_STEPS hook."""


def _raiser(message: str):
    def fault():
        raise InjectedFault(message)
    return fault


class StepWatchdog:
    """Exits the process when one step runs longer than `timeout` seconds (a hung kernel or deadlock
    would otherwise hang every request forever). Polled by a daemon thread."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.started: float | None = None
        threading.Thread(target=self._watch, name="ember-step-watchdog", daemon=True).start()

    def _watch(self) -> None:
        period = max(0.05, min(1.0, self.timeout / 4))
        while True:
            time.sleep(period)
            started = self.started
            if started is not None and time.monotonic() - started > self.timeout:
                logger.error("watchdog: an engine step has run for more than %.1f s (--watchdog-timeout); "
                             "the engine exits", self.timeout)
                logging.shutdown()
                os._exit(3)


@dataclass
class EngineReady:
    """Sent once the model is loaded: what the API process needs to tokenize and validate requests."""
    tokenizer: object  # the HF tokenizer (pickled with the message)
    model_dir: str
    context_length: int
    vocab_size: int
    model_type: str | None = None
    architectures: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    pid: int = 0


@dataclass
class EngineFailed:
    """The engine could not start (e.g. the model failed to load)."""
    error: str
    traceback: str = ""


@dataclass
class ReqError:
    """A request was rejected or failed inside the engine. status: the HTTP status the API should answer."""
    rid: str
    message: str
    status: int = 400


@dataclass
class EngineStats:
    """Engine counters (EngineCore.stats()), sent now and then with outputs and when the engine goes idle."""
    stats: dict


def _die_with_parent(parent_pid: int) -> None:
    try:  # Linux: the kernel sends SIGKILL when the parent thread dies
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="ember-parent-watchdog", daemon=True).start()


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr, force=True)


def _vocab_size(core) -> int:
    cfg = getattr(core, "hf_config", None)
    size = getattr(cfg, "vocab_size", None)
    tok = getattr(core, "tokenizer", None)
    if tok is not None:
        try:
            size = max(size or 0, len(tok))
        except TypeError:
            pass
    return int(size or 0)


def run_engine_process(server_args, in_addr: str, out_addr: str, parent_pid: int) -> None:
    """Entry point of the engine process (started with the multiprocessing "spawn" context)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the API process, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so does SIGTERM (after draining its requests)
    _die_with_parent(parent_pid)
    _configure_logging(server_args.log_level)

    import zmq
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 0)
    inp.connect(in_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(out_addr)

    def send(objs: list) -> None:
        if objs:
            out.send(pickle.dumps(objs, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        from ember.engine.engine_core import EngineCore
        core = EngineCore(server_args)
        cfg = getattr(core, "hf_config", None)
        ready = EngineReady(
            tokenizer=core.tokenizer,
            model_dir=str(core.model_dir),
            context_length=int(core.context_length),
            vocab_size=_vocab_size(core),
            model_type=getattr(cfg, "model_type", None),
            architectures=list(getattr(cfg, "architectures", None) or []),
            stats=dict(core.stats()),
            pid=os.getpid(),
        )
    except BaseException as e:  # noqa: BLE001 - report anything, then exit
        logger.error("engine failed to start: %s", e, exc_info=True)
        send([EngineFailed(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())])
        out.close(linger=5000)
        ctx.term()
        os._exit(1)

    logger.info("engine ready: %s (context length %d)", ready.model_dir, ready.context_length)
    send([ready])
    try:
        _loop(core, inp, send, StepWatchdog(float(getattr(server_args, "watchdog_timeout", 300.0) or 300.0)))
    finally:
        out.close(linger=1000)
        inp.close(linger=0)
        ctx.term()


def _loop(core, inp, send, watchdog: StepWatchdog) -> None:
    import zmq
    fault_steps = _steps_from_env("EMBER_TEST_FAULT_STEPS")
    hang_steps = _steps_from_env("EMBER_TEST_HANG_STEPS")
    n_steps = 0
    live: set[str] = set()  # rids the engine is working on (to fail them if a step crashes)
    last_stats = 0.0
    was_busy = False
    idle_steps = 0  # steps in a row that produced nothing (e.g. waiting for a grammar to compile)
    while True:
        busy = core.has_work()
        msgs = []
        timeout = (0 if idle_steps == 0 else min(10, idle_steps)) if busy else 1000
        if inp.poll(timeout):
            while True:
                try:
                    msgs.append(pickle.loads(inp.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        outs: list = []
        for msg in msgs:
            for m in (msg if isinstance(msg, list) else [msg]):
                if isinstance(m, GenerateReq):
                    try:
                        core.add_request(m)
                        live.add(m.rid)
                    except ValueError as e:
                        outs.append(ReqError(m.rid, str(e), 400))
                    except Exception as e:  # noqa: BLE001
                        logger.error("add_request failed for %s", m.rid, exc_info=True)
                        outs.append(ReqError(m.rid, f"{type(e).__name__}: {e}", 500))
                elif isinstance(m, AbortReq):
                    try:
                        core.abort(m.rid)
                    except Exception:  # noqa: BLE001
                        logger.error("abort failed for %s", m.rid, exc_info=True)
                elif isinstance(m, ControlReq):
                    if m.kind == "shutdown":
                        send(outs + [ControlOut(m.cid, True)])
                        return
                    outs.append(_control(core, m))
                else:
                    logger.warning("engine got an unknown message: %r", type(m))
        if core.has_work():
            was_busy = True
            t_step = time.perf_counter()
            n_steps += 1
            watchdog.started = time.monotonic()
            try:
                if n_steps in fault_steps:  # raised inside the step, once its batch is scheduled
                    core.fault_hook = _raiser(f"fault injected into engine step {n_steps} (EMBER_TEST_FAULT_STEPS)")
                while n_steps in hang_steps:  # EMBER_TEST_HANG_STEPS: a step that never returns
                    time.sleep(1)
                step_outs = core.step()
            except Exception as e:  # noqa: BLE001 - fail the step's requests, keep serving the others
                logger.error("engine step failed", exc_info=True)
                failed = set(core.step_rids) & live if core.step_rids is not None else set(live)
                for rid in failed:
                    outs.append(ReqError(rid, f"internal engine error: {type(e).__name__}: {e}", 500))
                    try:
                        core.abort(rid)
                    except Exception:  # noqa: BLE001
                        pass
                live.difference_update(failed)
                step_outs = []
            finally:
                watchdog.started = None
                core.fault_hook = None
            for o in step_outs:
                if o.finished:
                    live.discard(o.rid)
            outs.extend(step_outs)
            # a step that did nothing (no batch ran): back off a little instead of spinning
            idle = not step_outs and time.perf_counter() - t_step < 0.002
            idle_steps = idle_steps + 1 if idle else 0
        else:
            idle_steps = 0
        now = time.monotonic()
        idle_now = was_busy and not core.has_work()
        if outs and (now - last_stats >= STATS_INTERVAL_S or idle_now):
            outs.append(EngineStats(_stats(core)))
            last_stats = now
        elif idle_now:
            outs.append(EngineStats(_stats(core)))
        if idle_now:
            was_busy = False
        send(outs)


def _stats(core) -> dict:
    try:
        return dict(core.stats())
    except Exception:  # noqa: BLE001
        return {}


def _control(core, m: ControlReq) -> ControlOut:
    try:
        if m.kind == "flush_cache":
            ok = bool(core.flush_cache())
            return ControlOut(m.cid, ok, {"stats": _stats(core)})
        if m.kind in ("get_stats", "health"):
            return ControlOut(m.cid, True, _stats(core))
        return ControlOut(m.cid, False, {"error": f"unknown control {m.kind!r}"})
    except Exception as e:  # noqa: BLE001
        logger.error("control %s failed", m.kind, exc_info=True)
        return ControlOut(m.cid, False, {"error": f"{type(e).__name__}: {e}"})
