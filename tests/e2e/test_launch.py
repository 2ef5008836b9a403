"""Seed 000's Python start script pattern: launch_server_cmd -> wait_for_server -> terminate_process,
leaving no process behind; and a server whose model fails to load exits with the error."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import requests

from ember.utils import get_free_port, launch_server_cmd, terminate_process, wait_for_server


def _tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p] + p.children(recursive=True)


def _health_statuses_until_ready(port: int, proc, timeout: float = 600) -> list[int]:
    statuses = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            statuses.append(requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
        except requests.RequestException:
            pass
        if statuses and statuses[-1] == 200:
            break
        time.sleep(0.1)
    return statuses


def test_launch_wait_terminate_leaves_nothing(smollm2_model, capfd):
    port = get_free_port()
    cmd = (
        f"python -m ember.launch_server "
        f"--model-path {smollm2_model} "
        f"--host 127.0.0.1 "
        f"--port 8000 "
        f"--cpu-kv-cache-gb 0.25 "
        f"--disable-cuda-graph "
        f"--trust-remote-code"
    )
    server_process, port = launch_server_cmd(cmd, port=port)
    try:
        statuses = _health_statuses_until_ready(port, server_process)
        assert statuses and statuses[-1] == 200 and 503 in statuses, statuses  # 503 while loading
        wait_for_server(f"http://127.0.0.1:{port}", timeout=600, process=server_process)
        time.sleep(0.5)
        assert f"ember server ready at http://127.0.0.1:{port}" in capfd.readouterr().err
        procs = _tree(server_process.pid)
        assert len(procs) >= 2, "expected an API process and an engine process"
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions",
                          json={"model": "x", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        pids = [p.pid for p in _tree(server_process.pid)] if server_process.poll() is None else []
        terminate_process(server_process)
    time.sleep(0.5)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left behind: {alive}"


def test_engine_dies_with_killed_api_process(smollm2_model):
    """SIGKILL on the API process (no cleanup at all): the engine process notices and exits."""
    port = get_free_port()
    proc, port = launch_server_cmd(f"{sys.executable} -m ember.launch_server --model-path {smollm2_model} "
                                   f"--cpu-kv-cache-gb 0.25", port=port)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=600, process=proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.kill()
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"engine survived its parent: {alive}"
    finally:
        terminate_process(proc)


def test_load_failure_exits_with_the_error(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    port = get_free_port()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "ember.launch_server", "--model-path", str(bad), "--port", str(port)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "engine failed to start" in r.stderr
    assert str(bad) in r.stderr or "not-a-model" in r.stderr
