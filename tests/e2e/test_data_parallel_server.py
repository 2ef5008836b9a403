"""--dp-size 2 behind the real HTTP server (tiny llama, CPU): concurrent requests spread over both replicas and
the outputs equal the single engine's."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from ember.utils import terminate_process
from tests.e2e.conftest import start_server
from tests.tiny_models import tiny_model


def test_dp2_spreads_requests_and_matches_one_engine(tmp_path):
    from ember import Engine
    path = tiny_model("llama", tmp_path / "tiny-llama")
    prompts = [f"request number {i}: data parallel replicas" for i in range(32)]
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    one = Engine(model_path=str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    want = [o["text"] for o in one.generate(prompts, params)]
    server = start_server(["--model-path", str(path), "--dp-size", "2"], tmp_path, "dp2")
    try:
        def complete(prompt):
            r = requests.post(f"{server.base_url}/v1/completions", timeout=300,
                              json={"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                    "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(complete, prompts))
        assert got == want
        stats = requests.get(f"{server.base_url}/get_server_info", timeout=30).json()["engine_stats"]
        dispatched = [r["dispatched"] for r in stats["replicas"]]
        assert stats["dp_size"] == 2 and sum(dispatched) == 32
        assert min(dispatched) >= 8, dispatched  # each replica served at least a quarter
        assert stats["total_pages"] == sum(r["total_pages"] for r in stats["replicas"])
        metrics = requests.get(f"{server.base_url}/metrics", timeout=30).text
        assert 'ember_total_pages{dp_rank="0"}' in metrics and 'ember_total_pages{dp_rank="1"}' in metrics
    finally:
        terminate_process(server.proc)
