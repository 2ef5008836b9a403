"""Graceful shutdown on a real server (SmolLM2): SIGTERM (or `terminate_process`) while 8 streams run lets
them finish, answers new requests with 503 + Retry-After, exits 0 and leaves no process behind; requests
still running when --graceful-shutdown-timeout ends are aborted with finish_reason "abort"."""
from __future__ import annotations

import signal
import threading

import psutil
import pytest
import requests

from ember.utils import terminate_process
from tests.e2e.conftest import start_server


class Stream(threading.Thread):
    """One streaming /v1/completions request through the official SDK, recorded chunk by chunk."""

    def __init__(self, server, i: int, max_tokens: int):
        super().__init__(daemon=True)
        self.client = server.openai(timeout=300)
        self.i, self.max_tokens = i, max_tokens
        self.started = threading.Event()
        self.finish_reason = None
        self.usage = None
        self.text = ""
        self.error: BaseException | None = None

    def run(self):
        try:
            stream = self.client.completions.create(
                model="smollm2", prompt=f"Story number {self.i}:", max_tokens=self.max_tokens, stream=True,
                extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
            for chunk in stream:
                self.started.set()
                if chunk.choices:
                    self.text += chunk.choices[0].text
                    self.finish_reason = chunk.choices[0].finish_reason or self.finish_reason
                if chunk.usage:
                    self.usage = chunk.usage
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.started.set()


def _tree(pid: int) -> list[int]:
    p = psutil.Process(pid)
    return [pid] + [c.pid for c in p.children(recursive=True)]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _left(pids: list[int]) -> list:
    """The processes of the tree still running once the server exited. A helper that exits when its
    parent's pipe closes (multiprocessing's resource tracker) may take a moment: wait up to 10 s."""
    procs = []
    for p in pids:
        try:
            procs.append(psutil.Process(p))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    return [(p.pid, p.cmdline()) for p in alive if not _gone(p.pid)]


def _start(tmp_path, name: str, timeout_s: float):
    return start_server(["--model-path", "smollm2-135m", "--graceful-shutdown-timeout", str(timeout_s)],
                        tmp_path, name)


def _wait_for_503(server, streams) -> requests.Response:
    """Send small requests until one is refused: the server must answer 503 while its streams still run."""
    while True:
        assert any(s.is_alive() for s in streams), "every stream ended before the server refused a request"
        r = requests.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
        if r.status_code != 200:
            return r


@pytest.mark.parametrize("how", ["sigterm", "terminate_process"])
def test_shutdown_lets_8_streams_finish(tmp_path, how):
    server = _start(tmp_path, f"shutdown-{how}", 300)
    pids = _tree(server.proc.pid)
    assert len(pids) >= 2, "expected an API process and an engine process"
    streams = [Stream(server, i, 96) for i in range(8)]
    try:
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(300)
        assert all(s.error is None for s in streams), [s.error for s in streams]
        stopper = None
        if how == "sigterm":
            server.proc.send_signal(signal.SIGTERM)
        else:
            stopper = threading.Thread(target=terminate_process, args=(server.proc, 300), daemon=True)
            stopper.start()
        r = _wait_for_503(server, streams)
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after"), r.headers
        assert "shutting down" in r.json()["error"]["message"]
        for s in streams:
            s.join(300)
        for s in streams:
            assert s.error is None, s.error
            assert s.finish_reason == "length", (s.i, s.finish_reason)
            assert s.usage is not None and s.usage.completion_tokens == 96, s.usage
        assert server.proc.wait(120) == 0, server.log()[-3000:]
        if stopper is not None:
            stopper.join(60)
        assert _left(pids) == []
        assert "aborting" not in server.log()
    finally:
        terminate_process(server.proc, 5)


def test_shutdown_timeout_aborts_the_rest(tmp_path):
    server = _start(tmp_path, "shutdown-timeout", 1)
    pids = _tree(server.proc.pid)
    streams = [Stream(server, i, 4000) for i in range(2)]
    try:
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(300)
        server.proc.send_signal(signal.SIGTERM)
        for s in streams:
            s.join(120)
        for s in streams:
            assert s.error is None, s.error
            assert s.finish_reason == "abort", (s.i, s.finish_reason)
            assert s.usage is not None and 0 < s.usage.completion_tokens < 4000, s.usage
        assert server.proc.wait(60) == 0, server.log()[-3000:]
        assert _left(pids) == []
        assert "aborting 2 request(s)" in server.log()
    finally:
        terminate_process(server.proc, 5)
