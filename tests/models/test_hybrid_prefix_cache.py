"""Prefix cache on hybrid models (sliding-window + full attention layers): a cached prefix keeps the last
window of the sliding layers, so a second request reuses it and gets the tokens it gets with the cache off;
after a mix of finished, aborted and preempted requests every page of both KV pools is free or cached."""
import random

import pytest

from ember.engine.io_struct import GenerateReq
from ember.engine.sampling_params import SamplingParams

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
# Per model: chunked prefill shorter than the prompts; max_running_requests x (window + chunk + 2 pages) tokens for
# the sliding layers (how the runner sizes that pool) and --max-total-tokens a bit more for the full layers, so the
# random mix preempts and the prefix cache must give back windows of the sliding layers, while the 4-window prefix
# still fits.
HYBRID = {
    "tiny-gemma3": dict(max_total_tokens=152, max_running_requests=3, chunked_prefill_size=16, page_size=8),
    "tiny-step3p5": dict(max_total_tokens=152, max_running_requests=3, chunked_prefill_size=16, page_size=8),
    "gemma3": dict(max_total_tokens=2100, max_running_requests=2, chunked_prefill_size=256, page_size=16),
}
TINY = [name for name in HYBRID if name.startswith("tiny-")]


def window_of(engine) -> int:
    return engine.core.runner.window


def text_ids(engine, n: int, seed: int) -> list[int]:
    """n token ids of ordinary text (different text per seed)."""
    words = ["dragon", "river", "castle", "winter", "lantern", "forest", "knight", "harbor", "silver", "storm"]
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        ids += engine.tokenizer.encode(" ".join(rng.choice(words) for _ in range(64)) + ".")
    return ids[:n]


def assert_pools_free_or_cached(engine):
    core = engine.core
    s = core.stats()
    assert s["running"] == 0 and s["waiting"] == 0
    assert set(s["pools"]) == {"full", "swa"}
    for g, pool in s["pools"].items():
        assert pool["free"] + pool["cached"] == pool["total"], (g, s)
    assert not any(n.ref or n.swa_ref for n in core.radix._iter_nodes())
    assert engine.flush_cache()
    for g, pool in core.stats()["pools"].items():
        assert pool["free"] == pool["total"], (g, pool)


@pytest.mark.parametrize("name", list(HYBRID))
def test_second_request_reuses_a_prefix_of_four_windows(name, engine_for):
    cached_engine = engine_for(name, **HYBRID[name])
    assert "swa" in cached_engine.core.runner.kv_cache.groups and cached_engine.core.radix is not None
    window, page = window_of(cached_engine), HYBRID[name]["page_size"]
    prefix = text_ids(cached_engine, 4 * window, seed=0)
    cached_engine.flush_cache()
    first = cached_engine.generate(input_ids=prefix + text_ids(cached_engine, 5, seed=1), sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    second_ids = prefix + text_ids(cached_engine, 7, seed=2)
    second = cached_engine.generate(input_ids=second_ids, sampling_params=GREEDY)
    assert second["meta_info"]["cached_tokens"] >= len(prefix) - page
    assert_pools_free_or_cached(cached_engine)  # (empties the cache)
    alone = cached_engine.generate(input_ids=second_ids, sampling_params=GREEDY)
    assert alone["meta_info"]["cached_tokens"] == 0
    assert second["output_ids"] == alone["output_ids"]


def run_mix(engine, prompts, seed: int, sampling: dict):
    """Requests arrive over time; some are aborted at random steps. Returns ({rid: tokens}, {rid: reason},
    {rid: cached_tokens})."""
    core, rng = engine.core, random.Random(seed)
    todo = list(enumerate(prompts))
    outputs, finish, cached = {}, {}, {}
    while todo or core.has_work():
        if todo and rng.random() < 0.7:
            i, ids = todo.pop(0)
            core.add_request(GenerateReq(f"mix-{i}", ids, SamplingParams(**sampling)))
            outputs[f"mix-{i}"] = []
        for out in core.step():
            outputs[out.rid] += out.new_token_ids
            cached[out.rid] = out.cached_tokens
            if out.finished:
                finish[out.rid] = out.finish_reason
        live = [rid for rid in outputs if rid not in finish]
        if live and rng.random() < 0.04:
            core.abort(rng.choice(live))
    return outputs, finish, cached


def mix_prompts(engine, count: int, seed: int) -> list[list[int]]:
    """Prompts sharing two long prefixes (in turn; longer than the window) at random lengths, with their own
    tails."""
    window, rng = window_of(engine), random.Random(seed)
    shared = [text_ids(engine, 3 * window, seed=10), text_ids(engine, 3 * window, seed=11)]
    return [shared[i % 2][:rng.randint(window // 2, 3 * window)] + text_ids(engine, rng.randint(1, 8), 100 + i)
            for i in range(count)]


def count_swa_evictions(engine, monkeypatch) -> list[int]:
    radix, counter = engine.core.radix, [0]
    evict_swa = radix.evict_swa

    def counted(n):
        freed = evict_swa(n)
        counter[0] += freed
        return freed
    monkeypatch.setattr(radix, "evict_swa", counted)
    return counter


@pytest.mark.parametrize("name", TINY)
def test_random_mix_on_tiny_hybrid_gives_solo_tokens_and_frees_every_page(name, engine_for, monkeypatch):
    engine = engine_for(name, **HYBRID[name])
    engine.flush_cache()
    preemptions = engine.core.stats()["total_preemptions"]
    swa_evicted = count_swa_evictions(engine, monkeypatch)
    prompts = mix_prompts(engine, 24, seed=3)
    sampling = {**GREEDY, "max_new_tokens": 24}  # decoding past the window too
    outputs, finish, cached = run_mix(engine, prompts, seed=4, sampling=sampling)
    assert engine.core.stats()["total_preemptions"] > preemptions
    assert swa_evicted[0] > 0  # the cache gave back windows of the sliding layers (tombstones)
    assert "abort" in finish.values() and "length" in finish.values()
    assert any(cached.values())
    solo = engine_for(name, **HYBRID[name], disable_radix_cache=True)
    for i, ids in enumerate(prompts):
        if finish[f"mix-{i}"] == "length":
            assert outputs[f"mix-{i}"] == solo.generate(input_ids=ids, sampling_params=sampling)["output_ids"], i
    assert_pools_free_or_cached(engine)


def test_random_mix_on_gemma3_frees_every_page(engine_for, monkeypatch):
    engine = engine_for("gemma3", **HYBRID["gemma3"])
    engine.flush_cache()
    preemptions = engine.core.stats()["total_preemptions"]
    swa_evicted = count_swa_evictions(engine, monkeypatch)
    outputs, finish, cached = run_mix(engine, mix_prompts(engine, 4, seed=5), seed=6, sampling=GREEDY)
    assert engine.core.stats()["total_preemptions"] > preemptions
    assert swa_evicted[0] > 0
    assert "abort" in finish.values() and "length" in finish.values()
    assert any(cached.values())
    assert_pools_free_or_cached(engine)
