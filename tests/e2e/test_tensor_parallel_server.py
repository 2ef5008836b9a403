"""--tp-size 2 behind the real HTTP server (CPU, gloo, tiny models): a rank killed mid-generation, and two
"nodes" on 127.0.0.1 serving one tensor-parallel engine (tests/models/test_tensor_parallel.py checks the numbers
of every architecture in-process)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from ember.utils import get_free_port, terminate_process
from tests.e2e.conftest import _die_with_test_process, _server_env, start_server
from tests.tiny_models import tiny_model


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _workers(pid: int) -> list[psutil.Process]:
    return [p for p in _tree(pid)[1:] if "ember.distributed.worker" in " ".join(p.cmdline())]


def test_killing_a_rank_fails_the_requests_and_stops_the_server(tmp_path):
    path = tiny_model("llama", tmp_path / "tiny-llama")
    server = start_server(["--model-path", str(path), "--tp-size", "2"], tmp_path, "tp-kill")
    try:
        tree = _tree(server.proc.pid)
        workers = _workers(server.proc.pid)
        assert len(workers) == 1, [p.cmdline() for p in tree]
        events = []
        with requests.post(f"{server.base_url}/v1/completions", stream=True, timeout=120,
                           json={"model": "m", "prompt": "tensor parallel", "max_tokens": 900, "ignore_eos": True,
                                 "stream": True}) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:  # mid-generation
                    workers[0].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        assert any(e.get("choices") for e in events[:3])
        assert "error" in events[-1], events[-1]  # the request in flight ends with an error, not a hang
        assert "rank 1" in events[-1]["error"]["message"] or "tensor-parallel" in events[-1]["error"]["message"]
        code = server.proc.wait(timeout=30)
        assert code != 0 and time.monotonic() - t_kill < 30
        log = server.log()
        assert "rank 1 (pid" in log and "killed by signal 9" in log, log[-3000:]
        deadline = time.monotonic() + 10  # the kernel reaps the last children asynchronously
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left behind: {left}"
    finally:
        terminate_process(server.proc)


@pytest.mark.parametrize("kind", ["glm4_moe_lite"])
def test_two_nodes_serve_one_engine(kind, tmp_path):
    """--nnodes 2 --node-rank 0|1 --dist-init-addr 127.0.0.1:PORT, tp=2 across them: node 1 runs rank 1 only,
    node 0 serves HTTP; greedy text equals the single-rank engine's, and the seed's chat request is answered."""
    from ember import Engine
    path = tiny_model(kind, tmp_path / kind)
    prompt = "random weights: latent attention, grouped routing"
    want = Engine(model_path=str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05).generate(
        prompt, {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})["text"]

    flags = ["--model-path", str(path), "--tp-size", "2", "--nnodes", "2", "--dist-init-addr",
             f"127.0.0.1:{get_free_port()}", "--tool-call-parser", "glm47", "--reasoning-parser", "glm45",
             "--served-model-name", "glm-4.7-flash", "--trust-remote-code", "--mem-fraction-static", "0.8"]
    node1_log = open(tmp_path / "node1.log", "w")
    node1 = subprocess.Popen([sys.executable, "-m", "ember.launch_server", *flags, "--node-rank", "1",
                              "--cpu-kv-cache-gb", "0.5"], stdout=node1_log, stderr=subprocess.STDOUT,
                             env=_server_env(), start_new_session=True, preexec_fn=_die_with_test_process)
    server = None
    try:
        server = start_server([*flags, "--node-rank", "0"], tmp_path, "node0")
        assert not _workers(server.proc.pid)  # rank 1 lives on "node 1"
        r = requests.post(f"{server.base_url}/v1/completions", timeout=120,
                          json={"model": "glm-4.7-flash", "prompt": prompt, "max_tokens": 16, "temperature": 0,
                                "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        chat = server.openai().chat.completions.create(
            model="glm-4.7-flash", messages=[{"role": "user", "content": "你好，请介绍一下你自己。"}], max_tokens=16)
        assert chat.choices[0].finish_reason in ("stop", "length")
        # SIGTERM on node 0 stops every rank, node 1's too
        tree = _tree(server.proc.pid) + _tree(node1.pid)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        assert node1.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if server is not None:
            terminate_process(server.proc)
        try:  # node 1's rank ends with node 0's engine
            assert node1.wait(timeout=30) is not None
        finally:
            terminate_process(node1)
            node1_log.close()
