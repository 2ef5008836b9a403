"""Acceptance for the engine core on a real model (SmolLM2-135M): batching, prefix cache, chunked
prefill, preemption and abort leave results unchanged and every page accounted for."""
import asyncio

import pytest

from tests.models.test_vs_transformers import assert_same_greedy

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again and then",
    "Q: What is 2 + 2?\nA:",
    "In machine learning, a transformer is",
]


def assert_pool_empty(engine):
    s = engine.core.stats()
    assert s["running"] == 0 and s["waiting"] == 0
    assert s["free_pages"] + s["cached_pages"] == s["total_pages"], s
    assert engine.flush_cache()
    s = engine.core.stats()
    assert s["free_pages"] == s["total_pages"], s


@pytest.fixture(scope="module")
def smol(engine_for):
    return engine_for("smollm2")


@pytest.fixture(scope="module")
def alone(smol):
    """Each prompt's greedy tokens when it runs by itself, with an empty prefix cache."""
    results = []
    for p in PROMPTS:
        smol.flush_cache()
        results.append(smol.generate(p, GREEDY)["output_ids"])
    return results


def test_batched_generation_equals_alone(smol, alone, reference_for):
    smol.flush_cache()
    batched = smol.generate(PROMPTS, GREEDY)
    ref = reference_for("smollm2")
    for p, solo, out in zip(PROMPTS, alone, batched):
        assert_same_greedy(out["output_ids"], solo, ref, smol.tokenizer.encode(p))
    assert_pool_empty(smol)


def test_prefix_cache_reuse_reports_cached_tokens(smol):
    smol.flush_cache()
    prefix = smol.tokenizer.encode("Here is a long story about a dragon. " * 30)[:200]
    a = smol.generate(input_ids=prefix + smol.tokenizer.encode(" The dragon"), sampling_params=GREEDY)
    assert a["meta_info"]["cached_tokens"] == 0
    second = prefix + smol.tokenizer.encode(" Then the knight")
    b = smol.generate(input_ids=second, sampling_params=GREEDY)
    assert b["meta_info"]["cached_tokens"] >= 192
    assert smol.flush_cache()
    c = smol.generate(input_ids=second, sampling_params=GREEDY)
    assert c["meta_info"]["cached_tokens"] == 0
    assert c["output_ids"] == b["output_ids"]
    assert_pool_empty(smol)


def test_chunked_prefill_matches_unchunked(smol, engine_for):
    chunked = engine_for("smollm2", chunked_prefill_size=64)
    ids = smol.tokenizer.encode("A very long document about the ocean, its waves and creatures. " * 60)[:500]
    assert len(ids) == 500
    smol.flush_cache()
    whole = smol.generate(input_ids=ids, sampling_params=GREEDY)
    pieces = chunked.generate(input_ids=ids, sampling_params=GREEDY)
    assert pieces["output_ids"] == whole["output_ids"]
    assert_pool_empty(chunked)


def test_preemption_with_a_small_pool(engine_for, alone):
    # 32 requests of ~30-45 tokens each need ~1400 tokens of KV at once; give the pool 384
    small = engine_for("smollm2", max_total_tokens=384, page_size=16)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    outs = small.generate(prompts, GREEDY)
    assert small.core.stats()["total_preemptions"] > 0
    for i, out in enumerate(outs):
        assert out["output_ids"] == alone[i % len(PROMPTS)], f"request {i} changed under preemption"
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
    assert_pool_empty(small)


def test_abort_mid_generation_frees_pages(smol, alone):
    smol.flush_cache()
    core = smol.core
    from ember.engine.io_struct import GenerateReq
    from ember.engine.sampling_params import SamplingParams
    rids = [f"abort-{i}" for i in range(len(PROMPTS))]
    for rid, p in zip(rids, PROMPTS):
        core.add_request(GenerateReq(rid, smol.tokenizer.encode(p), SamplingParams(**GREEDY)))
    outputs = {rid: [] for rid in rids}
    finish = {}
    steps = 0
    while core.has_work():
        for out in core.step():
            outputs[out.rid] += out.new_token_ids
            if out.finished:
                finish[out.rid] = out.finish_reason
        steps += 1
        if steps == 6:
            for rid in rids[::2]:
                core.abort(rid)
    for i, rid in enumerate(rids):
        if i % 2 == 0:
            assert finish[rid] == "abort"
        else:
            assert finish[rid] == "length" and outputs[rid] == alone[i]
    assert_pool_empty(smol)


def test_stop_strings_and_stop_tokens(smol, alone):
    smol.flush_cache()
    full = smol.tokenizer.decode(alone[0])
    stop = full.strip().split()[2]
    out = smol.generate(PROMPTS[0], {**GREEDY, "stop": [stop]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in out["text"] and full.startswith(out["text"])
    tok = alone[0][3]
    out = smol.generate(PROMPTS[0], {**GREEDY, "stop_token_ids": [tok]})
    assert out["output_ids"][-1] == tok and out["meta_info"]["matched_stop"] == tok


def test_async_streaming_yields_the_same_tokens(smol, alone):
    smol.flush_cache()

    async def collect():
        ids, text = [], ""
        async for chunk in await smol.async_generate(PROMPTS[1], GREEDY, stream=True):
            ids += chunk["output_ids"]
            text += chunk["text"]
        return ids, text
    ids, text = asyncio.run(collect())
    assert ids == alone[1]
    assert text == smol.tokenizer.decode(alone[1], skip_special_tokens=True)


def test_sampling_seed_is_reproducible_in_a_batch(smol):
    seeded = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    solo = smol.generate(PROMPTS[2], seeded)["output_ids"]
    batch = smol.generate(PROMPTS, [{"temperature": 0.8, "max_new_tokens": 16, "ignore_eos": True}] * 2
                          + [seeded] + [{"temperature": 1.2, "top_k": 5, "max_new_tokens": 16}] * 5)
    assert batch[2]["output_ids"] == solo


def test_prompt_and_output_logprobs_match_transformers(smol, reference_for):
    """Prompt logprobs (echo) computed in chunks inside the batch, and top logprobs of a greedy request."""
    import torch
    from ember.engine.io_struct import GenerateReq
    from ember.engine.sampling_params import SamplingParams
    ids = smol.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    core = smol.core
    old_chunk = core.scheduler.chunk_size
    core.scheduler.chunk_size = 5  # prompt logprobs must survive chunked prefill
    try:
        core.add_request(GenerateReq("lp", ids, SamplingParams(max_new_tokens=4, temperature=0, logprobs=5),
                                     return_prompt_logprobs=True))
        outs = []
        while core.has_work():
            outs += [o for o in core.step() if o.rid == "lp"]
    finally:
        core.scheduler.chunk_size = old_chunk
    prompt_lps = next(o.prompt_logprobs for o in outs if o.prompt_logprobs)
    out_ids = [t for o in outs for t in o.new_token_ids]
    lps = [x for o in outs for x in (o.logprobs or [])]
    ref = reference_for("smollm2")
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([ids + out_ids])).logits[0].float(), -1)
    assert prompt_lps[0] is None and len(prompt_lps) == len(ids)
    for p in range(1, len(ids)):
        assert abs(prompt_lps[p] - ref_lp[p - 1, ids[p]].item()) < 1e-3
    for k, (chosen, top) in enumerate(lps):
        row = ref_lp[len(ids) - 1 + k]
        assert top[0][0] == out_ids[k] and abs(chosen - top[0][1]) < 1e-6  # greedy: the chosen token is the top one
        assert abs(chosen - row[out_ids[k]].item()) < 1e-3
        assert len(top) == 5 and torch.logsumexp(torch.tensor([l for _, l in top]), 0) <= 1e-6


def test_thinking_budget_closes_the_block_and_an_answer_follows(smol):
    """Reasoning effort: once the budget is spent the engine writes `</think>` itself; generation goes on."""
    chat = smol.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                              add_generation_prompt=True, tokenize=False) + "<think>\n"
    out = smol.generate(chat, {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True,
                               "thinking_budget": 6})
    thinking, sep, answer = out["text"].partition("</think>")
    assert sep, out["text"]
    end_ids = smol.tokenizer.encode("</think>", add_special_tokens=False)
    assert out["output_ids"][6:6 + len(end_ids)] == end_ids  # forced right after the 6-token budget
    assert len(out["output_ids"]) == 30 and answer.strip()


def test_zero_max_new_tokens_returns_the_prompt_only(smol):
    out = smol.generate("Hello there", {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
