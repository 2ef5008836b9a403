"""Tree drafts (--speculative-eagle-topk > 1): the tree attention mask gives every node the logits of its path run
alone (full and sliding-window layers, MLA, next to a plain request in the batch), and the drafters' trees hold
their own chain drafts along the best branch (so the branch rows read the right tokens and hidden states)."""
import random

import pytest
import torch

from tests.models.test_speculative import SEED_000, SEED_001, _engine, _kwargs
from tests.models.checks import assert_pools_empty


class _Seq:
    """What the batch builder reads."""
    def __init__(self, token_ids, kv_len, page_tables):
        self.token_ids, self.kv_len, self.page_tables, self.spec_tree = token_ids, kv_len, page_tables, None


def _pages(runner, n):
    P = runner.kv_cache.page_size
    return {g: a.alloc(-(-n // P)) for g, a in runner.kv_cache.allocators.items()}


def _free(runner, tables):
    for g, t in tables.items():
        runner.kv_cache.allocators[g].free(t)


@pytest.mark.parametrize("name, backend", [("tiny-step3p5", None), ("tiny-glm4-moe-lite", None), ("tiny-qwen3", None),
                                           ("tiny-step3p5", "triton"), ("tiny-glm4-moe-lite", "triton")])
def test_tree_mask_gives_each_node_the_logits_of_its_path(name, backend, engine_for):
    """(backend triton: the Triton kernels' tree masks, under Triton's interpreter on CPU)"""
    from ember.speculative.tree import DraftTree
    engine = engine_for(name, **({"attention_backend": backend} if backend else {}))
    engine.flush_cache()
    runner, V = engine.core.runner, engine.core.vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(V) for _ in range(40)]  # longer than the tiny Step-3.5's window (16)
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 6, 8]  # depth up to 5, siblings at several depths
    tree = DraftTree([prompt[-1]] + [rng.randrange(V) for _ in parents[1:]], parents)
    L = len(prompt) - 1
    other_ids = [rng.randrange(V) for _ in range(27)]
    tables, other_tables = _pages(runner, L + len(tree)), _pages(runner, len(other_ids))
    seq, other = _Seq(prompt + tree.drafts, 0, tables), _Seq(other_ids, 0, other_tables)
    with torch.inference_mode():
        runner.forward([seq, other], [L, 20])
        seq.kv_len, other.kv_len = L, 20
        seq.spec_tree = tree.spec(L)
        got = runner.forward([seq, other], [len(tree), 7], all_positions=True)
        for j in range(len(tree)):
            path = [tree.tokens[x] for x in tree.path(j)]
            ref_tables = _pages(runner, L + 1 + len(path))
            want = runner.forward([_Seq(prompt + path, 0, ref_tables)], [L + 1 + len(path)])[0]
            _free(runner, ref_tables)
            torch.testing.assert_close(got[j], want, rtol=1e-4, atol=1e-4, msg=f"node {j}")
        ref_tables = _pages(runner, len(other_ids))
        want = runner.forward([_Seq(other_ids, 0, ref_tables)], [len(other_ids)], all_positions=True)[-7:]
        _free(runner, ref_tables)
        torch.testing.assert_close(got[len(tree):], want, rtol=1e-4, atol=1e-4)
    _free(runner, tables)
    _free(runner, other_tables)
    assert_pools_empty(engine)


# every candidate in the tree (2 + 2*2 + 2*2 = 10 drafts): node 1 is the root's best child, nodes 3, 4 its children
ALL = {"speculative_num_steps": 3, "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 11}


def _case(case, tiny_llama_dir):
    return {
        "standalone": ("tiny-qwen3", {"speculative_algorithm": "STANDALONE",
                                      "speculative_draft_model_path": str(tiny_llama_dir)}),
        "eagle-step3p5-mtp3": ("tiny-step3p5-mtp3", _kwargs(SEED_000)),
        "nextn-glm": ("tiny-glm4-moe-lite", {**_kwargs(SEED_001), "speculative_algorithm": "NEXTN"}),
    }[case]


@pytest.mark.parametrize("case", ["standalone", "eagle-step3p5-mtp3", "nextn-glm"])
def test_tree_follows_the_chain_drafts(case, engine_for, request, tiny_llama_dir):
    from ember.engine.io_struct import GenerateReq
    from ember.engine.sampling_params import SamplingParams
    name, spec = _case(case, tiny_llama_dir)
    engine = _engine(engine_for, request, name, **{**spec, **ALL})
    plain = _engine(engine_for, request, name)
    core, tok = engine.core, engine.tokenizer
    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman"
    greedy = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    engine.flush_cache()
    core.add_request(GenerateReq("tree", tok.encode(prompt), SamplingParams(**greedy)))
    out, checked, deep = [], 0, 0
    while core.has_work():
        running = [r for r in core.scheduler.running if r.rid == "tree"]
        if running and running[0].num_output >= 1 and running[0].extend_len == 1 and \
                running[0].sampling.max_new_tokens - running[0].num_output > 4:
            req, drafter = running[0], core.spec.drafter
            chain = drafter.propose([req], [3])[0]
            tree = drafter.propose_tree([req], [10], [3])[0]
            if chain and tree is not None:
                assert len(tree) == 11 and tree.parents[3] == 1
                assert tree.tokens[1] == chain[0] and tree.tokens[3] == chain[1], (chain, tree.tokens)
                if tree.parents[7] == 3:  # node 3 was the best of its step: its best child is the third draft
                    assert tree.tokens[7] == chain[2]
                    deep += 1
                checked += 1
        for o in core.step():
            out += o.new_token_ids
    assert checked >= 2 and deep >= 1
    plain.flush_cache()
    assert out == plain.generate(prompt, greedy)["output_ids"]
    assert_pools_empty(engine)


@pytest.mark.parametrize("case", ["standalone", "nextn-glm"])
def test_seeded_sampling_with_trees_draws_the_tokens_of_speculation_off(case, engine_for, request, tiny_llama_dir):
    """Sampling along the tree is lossless: each node's row is the plain sampler's seeded draw for that output
    position, so 400 seeded requests give exactly the tokens of speculation off (tests/unit/test_spec_verify.py checks
    the sampler's law itself)."""
    name, spec = _case(case, tiny_llama_dir)
    big = {"max_running_requests": 256, "chunked_prefill_size": 8192}
    engine = _engine(engine_for, request, name, **{**spec, **ALL, **big})
    plain = _engine(engine_for, request, name, **big)
    n, sp = 400, {"temperature": 0.8, "max_new_tokens": 6, "ignore_eos": True}
    params = [{**sp, "seed": i} for i in range(n)]
    on = [o["output_ids"] for k in range(0, n, 200) for o in engine.generate(["ab"] * 200, params[k:k + 200])]
    off = [o["output_ids"] for k in range(0, n, 200) for o in plain.generate(["ab"] * 200, params[k:k + 200])]
    assert on == off
    stats = engine.core.stats()["speculative"]
    assert stats["draft_tokens"] > n and stats["accepted_tokens"] > stats["verify_ct"], stats  # some drafts taken
    assert_pools_empty(engine)


def test_tree_under_preemption_keeps_both_pools_exact(engine_for, request):
    """Step-3.5 (full and sliding-window pools, 3 MTP layers) with trees on a pool too small for the batch: requests
    are preempted and recomputed mid-tree, yet give the tokens of speculation off and leave every page free."""
    from tests.models.test_speculative import GREEDY, PROMPTS
    spec = {**_kwargs(SEED_000), "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6,
            "max_total_tokens": 320, "page_size": 16}
    engine = _engine(engine_for, request, "tiny-step3p5-mtp3", **spec)
    plain = _engine(engine_for, request, "tiny-step3p5-mtp3")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    want = {}
    for p in set(prompts):
        plain.flush_cache()
        want[p] = plain.generate(p, GREEDY)["output_ids"]
    engine.flush_cache()
    outs = engine.generate(prompts, GREEDY)
    assert engine.core.stats()["total_preemptions"] > 0 and engine.core.stats()["speculative"]["draft_tokens"] > 0
    for p, o in zip(prompts, outs):
        assert o["output_ids"] == want[p], p
    assert_pools_empty(engine)
    drafter = engine.core.spec.drafter
    assert drafter.allocator.num_free == drafter.allocator.total
