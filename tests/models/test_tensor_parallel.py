"""Tensor parallelism (ember/distributed): an engine with --tp-size 2 on CPU (gloo, two rank processes) gives
the single-rank engine's results: prefill logits within 1e-3 (fp32) and the same 32 greedy tokens (tie rule).

Each tp=2 engine is started for its test and shut down after it (one torch.distributed group per process)."""
from __future__ import annotations

import pytest
import torch

from ember import Engine
from ember.layers.moe import MoEExperts
from tests.models.test_vs_transformers import PROMPTS, assert_same_greedy, prompt_ids

TP_LOGIT_TOL = 1e-3  # measured: 2e-7 on the tiny models, 4e-5 on SmolLM2 (the shards sum in another order)
GREEDY = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}


def tp_engine(request, name, **kwargs):
    path = request.getfixturevalue(__import__("tests.models.conftest", fromlist=["x"]).MODEL_FIXTURES[name])
    engine = Engine(model_path=str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05, **kwargs)
    request.addfinalizer(engine.shutdown)
    return engine


def check_same_as_tp1(name, tp2, engine_for, reference_for):
    tp1 = engine_for(name)
    ids = prompt_ids(tp1.tokenizer, PROMPTS[name])
    ours, single = tp2.core.prompt_logits(ids), tp1.core.prompt_logits(ids)
    diff = (ours - single).abs().max().item()
    assert diff < TP_LOGIT_TOL, f"tp=2 prefill logits differ from tp=1 by {diff}"
    # two requests in one batch (prefill, then decode steps of both), 32 greedy tokens each
    other = ids[: max(1, len(ids) // 2)]
    outs = tp2.generate(input_ids=[ids, other], sampling_params=GREEDY)
    for prompt, out in zip([ids, other], outs):
        want = tp1.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
        assert len(out["output_ids"]) == 32
        if out["output_ids"] != want:  # only then load the reference for the tie rule
            assert_same_greedy(out["output_ids"], want, reference_for(name), prompt)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "smollm2"])
def test_tp2_matches_tp1(name, request, engine_for, reference_for):
    tp2 = tp_engine(request, name, tp_size=2)
    attn = tp2.core.runner.model.model.layers[0].self_attn
    full = engine_for(name).core.runner.model.model.layers[0].self_attn
    # each rank holds its share of the heads (SmolLM2: 9 heads in 3 KV groups -> 6 + 3 on rank 0 + 1)
    assert 0 < attn.num_heads < full.num_heads and attn.num_kv_heads <= full.num_kv_heads
    assert tp2.core.runner.kv_cache.k[0].shape[1] == attn.num_kv_heads  # the KV pool holds this rank's heads
    check_same_as_tp1(name, tp2, engine_for, reference_for)


def moe_layers(engine):
    return [m for m in engine.core.runner.model.modules() if isinstance(m, MoEExperts)]


def param_bytes(engine):
    return sum(p.numel() * p.element_size() for p in engine.core.runner.model.parameters())


# (model, --ep-size): ep=1 splits each expert's intermediate dimension over the 2 ranks, ep=2 gives each rank half
# the experts whole (per-expert checkpoint tensors on Qwen3-MoE, stacked ones on Step-3.5); one engine each
MOE = [("tiny-qwen3-moe", 2), ("tiny-minimax-m2", 1), ("tiny-step3p5", 2), ("tiny-glm4-moe-lite", 1)]


@pytest.mark.parametrize("name, ep", MOE)
def test_tp2_moe_matches_tp1(name, ep, request, engine_for, reference_for):
    """Also Step-3.5's per-layer-type heads, MLA's heads (GLM), MiniMax-M2's whole-projection q/k norms."""
    tp2 = tp_engine(request, name, tp_size=2, ep_size=ep)
    tp1 = engine_for(name)
    for held, full in zip(moe_layers(tp2), moe_layers(tp1)):
        if ep == 1:
            assert held.num_experts == full.num_experts and held.intermediate_size * 2 == full.intermediate_size
        else:  # rank 0 holds the first half of the experts of every MoE layer, whole
            assert held.num_experts * 2 == full.num_experts and held.expert_offset == 0
            assert held.intermediate_size == full.intermediate_size
            assert torch.equal(held.w13, full.w13[:held.num_experts])
    # about half of the single rank's weights (the norms, routers and MLA's latent projections are replicated)
    assert 0.45 < param_bytes(tp2) / param_bytes(tp1) < 0.62
    check_same_as_tp1(name, tp2, engine_for, reference_for)


@pytest.mark.parametrize("spec", [{"speculative_algorithm": "NGRAM"},
                                  {"speculative_algorithm": "STANDALONE", "speculative_num_steps": 3,
                                   "speculative_eagle_topk": 2, "speculative_num_draft_tokens": 6}],
                         ids=["ngram", "standalone-tree"])
def test_tp2_speculative_gives_the_tokens_of_tp1(spec, request, engine_for, reference_for, tiny_qwen3_dir):
    """NGRAM and a STANDALONE draft model (here a tree, verified under its tree mask on every rank) at tp 2: the
    drafts ride in the target's steps, which every rank runs; the draft model is one whole copy on rank 0."""
    name = "tiny-qwen3"
    if spec["speculative_algorithm"] == "STANDALONE":
        spec = {**spec, "speculative_draft_model_path": str(tiny_qwen3_dir)}
    tp2 = tp_engine(request, name, tp_size=2, **spec)
    assert tp2.core.spec is not None
    check_same_as_tp1(name, tp2, engine_for, reference_for)
    stats = tp2.core.stats()["speculative"]
    assert stats["draft_tokens"] > 0 and stats["avg_accept_length"] > 1.2, stats


SEED_000 = {"speculative_algorithm": "EAGLE", "speculative_num_steps": 3, "speculative_eagle_topk": 1,
            "speculative_num_draft_tokens": 4, "enable_multi_layer_eagle": True}
MTP_CASES = {  # id: (model directory fixture, --ep-size, speculative args)
    "eagle-step3p5-mtp3-ep2": ("tiny_step3p5_mtp3_dir", 2, SEED_000),  # seed 000: 3 MTP layers chained
    "nextn-glm": ("tiny_glm4_moe_lite_dir", 1, {**SEED_000, "speculative_algorithm": "NEXTN",
                                                "enable_multi_layer_eagle": False}),  # seed 001: 1 nextn layer
    "nextn-tree-glm": ("tiny_glm4_moe_lite_dir", 1, {**SEED_000, "speculative_algorithm": "NEXTN",
                                                     "enable_multi_layer_eagle": False, "speculative_eagle_topk": 2,
                                                     "speculative_num_draft_tokens": 6}),
}


def _record_drafts(drafter) -> list:
    """Wraps the drafter's propose calls (a spy on rank 0's drafter object) to log the drafts of each step."""
    log = []
    for name in ("propose", "propose_tree"):
        def spy(*args, _call=getattr(drafter, name)):
            out = _call(*args)
            log.append([list(getattr(d, "drafts", d) or []) for d in out])
            return out
        setattr(drafter, name, spy)
    return log


@pytest.mark.parametrize("case", list(MTP_CASES))
def test_tp2_mtp_drafting_gives_the_drafts_of_tp1(case, request):
    """EAGLE / NEXTN at tp 2 (the seeds' --tp-size 4 with their speculative flags): the MTP layers are sharded like
    the model's, so every rank holds a replica of the drafter and runs each draft step with rank 0
    (ember/distributed/driver.py DrafterCall). The same prompts give the tokens, drafts and accepted drafts of the
    same speculation at tp 1, and every pool is free afterwards."""
    from ember.distributed.driver import ReplicatedDrafter
    from tests.models.checks import assert_pools_empty
    fixture, ep, spec = MTP_CASES[case]
    path = request.getfixturevalue(fixture)
    tp1 = Engine(model_path=str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05, **spec)
    request.addfinalizer(tp1.shutdown)
    tp2 = Engine(model_path=str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05, tp_size=2, ep_size=ep,
                 **spec)
    request.addfinalizer(tp2.shutdown)
    assert isinstance(tp2.core.spec.drafter, ReplicatedDrafter)
    # the drafts of every step, as rank 0 returns them (the tiny models' random MTP layers rarely draft the right
    # token, so the outputs alone would not show drafts gone wrong: a rank drafting other tokens than rank 0 feeds
    # the next step's collectives other inputs, and rank 0's next drafts change)
    drafts1, drafts2 = _record_drafts(tp1.core.spec.drafter), _record_drafts(tp2.core.spec.drafter)
    prompts = ["the cat sat on the mat. the cat sat on the mat. the cat", "1, 2, 3, 4, 5, 6, 7,", "x"]
    ids = [tp1.tokenizer.encode(p) for p in prompts]
    want = tp1.generate(input_ids=ids, sampling_params=GREEDY)
    got = tp2.generate(input_ids=ids, sampling_params=GREEDY)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert sum(len(d) for step in drafts1 for d in step) > 100
    assert drafts2 == drafts1
    s1, s2 = tp1.core.stats()["speculative"], tp2.core.stats()["speculative"]
    assert {k: s2[k] for k in ("verify_ct", "draft_tokens", "accepted_tokens")} == \
        {k: s1[k] for k in ("verify_ct", "draft_tokens", "accepted_tokens")}
    assert_pools_empty(tp2)
    drafter = tp2.core.spec.drafter.local
    assert drafter.allocator.num_free == drafter.allocator.total  # the MTP layers' pool (rank 0's replica)


def test_tp2_quantized_keeps_the_collectives(request, engine_for):
    """--quantization replaces the parallel linears: the row-parallel ones must still all-reduce (bias once) and
    the lm_head still gather the vocabulary. int8 scales are per output row of each shard, so tp=2 is not
    bit-equal to tp=1 int8; both stay as close to the fp32 logits (measured 0.0066 and 0.0085)."""
    name = "tiny-qwen2"
    ids = prompt_ids(engine_for(name).tokenizer, PROMPTS[name])
    exact = engine_for(name).core.prompt_logits(ids)
    tp1_err = (engine_for(name, quantization="int8").core.prompt_logits(ids) - exact).abs().max().item()
    tp2 = tp_engine(request, name, tp_size=2, quantization="int8")
    tp2_err = (tp2.core.prompt_logits(ids) - exact).abs().max().item()
    assert tp2_err < 2 * tp1_err, (tp2_err, tp1_err)


def test_a_rank_that_cannot_start_is_reported_and_no_process_is_left(request):
    """tp=3 cannot split tiny-llama's 2 KV heads: the engine fails naming the cause, and stops its workers."""
    import psutil

    from ember.distributed.driver import RankFailed
    path = request.getfixturevalue("tiny_llama_dir")
    with pytest.raises(RankFailed, match="not divisible by 2|tensor-parallel size over KV heads"):
        Engine(model_path=str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05, tp_size=3)
    workers = [p for p in psutil.Process().children(recursive=True)
               if "ember.distributed.worker" in " ".join(p.cmdline())]
    assert not workers
    import torch.distributed
    assert not torch.distributed.is_initialized()  # the next tp engine of this process can start


def test_tp2_with_an_image(tmp_path):
    """Multimodal requests at tp=2 (tiny Qwen2.5-VL, one image): every rank attaches the same embeddings and
    M-RoPE positions, so the greedy tokens are tp=1's."""
    from ember.multimodal.qwen_vl import expand_prompt
    from tests.models.test_qwen2_5_vl import media_for, run
    from tests.tiny_vl import tiny_qwen2_5_vl
    model_dir = tiny_qwen2_5_vl(tmp_path / "qwen2_5_vl")
    kw = dict(dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    outs = []
    for tp in (1, 2):
        engine = Engine(model_path=str(model_dir), tp_size=tp, **kw)
        try:
            media = media_for("one image", model_dir)
            parts = [{"type": "image"}, {"type": "text", "text": "describe the image"}]
            ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": parts}],
                                                       add_generation_prompt=True, tokenize=True, return_dict=False)
            ids, mm = expand_prompt(ids, media, engine.core.hf_config)
            outs.append(run(engine, ids, mm, 16)[0])
        finally:
            engine.shutdown()
    assert outs[0] == outs[1]
