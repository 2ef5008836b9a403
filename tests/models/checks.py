"""Checks the model tests share: the KV pools hold nothing after a run, and batched prompts give each prompt's
solo greedy tokens (the tie rule of tests/models/test_vs_transformers.py)."""
from tests.models.test_vs_transformers import assert_same_greedy


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
