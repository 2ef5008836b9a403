"""Speculative decoding (issue 17): every algorithm gives the tokens of speculation off (greedy, alone and batched),
sampling stays lossless, grammar / stop strings / logprobs hold mid-acceptance, preemption and aborts leave every
page free, and the seeds' speculative flags serve the tiny Step-3.5 / GLM-4.7-Flash models."""
import json
import os
import random
import sys

import pytest
import torch

from tests.models.checks import assert_pools_empty
from tests.models.test_engine import assert_pool_empty
from tests.models.test_vs_transformers import assert_same_greedy

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
# 8 prompts of mixed lengths, some repetitive (n-gram drafts find matches), some not
PROMPTS = [
    "Hi",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef add(a, b):\n",
    "The capital of France is",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who " * 3,
    "Q: What is 2 + 2?\nA:",
    "the cat sat on the mat. the cat sat on the mat. the cat",
    "x",
]
SEED_000 = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", "4", "--enable-multi-layer-eagle"]
SEED_001 = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", "4"]


def _kwargs(flags: list[str]) -> dict:
    out, i = {}, 0
    while i < len(flags):
        name = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value = flags[i + 1]
            out[name] = int(value) if value.isdigit() else value
            i += 2
        else:
            out[name] = True
            i += 1
    return out


def _engine(engine_for, request, name, **spec):
    if name == "tiny-step3p5-mtp3":
        from ember import Engine
        key = ("_spec_mtp3", tuple(sorted(spec.items())))
        cache = request.config.__dict__.setdefault("_spec_engines", {})
        if key not in cache:
            path = request.getfixturevalue("tiny_step3p5_mtp3_dir")
            cache[key] = Engine(model_path=str(path), dtype="float32", cpu_kv_cache_gb=0.25, **spec)
        return cache[key]
    return engine_for(name, **spec)


TREE = {"speculative_num_steps": 3, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6}
CASES = {  # id: (model, reference, speculative args; "@tiny-llama" = that fixture's directory)
    "ngram": ("smollm2", "smollm2", {"speculative_algorithm": "NGRAM"}),
    "ngram-short-window": ("smollm2", "smollm2", {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 3,
                                                  "speculative_ngram_max_match_window_size": 2}),
    "ngram-tree": ("smollm2", "smollm2", {"speculative_algorithm": "NGRAM", "speculative_ngram_max_bfs_breadth": 3}),
    "standalone-self": ("tiny-qwen3", "tiny-qwen3", {"speculative_algorithm": "STANDALONE",
                                                     "speculative_draft_model_path": "@tiny_qwen3_dir"}),
    "standalone-other": ("tiny-qwen3", "tiny-qwen3", {"speculative_algorithm": "STANDALONE",
                                                      "speculative_draft_model_path": "@tiny_llama_dir",
                                                      "speculative_num_steps": 5}),
    "eagle-step3p5-mtp3": ("tiny-step3p5-mtp3", "tiny-step3p5", _kwargs(SEED_000)),
    "nextn-glm": ("tiny-glm4-moe-lite", "tiny-glm4-moe-lite", {**_kwargs(SEED_001), "speculative_algorithm": "NEXTN"}),
    "eagle-step3p5-mtp1": ("tiny-step3p5", "tiny-step3p5", _kwargs(SEED_001)),
    # tree drafts: topk 2, 3 steps, 6 tokens per verify (the root and the 5 best of 2 + 4 + 4 candidates)
    "standalone-tree-self": ("tiny-qwen3", "tiny-qwen3", {**TREE, "speculative_algorithm": "STANDALONE",
                                                          "speculative_draft_model_path": "@tiny_qwen3_dir"}),
    "standalone-tree-other": ("tiny-qwen3", "tiny-qwen3", {**TREE, "speculative_algorithm": "STANDALONE",
                                                           "speculative_draft_model_path": "@tiny_llama_dir"}),
    "eagle-tree-step3p5-mtp3": ("tiny-step3p5-mtp3", "tiny-step3p5", {**_kwargs(SEED_000), **TREE}),
    "nextn-tree-glm": ("tiny-glm4-moe-lite", "tiny-glm4-moe-lite", {**_kwargs(SEED_001), **TREE,
                                                                    "speculative_algorithm": "NEXTN"}),
}


_PLAIN: dict = {}


def _plain(engine, name: str, prompt, params: dict) -> dict:
    """Speculation off's output for (model, prompt, params), from an emptied prefix cache: computed once for all
    the tests and cases that compare against it (the engine is deterministic; float32 decode is most of this
    file's time)."""
    key = (name, json.dumps(prompt), json.dumps(params, sort_keys=True))
    if key not in _PLAIN:
        engine.flush_cache()
        _PLAIN[key] = engine.generate(prompt, params)
    return _PLAIN[key]


def _spec_args(request, spec: dict) -> dict:
    return {k: str(request.getfixturevalue(v[1:])) if isinstance(v, str) and v.startswith("@") else v
            for k, v in spec.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_speculation_off(case, engine_for, reference_for, request):
    name, ref_name, spec = CASES[case]
    spec = _spec_args(request, spec)
    plain = _engine(engine_for, request, name)
    engine = _engine(engine_for, request, name, **spec)
    tok = engine.tokenizer
    off = [_plain(plain, name, p, GREEDY)["output_ids"] for p in PROMPTS]
    engine.flush_cache()
    alone = [engine.generate(p, GREEDY) for p in PROMPTS]
    engine.flush_cache()
    batched = engine.generate(PROMPTS, GREEDY)
    ref = reference_for(ref_name)
    for p, want, a, b in zip(PROMPTS, off, alone, batched):
        for got in (a, b):
            assert len(got["output_ids"]) == GREEDY["max_new_tokens"]
            if got["output_ids"] != want:
                assert_same_greedy(got["output_ids"], want, ref, tok.encode(p))
    verifies = sum(o["meta_info"]["spec_verify_ct"] for o in alone + batched)
    assert verifies >= GREEDY["max_new_tokens"] - 1  # every decode step went through the speculative step
    stats = engine.core.stats()["speculative"]
    assert stats["draft_tokens"] > 0
    if case in ("ngram", "ngram-tree", "standalone-self"):  # drafts that are mostly right: fewer steps than tokens
        assert stats["avg_accept_length"] > 1.5, stats
        assert any(o["meta_info"]["spec_accept_length"] > 1.5 for o in alone)
    assert_pools_empty(engine)  # every pool (full and sliding-window)
    drafter = engine.core.spec.drafter
    for alloc in getattr(drafter, "allocators", {}).values():  # the draft model's pool too
        assert alloc.num_free == alloc.total
    if hasattr(drafter, "allocator"):  # the MTP layers' pool
        assert drafter.allocator.num_free == drafter.allocator.total


def test_step3p5_mtp_layers_keep_their_clamps(engine_for, request):
    """transformers' config trims the MTP entries off swiglu_limits(_shared); the drafter reads them back."""
    engine = _engine(engine_for, request, "tiny-step3p5-mtp3", **_kwargs(SEED_000))
    layers = engine.core.spec.drafter.step_layers
    assert [layer.mlp.limit for layer in layers] == [0.2, None, 0.15]  # (dense MTP layers: the shared clamp)


def test_seeded_sampling_draws_the_tokens_of_speculation_off(engine_for, tiny_qwen3_dir, tiny_llama_dir):
    """On the tiny model (vocabulary 260), 2,000 seeded requests of 4 tokens with speculation give exactly the
    tokens without it (the verify samples each drafted position with the plain sampler's seeded draw). The
    distribution itself is checked against an exactly known target in tests/unit/test_spec_verify.py."""
    n = 2_000
    sp = {"temperature": 0.8, "max_new_tokens": 4, "ignore_eos": True}
    big = {"max_running_requests": 512, "chunked_prefill_size": 8192}
    plain = engine_for("tiny-qwen3", **big)
    for draft in (tiny_qwen3_dir, tiny_llama_dir):
        spec = engine_for("tiny-qwen3", **big, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(draft))
        params = [{**sp, "seed": i} for i in range(n)]
        on = [o["output_ids"] for k in range(0, n, 500) for o in spec.generate(["ab"] * 500, params[k:k + 500])]
        off = [o["output_ids"] for k in range(0, n, 500) for o in plain.generate(["ab"] * 500, params[k:k + 500])]
        assert on == off
        assert spec.core.stats()["speculative"]["draft_tokens"] > n


def test_draft_min_confidence_ends_chains_early(engine_for, tiny_qwen3_dir):
    """--speculative-draft-min-confidence: the tiny model's own drafts are never confident (flat random logits, top
    probability < 0.01), so at 0.5 every chain stops after its first draft (verified beside the draft's runner-up:
    2 drafts a verify), at 0 it runs all 3 steps; the tokens are those of speculation off either way."""
    greedy = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    want = engine_for("tiny-qwen3").generate(PROMPTS[:4], greedy)
    per_verify = {}
    for conf in (0.0, 0.5):
        spec = engine_for("tiny-qwen3", speculative_algorithm="STANDALONE", speculative_draft_min_confidence=conf,
                          speculative_draft_model_path=str(tiny_qwen3_dir))
        assert [o["output_ids"] for o in spec.generate(PROMPTS[:4], greedy)] == [o["output_ids"] for o in want]
        stats = spec.core.stats()["speculative"]
        per_verify[conf] = stats["draft_tokens"] / stats["verify_ct"]
    assert per_verify[0.5] <= 2.0 and per_verify[0.0] > 2.0, per_verify  # (a verify near max_tokens drafts less)


def test_a_cut_chain_keeps_the_runner_up_of_its_last_draft(engine_for, tiny_qwen3_dir):
    """A chain ended by the confidence cut is verified as a tree: its last draft and, beside it, the draft's second
    choice there. Here the draft (the target's own weights) has its top two logits swapped at every step, so each
    chain's only draft is the target's second choice and the runner-up is the target's token: nearly every verify
    accepts the runner-up (and the target's token after it), the draft model's KV stays right (it never ran on the
    sibling), and the tokens are those of speculation off, alone and batched."""
    greedy = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    want = [o["output_ids"] for o in engine_for("tiny-qwen3").generate(PROMPTS, greedy)]
    spec = engine_for("tiny-qwen3", speculative_algorithm="STANDALONE", speculative_draft_min_confidence=0.5,
                      speculative_draft_model_path=str(tiny_qwen3_dir))
    runner = spec.core.spec.drafter.runner
    forward = runner.forward

    def top_two_swapped(*args, **kwargs):
        logits = forward(*args, **kwargs).clone()
        top = logits.topk(2, dim=-1).indices
        first, second = logits.gather(-1, top[:, :1]), logits.gather(-1, top[:, 1:])
        return logits.scatter(-1, top[:, :1], second).scatter(-1, top[:, 1:], first)

    runner.forward = top_two_swapped
    try:
        before = dict(spec.core.stats()["speculative"])
        got = [[o["output_ids"] for o in spec.generate([p], greedy)][0] for p in PROMPTS[:3]]
        got += [o["output_ids"] for o in spec.generate(PROMPTS[3:], greedy)]
        stats = spec.core.stats()["speculative"]
    finally:
        runner.forward = forward
    assert got == want
    accepted = stats["accepted_tokens"] - before["accepted_tokens"]
    verifies = stats["verify_ct"] - before["verify_ct"]
    assert accepted / verifies > 1.8, (accepted, verifies)  # a chain alone would keep 1 token a verify here


def test_disable_by_batch_size_runs_plain_steps_while_the_batch_is_large(engine_for, tiny_qwen3_dir):
    """--speculative-disable-by-batch-size 3: while 3 or more requests decode, steps carry no drafts (each decode
    step counts as a verify of one token); when fewer are left, drafting resumes and the draft model catches up on
    the tokens it skipped. The tokens are those of speculation off."""
    lens = [4, 6, 8, 24]
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in lens]
    want = engine_for("tiny-qwen3").generate(PROMPTS[:4], params)
    spec = engine_for("tiny-qwen3", speculative_algorithm="STANDALONE", speculative_disable_by_batch_size=3,
                      speculative_draft_model_path=str(tiny_qwen3_dir))
    got = spec.generate(PROMPTS[:4], params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    verifies = [o["meta_info"]["spec_verify_ct"] for o in got]
    # the first two finish while 3+ requests decode: one token per step (the first token came from the prefill)
    assert verifies[:2] == [lens[0] - 1, lens[1] - 1], verifies
    # the last one drafts once alone (its own weights draft it: every draft accepted, 4 tokens per verify)
    assert verifies[3] < lens[3] - 1 - 8, verifies
    from ember import Engine
    common = {"model_path": str(tiny_qwen3_dir), "dtype": "float32", "cpu_kv_cache_gb": 0.05}
    with pytest.raises(ValueError, match="disable-by-batch-size must be >= 1"):
        Engine(**common, speculative_algorithm="NGRAM", speculative_disable_by_batch_size=0)
    with pytest.raises(ValueError, match="disable-by-batch-size needs --speculative-algorithm"):
        Engine(**common, speculative_disable_by_batch_size=4)


@pytest.mark.parametrize("quantization", ["none", "w4a8"])
def test_token_map_drafts_only_its_tokens(quantization, engine_for, tiny_qwen3_dir, tmp_path):
    """--speculative-token-map: the draft model's lm_head is cut to the map's ids (fewer rows to read per draft
    step), every draft is one of them, and the tokens are those of speculation off (the target verifies all)."""
    from torch import nn
    greedy = {**GREEDY, "max_new_tokens": 16}
    vocab = engine_for("tiny-qwen3").core.vocab_size
    hot = list(range(0, vocab, 2)) + [1, 3]  # (unsorted: the map is a set)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(hot))
    base = {"quantization": quantization} if quantization != "none" else {}
    want = engine_for("tiny-qwen3", **base).generate(PROMPTS[:4], greedy)
    spec = engine_for("tiny-qwen3", **base, speculative_algorithm="STANDALONE", speculative_token_map=str(path),
                      speculative_draft_model_path=str(tiny_qwen3_dir))
    drafter = spec.core.spec.drafter
    head = drafter.runner.model.lm_head
    assert head.out_features == len(hot) and (quantization == "none") == isinstance(head, nn.Linear)
    drafts = []
    propose = drafter.propose
    drafter.propose = lambda *a: drafts.append(propose(*a)) or drafts[-1]
    got = spec.generate(PROMPTS[:4], greedy)
    tokens = [t for step in drafts for d in step for t in d]
    assert len(tokens) > 20 and set(tokens) <= set(hot)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert spec.core.stats()["speculative"]["avg_accept_length"] > 1.2  # the self-draft still mostly right


def test_token_map_errors(tiny_qwen3_dir, tmp_path):
    from ember import Engine
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([0, 1, 10**6]))
    common = {"model_path": str(tiny_qwen3_dir), "dtype": "float32", "cpu_kv_cache_gb": 0.05}
    with pytest.raises(ValueError, match=r"needs token ids in \[0, "):
        Engine(**common, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tiny_qwen3_dir),
               speculative_token_map=str(bad))
    with pytest.raises(ValueError, match="needs --speculative-algorithm STANDALONE"):
        Engine(**common, speculative_algorithm="NGRAM", speculative_token_map=str(bad))
    with pytest.raises(ValueError, match="no such file"):
        Engine(**common, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tiny_qwen3_dir),
               speculative_token_map=str(tmp_path / "missing.json"))


def test_sampled_distribution_matches_speculation_off(engine_for, tiny_qwen3_dir):
    """Acceptance 2: on the tiny model (vocabulary 260; its random logits are flat, so temperature 0.06 gives
    peaked but spread distributions), 20,000 seeded samples of the first 4 tokens with a STANDALONE draft (the
    model's own argmax: about a quarter of the drafts accepted) and 20,000 without speculation, on disjoint seeds
    (independent samples), come from one distribution (chi-square, p > 0.01) at every position and for consecutive
    pairs. Checked to fail when a mismatching draft is accepted for one token in five."""
    from tests.unit.test_spec_verify import homogeneity_p
    n, chunk = 20_000, 1_000
    sp = {"temperature": 0.06, "max_new_tokens": 4, "ignore_eos": True}
    big = {"max_running_requests": chunk, "chunked_prefill_size": 8192}
    plain = engine_for("tiny-qwen3", **big)
    spec = engine_for("tiny-qwen3", **big, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tiny_qwen3_dir))

    def sample(engine, seed0):
        return [tuple(o["output_ids"]) for k in range(0, n, chunk)
                for o in engine.generate(["ab"] * chunk, [{**sp, "seed": seed0 + k + i} for i in range(chunk)])]
    on, off = sample(spec, 0), sample(plain, n)
    stats = spec.core.stats()["speculative"]
    accepted = stats["accepted_tokens"] - stats["verify_ct"]  # (accepted_tokens counts each verify's own token too)
    assert 0.05 * stats["draft_tokens"] < accepted < 0.95 * stats["draft_tokens"], stats  # many of each
    assert len(set(on[:200])) > 150  # a spread distribution, not a few likely sequences
    for pos in range(4):
        assert homogeneity_p([s[pos] for s in on], [s[pos] for s in off]) > 0.01, pos
    for pos in range(3):  # and consecutive pairs
        assert homogeneity_p([s[pos:pos + 2] for s in on], [s[pos:pos + 2] for s in off]) > 0.01, pos


@pytest.mark.parametrize("case", ["ngram", "standalone-self", "standalone-tree"])
def test_json_schema_stop_strings_and_logprobs(case, engine_for, smollm2_dir, request):
    import jsonschema  # the test extra has it: missing fails, never skips
    from tests.models.test_sampling import random_schema
    spec = {"speculative_algorithm": "NGRAM"} if case == "ngram" else {
        "speculative_algorithm": "STANDALONE", "speculative_draft_model_path": str(smollm2_dir)}
    if case == "standalone-tree":  # grammar masks at every tree node, the matcher rolled back down each branch
        spec.update(TREE)
    engine = engine_for("smollm2", **spec)
    plain = engine_for("smollm2")
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(10)]
    params = [{"temperature": t, "max_new_tokens": 200, "seed": i, "json_schema": json.dumps(s)}
              for i, (s, t) in enumerate(zip(schemas, [0.0, 1.0] * 5))]
    outs = engine.generate(["Produce a JSON object:"] * 10, params)
    for schema, out in zip(schemas, outs):
        jsonschema.validate(json.loads(out["text"]), schema)
    assert sum(o["meta_info"]["spec_verify_ct"] for o in outs) > 0
    # stop strings: the text stops right before the stop string, as without speculation
    engine.flush_cache()
    full = _plain(plain, "smollm2", PROMPTS[1], GREEDY)
    stop = full["text"].strip().split()[2]
    out = engine.generate(PROMPTS[1], {**GREEDY, "stop": [stop]})
    want = _plain(plain, "smollm2", PROMPTS[1], {**GREEDY, "stop": [stop]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == want["text"] and stop not in out["text"]
    # max_tokens cuts mid-acceptance; logprobs: one entry per completion token, the values of speculation off
    for max_new in (1, 5, 13):
        lp = {**GREEDY, "max_new_tokens": max_new, "logprobs": 2}
        out, want = engine.generate(PROMPTS[3], lp), _plain(plain, "smollm2", PROMPTS[3], lp)
        assert out["output_ids"] == want["output_ids"] and len(out["output_ids"]) == max_new
        got_lp, want_lp = out["meta_info"]["output_token_logprobs"], want["meta_info"]["output_token_logprobs"]
        assert len(got_lp) == max_new
        for (c1, top1), (c2, top2) in zip(got_lp, want_lp):
            assert abs(c1 - c2) < 1e-4 and [t for t, _ in top1] == [t for t, _ in top2]
    # the thinking budget forces `</think>` mid-acceptance: the tokens of speculation off
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                                add_generation_prompt=True, tokenize=False) + "<think>\n"
    for budget in (1, 6, 11):
        tb = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True, "thinking_budget": budget}
        assert engine.generate(chat, tb)["output_ids"] == _plain(plain, "smollm2", chat, tb)["output_ids"]
    assert_pool_empty(engine)


@pytest.mark.parametrize("case", ["ngram", "standalone", "standalone-tree"])
def test_w4a8_verify_steps_are_decode_steps(case, engine_for, reference_for, smollm2_dir):
    """Under w4a8 (what the CPU serves by default) decode steps run fused (kernels/fused_decode.cpp), and so do
    verify steps, one row per token with a one-token step's arithmetic (a tree node's row sees the prefix and its
    ancestors): alone, speculation gives the logprobs of speculation off bit for bit, not only its greedy tokens
    (the torch path would round differently). Batched, the prompts' prefill (torch path) may be batched
    differently by the two engines, so there the tokens are compared with the tie rule."""
    spec = {"speculative_algorithm": "NGRAM"} if case == "ngram" else {
        "speculative_algorithm": "STANDALONE", "speculative_draft_model_path": str(smollm2_dir)}
    if case == "standalone-tree":
        spec.update(TREE)
    plain = engine_for("smollm2", quantization="w4a8")
    engine = engine_for("smollm2", quantization="w4a8", **spec)
    assert engine.core.runner.fused_decoder is not None
    params = {**GREEDY, "max_new_tokens": 32, "logprobs": 3}
    for p in PROMPTS:
        for e in (plain, engine):
            e.flush_cache()
        want, got = plain.generate(p, params), engine.generate(p, params)
        assert got["output_ids"] == want["output_ids"]
        assert got["meta_info"]["output_token_logprobs"] == want["meta_info"]["output_token_logprobs"]
    for e in (plain, engine):
        e.flush_cache()
    want, got = plain.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    for p, w, g in zip(PROMPTS, want, got):
        if g["output_ids"] != w["output_ids"]:
            assert_same_greedy(g["output_ids"], w["output_ids"], reference_for("smollm2"), engine.tokenizer.encode(p))
    assert engine.core.stats()["speculative"]["avg_accept_length"] > 1.5
    assert_pool_empty(engine)


@pytest.mark.parametrize("case", ["ngram", "standalone-self", "standalone-tree"])
def test_concurrent_aborts_and_preemption_free_every_page(case, engine_for, smollm2_dir):
    from ember.engine.io_struct import GenerateReq
    from ember.engine.sampling_params import SamplingParams
    spec = {"speculative_algorithm": "NGRAM"} if case == "ngram" else {
        "speculative_algorithm": "STANDALONE", "speculative_draft_model_path": str(smollm2_dir)}
    if case == "standalone-tree":
        spec.update(TREE)
    plain = engine_for("smollm2")
    small = engine_for("smollm2", max_total_tokens=384, page_size=16, **spec)  # 32 requests need ~2000 tokens
    tok = small.tokenizer
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    want = {p: _plain(plain, "smollm2", p, GREEDY)["output_ids"] for p in set(prompts)}
    core = small.core
    small.flush_cache()
    rids = [f"spec-{i}" for i in range(32)]
    for rid, p in zip(rids, prompts):
        core.add_request(GenerateReq(rid, tok.encode(p), SamplingParams(**GREEDY)))
    outputs, finish, steps = {rid: [] for rid in rids}, {}, 0
    aborted = set(rids[3::4])
    while core.has_work():
        for out in core.step():
            outputs[out.rid] += out.new_token_ids
            if out.finished:
                finish[out.rid] = out.finish_reason
        steps += 1
        if steps in (4, 9):
            for rid in list(aborted)[steps % 2::2]:
                core.abort(rid)
    assert core.stats()["total_preemptions"] > 0
    for rid, p in zip(rids, prompts):
        if rid in aborted:
            assert finish[rid] in ("abort", "length")
        else:
            assert finish[rid] == "length" and outputs[rid] == want[p], rid
    assert_pool_empty(small)
    for alloc in getattr(core.spec.drafter, "allocators", {}).values():
        assert alloc.num_free == alloc.total


SEED_001_TREE = SEED_001[:5] + ["2", "--speculative-num-draft-tokens", "6"]  # topk 2: a tree through the CLI


@pytest.mark.parametrize("model, flags", [("tiny_step3p5_mtp3_dir", SEED_000), ("tiny_glm4_moe_lite_dir", SEED_001),
                                          ("tiny_glm4_moe_lite_dir", SEED_001_TREE),
                                          # seed 001 passes --tp-size 4: two ranks here, each drafting with its shard
                                          ("tiny_glm4_moe_lite_dir", SEED_001 + ["--tp-size", "2"])])
def test_seed_flags_serve_a_chat_request(model, flags, request, monkeypatch):
    import openai
    from ember.launch_server import launch_server_cmd, terminate_process, wait_for_server
    monkeypatch.setenv("SGLANG_ENABLE_SPEC_V2", "1")  # the seeds set it; harmless here
    path = request.getfixturevalue(model)
    cmd = (f"{sys.executable} -m ember.cli serve --model-path {path} --dtype float32 --cpu-kv-cache-gb 0.1 "
           f"--host 127.0.0.1 --log-level warning " + " ".join(flags))
    proc, port = launch_server_cmd(cmd)
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=600, process=proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello!"}],
                                           temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        import requests
        info = requests.get(f"http://127.0.0.1:{port}/get_server_info", timeout=30).json()
        assert info["speculative_algorithm"] == "EAGLE"
        assert info["engine_stats"]["speculative"]["verify_ct"] >= 11
        ndraft = int(flags[flags.index("--speculative-num-draft-tokens") + 1])
        assert info["engine_stats"]["speculative"]["num_draft_tokens"] == ndraft
    finally:
        terminate_process(proc)
    assert os.environ["SGLANG_ENABLE_SPEC_V2"] == "1"
