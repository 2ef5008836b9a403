"""Engine faults on a real server (SmolLM2), through the engine's test hooks (EMBER_TEST_FAULT_STEPS,
EMBER_TEST_HANG_STEPS, see ember/engine/engine_process.py): a step that raises fails the requests it
held with a 500 naming the error and the server keeps serving; a dead or hung engine takes the API
process down with a non-zero exit instead of leaving requests hanging."""
from __future__ import annotations

import json
import signal
import time

import psutil
import requests

from ember.utils import terminate_process
from tests.e2e.conftest import start_server

MSG = [{"role": "user", "content": "Count from one to fifty."}]


def _engine_pid(server) -> int:
    children = psutil.Process(server.proc.pid).children()
    engines = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    assert len(engines) == 1, [c.cmdline() for c in children]
    return engines[0].pid


def _chat(server, **kw):
    return requests.post(f"{server.base_url}/v1/chat/completions", timeout=120,
                         json={"model": "m", "messages": MSG, "max_tokens": 4, **kw})


def test_a_failed_step_fails_its_requests_and_the_next_succeeds(tmp_path):
    # step 1 is the first request's prefill; step 12 falls inside the 40-token stream started later
    server = start_server(["--model-path", "smollm2-135m"], tmp_path, "fault",
                          env={"EMBER_TEST_FAULT_STEPS": "1,12"})
    try:
        r = _chat(server)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert "InjectedFault" in error["message"] and "fault injected into engine step 1" in error["message"]

        r = _chat(server)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")

        events = []
        with requests.post(f"{server.base_url}/v1/chat/completions", stream=True, timeout=120,
                           json={"model": "m", "messages": MSG, "max_tokens": 40, "ignore_eos": True,
                                 "stream": True}) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert any(e.get("choices") for e in events[:-1]), "the stream failed before any token"
        assert "error" in events[-1], events[-1]
        assert events[-1]["error"]["code"] == 500 and "fault injected into engine step 12" in events[-1]["error"]["message"]

        r = _chat(server)
        assert r.status_code == 200, r.text
        server.assert_alive()
        assert server.stats()["free_pages"] + server.stats().get("cached_pages", 0) == server.stats()["total_pages"]
    finally:
        terminate_process(server.proc)


def test_a_failed_step_spares_the_requests_outside_its_batch(tmp_path):
    """One request runs at a time (--max-running-requests 1): the second waits in the queue while the first's
    decode step fails. Only the first gets the error; the queued one is then served normally."""
    import threading
    server = start_server(["--model-path", "smollm2-135m", "--max-running-requests", "1"], tmp_path, "fault-batch",
                          env={"EMBER_TEST_FAULT_STEPS": "30"})
    try:
        first_events, second = [], {}
        with requests.post(f"{server.base_url}/v1/chat/completions", stream=True, timeout=120,
                           json={"model": "m", "messages": MSG, "max_tokens": 60, "ignore_eos": True,
                                 "stream": True}) as s:
            lines = s.iter_lines()
            for line in lines:  # the first request is decoding: now queue the second behind it
                if line.startswith(b"data: ") and b'"content"' in line:
                    break
            waiting = threading.Thread(target=lambda: second.update(r=_chat(server)))
            waiting.start()
            for line in lines:
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    first_events.append(json.loads(line[6:]))
        waiting.join(timeout=120)
        assert "error" in first_events[-1] and "engine step 30" in first_events[-1]["error"]["message"]
        assert second["r"].status_code == 200, second["r"].text
        assert second["r"].json()["choices"][0]["finish_reason"] in ("stop", "length")
        stats = server.stats()
        assert stats["free_pages"] + stats.get("cached_pages", 0) == stats["total_pages"]
    finally:
        terminate_process(server.proc)


def test_killing_the_engine_stops_the_server_non_zero(tmp_path):
    server = start_server(["--model-path", "smollm2-135m"], tmp_path, "engine-kill")
    try:
        engine = _engine_pid(server)
        psutil.Process(engine).send_signal(signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 10
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(requests.get(f"{server.base_url}/health", timeout=2).status_code)
            except requests.RequestException:
                pass
            time.sleep(0.05)
        code = server.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        assert code != 0, server.log()[-2000:]
        assert "the engine process exited" in server.log()
        # /health may still answer 200 in the instant before the API process notices, never after a 503
        assert 200 not in statuses[statuses.index(503):] if 503 in statuses else True
    finally:
        terminate_process(server.proc)


def test_watchdog_ends_a_hung_step(tmp_path):
    """A step that never returns: --watchdog-timeout 3 ends the engine, the request in flight gets an
    error instead of hanging, and the server exits non-zero."""
    server = start_server(["--model-path", "smollm2-135m", "--watchdog-timeout", "3"], tmp_path, "watchdog",
                          env={"EMBER_TEST_HANG_STEPS": "1"})
    try:
        r = _chat(server)
        assert r.status_code == 503, r.text
        assert "engine" in r.json()["error"]["message"]
        assert server.proc.wait(timeout=30) != 0
        assert "watchdog" in server.log()
    finally:
        terminate_process(server.proc)
