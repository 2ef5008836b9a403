"""Checks the model tests share: the KV pools hold nothing after a run, batched prompts give each prompt's
solo greedy tokens (the tie rule of tests/models/test_vs_transformers.py), and a model served over HTTP answers
with its engine's tokens."""
import contextlib
import sys

from tests.models.test_vs_transformers import assert_same_greedy

# a chat request that invites a tool call, for the seed models served with their tool and reasoning parsers
WEATHER_MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@contextlib.contextmanager
def served(model_dir, flags: str):
    """`ember serve` on 127.0.0.1 in its own process (float32, a small pool) with `flags`; yields its URL."""
    from ember.launch_server import launch_server_cmd, terminate_process, wait_for_server
    cmd = (f"{sys.executable} -m ember.cli serve --model-path {model_dir} {flags} --dtype float32 "
           "--cpu-kv-cache-gb 0.25 --host 127.0.0.1 --log-level warning")
    proc, port = launch_server_cmd(cmd)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=600, process=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate_process(proc)


def assert_native_generate_matches(url, engine, ids, greedy: dict):
    """The native /generate endpoint gives the in-process engine's greedy tokens for `ids`."""
    import requests
    resp = requests.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": greedy}, timeout=300)
    resp.raise_for_status()
    engine.flush_cache()
    assert resp.json()["output_ids"] == engine.generate(input_ids=ids, sampling_params=greedy)["output_ids"]


def assert_pools_empty(engine):
    """Nothing running or waiting; every page of every pool free or cached, and free once the cache is flushed."""
    s = engine.core.stats()
    assert s["running"] == 0 and s["waiting"] == 0
    for g, pool in s["pools"].items():
        assert pool["free"] + pool.get("cached", 0) == pool["total"], (g, pool)
    assert engine.flush_cache()
    for g, pool in engine.core.stats()["pools"].items():
        assert pool["free"] == pool["total"], (g, pool)


def assert_batched_equals_solo(engine, prompts, reference, greedy: dict):
    solo = []
    for p in prompts:
        engine.flush_cache()
        solo.append(engine.generate(input_ids=p, sampling_params=greedy)["output_ids"])
    engine.flush_cache()
    batched = engine.generate(input_ids=prompts, sampling_params=greedy)
    for p, alone, out in zip(prompts, solo, batched):
        assert len(out["output_ids"]) == greedy["max_new_tokens"]
        assert_same_greedy(out["output_ids"], alone, reference, p)
    assert_pools_empty(engine)
