"""GLM-4.7-Flash (glm4_moe_lite) on a tiny hub-layout checkpoint (tests/tiny_glm.py): batching, what the MLA KV pool
holds, the nextn layer, the stacked expert layout, and `ember serve` with the glm47 / glm45 parsers over real HTTP.
(Logits and greedy tokens against transformers: tests/models/test_vs_transformers.py, "tiny-glm4-moe-lite".)"""

import pytest
import torch

from tests.models.checks import (WEATHER_MESSAGES, WEATHER_TOOLS, assert_batched_equals_solo,
                                 assert_native_generate_matches, assert_pools_empty, served)
from tests.models.test_vs_transformers import assert_same_greedy

NAME = "tiny-glm4-moe-lite"
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
TEXT = "Latent attention keeps one compressed row per token; the experts are chosen in groups. " * 2
LENGTHS = [2, 5, 11, 18, 27, 40, 61, 90]


# (fixtures `engine` and `prompts` from tests/models/conftest.py: NAME's engine, TEXT cut to LENGTHS tokens)
def test_batched_prompts_of_different_lengths_equal_solo(engine, prompts, reference_for):
    assert_batched_equals_solo(engine, prompts, reference_for(NAME), GREEDY)


def test_chunked_prefill_and_small_pages_match_the_reference(engine_for, prompts, reference_for):
    from tests.models.test_vs_transformers import hf_greedy
    small = engine_for(NAME, chunked_prefill_size=8, page_size=4)
    ids = prompts[-1]
    out = small.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 32})
    ref = reference_for(NAME)
    assert_same_greedy(out["output_ids"], hf_greedy(ref, ids, 32), ref, ids)
    assert_pools_empty(small)


@pytest.mark.parametrize("path", ["absorbed", "up-projected"])
def test_both_attention_paths_match_the_reference(engine, reference_for, path):
    """Prefill takes the absorbed form or up-projects the latents by chunk length; force each one."""
    from tests.models.test_vs_transformers import LOGIT_TOL, PROMPTS, prompt_ids, reference_logits
    ids = prompt_ids(engine.tokenizer, PROMPTS[NAME])
    attns = [layer.self_attn.attn for layer in engine.core.runner.model.model.layers]
    default = attns[0].up_project_from
    assert len(ids) > default  # unforced, this prompt's prefill up-projects and decode steps absorb
    engine.flush_cache()
    try:
        for a in attns:
            a.up_project_from = float("inf") if path == "absorbed" else 0
        ours = engine.core.prompt_logits(ids).cpu()
    finally:
        for a in attns:
            a.up_project_from = default
    assert (ours - reference_logits(reference_for(NAME), ids)).abs().max().item() < LOGIT_TOL


def test_prefix_cache_reuses_latent_rows(engine):
    """A second request sharing a prefix reads the first one's cached latent rows and generates what it
    generates with an empty cache."""
    engine.flush_cache()
    prefix = engine.tokenizer.encode(TEXT * 2)[:150]
    engine.generate(input_ids=prefix + engine.tokenizer.encode(" first"), sampling_params=GREEDY)
    second = prefix + engine.tokenizer.encode(" second")
    cached = engine.generate(input_ids=second, sampling_params=GREEDY)
    assert cached["meta_info"]["cached_tokens"] >= 150 - engine.core.runner.page_size
    engine.flush_cache()
    fresh = engine.generate(input_ids=second, sampling_params=GREEDY)
    assert fresh["meta_info"]["cached_tokens"] == 0
    assert cached["output_ids"] == fresh["output_ids"]
    assert_pools_empty(engine)


def test_the_kv_pool_holds_only_the_latent_and_the_rope_key(engine, prompts, reference_for):
    """Acceptance 4: (kv_lora_rank + qk_rope_head_dim) x element size per token per layer, and those rows are
    exactly the reference's compressed cache (kv_a_layernorm(latent) ; rotated rope key)."""
    from ember.engine.request import Req
    from ember.engine.sampling_params import SamplingParams
    runner, cfg = engine.core.runner, engine.core.runner.config
    pool = runner.kv_cache
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert sorted(pool.k) == list(range(cfg.num_hidden_layers))  # no pool rows for the nextn layer
    for layer in range(cfg.num_hidden_layers):
        k, v = pool.layer(layer)
        slots = k.shape[0]
        per_token = (k.numel() * k.element_size() + v.numel() * v.element_size()) / slots
        assert per_token == width * torch.empty((), dtype=runner.dtype).element_size() == width * 4
    # what is in the rows: fill a request's pages, then read them back
    ids = prompts[-2]
    engine.flush_cache()
    req = Req("kv-probe", list(ids), SamplingParams())
    for g in pool.groups:
        req.page_tables[g] = []
    assert engine.core.scheduler._try_alloc(req, len(ids))
    try:
        runner.forward([req], [len(ids)])
        P, table = pool.page_size, req.page_tables["full"]
        slots = torch.tensor([table[p // P] * P + p % P for p in range(len(ids))])
        with torch.no_grad():
            cache = reference_for(NAME)(torch.tensor([ids]), use_cache=True).past_key_values
        for layer in range(cfg.num_hidden_layers):
            rows = pool.layer(layer)[0].index_select(0, slots.to(pool.layer(layer)[0].device))[:, 0].cpu()
            want = torch.cat([cache.layers[layer].keys[0, 0], cache.layers[layer].values[0, 0]], dim=-1)
            assert rows.shape == (len(ids), width)
            assert (rows - want).abs().max().item() < 1e-5, layer
    finally:
        engine.core.scheduler.release(req)
    assert_pools_empty(engine)


def test_nextn_layer_is_loaded_under_its_hub_names_and_not_run(engine, tiny_glm4_moe_lite_dir):
    from safetensors import safe_open
    model = engine.core.runner.model
    n = model.config.num_hidden_layers
    assert len(model.mtp_layers) == 1
    mtp = model.mtp_layers[0]
    with safe_open(str(tiny_glm4_moe_lite_dir / "model.safetensors"), "pt") as f:
        for hub, ours in [("eh_proj.weight", mtp.eh_proj.weight), ("enorm.weight", mtp.enorm.weight),
                          ("hnorm.weight", mtp.hnorm.weight), ("shared_head.norm.weight", mtp.shared_head.norm.weight),
                          ("mlp.gate.e_score_correction_bias", mtp.mlp.gate.e_score_correction_bias)]:
            assert torch.equal(ours.cpu(), f.get_tensor(f"model.layers.{n}.{hub}")), hub
        kv_b = mtp.self_attn.kv_b_proj  # per head W_UK then W_UV rows in the checkpoint; regrouped in ours
        w_uk, w_uv = kv_b.split()
        hub = f.get_tensor(f"model.layers.{n}.self_attn.kv_b_proj.weight").view(kv_b.num_heads, kv_b.dn + kv_b.dv, -1)
        assert torch.equal(w_uk.cpu(), hub[:, :kv_b.dn]) and torch.equal(w_uv.cpu(), hub[:, kv_b.dn:])
        I = mtp.mlp.experts.intermediate_size
        assert torch.equal(mtp.mlp.experts.w13[5, I:].cpu(), f.get_tensor(f"model.layers.{n}.mlp.experts.5.up_proj.weight"))
        assert torch.equal(mtp.mlp.experts.w2[7].cpu(), f.get_tensor(f"model.layers.{n}.mlp.experts.7.down_proj.weight"))
    ids = engine.tokenizer.encode("the plain forward never runs the nextn layer")
    before = engine.core.prompt_logits(ids)
    saved = [p.detach().clone() for p in mtp.parameters()]
    try:
        with torch.no_grad():
            for p in mtp.parameters():
                p.fill_(float("nan"))
        assert torch.equal(engine.core.prompt_logits(ids), before)
    finally:
        with torch.no_grad():
            for p, s in zip(mtp.parameters(), saved):
                p.copy_(s)


def test_stacked_expert_layout_loads_the_same_weights(engine, tiny_glm4_moe_lite_dir, reference_for):
    """transformers' in-memory layout (experts.gate_up_proj / experts.down_proj as [E, ...] tensors) loads into
    the same parameters as the hub's per-expert tensors; the nextn layer still comes from the checkpoint."""
    from ember.loader import iter_weights
    from ember.models.glm4_moe_lite import Glm4MoeLiteForCausalLM
    config = engine.core.runner.config
    n = config.num_hidden_layers
    stacked = reference_for(NAME).state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in stacked
    mtp = [(k, t) for k, t in iter_weights(tiny_glm4_moe_lite_dir) if k.startswith(f"model.layers.{n}.")]
    model = Glm4MoeLiteForCausalLM(config)
    model.load_weights(list(stacked.items()) + mtp)
    ours = dict(engine.core.runner.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ours[name].cpu()), name


def test_a_missing_checkpoint_tensor_is_named(tiny_glm4_moe_lite_dir):
    from ember.loader import iter_weights
    from ember.models.glm4_moe_lite import Glm4MoeLiteForCausalLM
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(tiny_glm4_moe_lite_dir)
    weights = [(k, t) for k, t in iter_weights(tiny_glm4_moe_lite_dir) if k != "model.layers.2.mlp.experts.3.gate_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.w13"):
        Glm4MoeLiteForCausalLM(config).load_weights(weights)


# ------------------------------------------------------------------------------ serving (acceptance 6)
@pytest.fixture(scope="module")
def server(tiny_glm4_moe_lite_dir):
    with served(tiny_glm4_moe_lite_dir, "--tool-call-parser glm47 --reasoning-parser glm45") as url:
        yield url


def test_served_with_its_parsers_gives_the_engines_tokens(server, engine):
    import openai
    engine.flush_cache()
    messages, tools = WEATHER_MESSAGES, WEATHER_TOOLS
    chat_ids = engine.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    want = engine.generate(input_ids=chat_ids, sampling_params=GREEDY)["output_ids"]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="EMPTY", max_retries=0, timeout=300)
    r = client.chat.completions.create(model="default", messages=messages, tools=tools, temperature=0, logprobs=True,
                                       max_tokens=GREEDY["max_new_tokens"], extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(chat_ids)
    assert r.usage.completion_tokens == len(want)
    # the chosen tokens, as the API spells them (random weights emit GLM's special tokens too, which the
    # parsers consume, so the message text alone would not show every token)
    assert [e.token for e in r.choices[0].logprobs.content] == [
        engine.tokenizer.decode([t], skip_special_tokens=False) for t in want]

    assert_native_generate_matches(server, engine, engine.tokenizer.encode(TEXT)[:40], GREEDY)


def test_bfloat16_keeps_the_router_in_float32(tiny_glm4_moe_lite_dir):
    """As the reference does: the selection bias differs by ~1e-2 between experts, bf16 would reorder them."""
    from transformers import AutoConfig

    from ember.engine.model_runner import load_model
    model, _ = load_model(tiny_glm4_moe_lite_dir, AutoConfig.from_pretrained(tiny_glm4_moe_lite_dir),
                          torch.bfloat16, "cpu")
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.bfloat16
    from safetensors import safe_open
    with safe_open(str(tiny_glm4_moe_lite_dir / "model.safetensors"), "pt") as f:
        assert torch.equal(gate.e_score_correction_bias, f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias"))


def test_dense_layers_follow_first_k_dense_replace(tiny_glm4_moe_lite_dir):
    from transformers import AutoConfig

    from ember.models.glm4_moe_lite import is_sparse_layer
    config = AutoConfig.from_pretrained(tiny_glm4_moe_lite_dir)
    assert [is_sparse_layer(config, i) for i in range(5)] == [False, True, True, True, True]  # 4: the nextn layer
    config.mlp_layer_types = None
    config.first_k_dense_replace = 2
    assert [is_sparse_layer(config, i) for i in range(4)] == [False, False, True, True]
    config.mlp_layer_types = ["dense", "sparse", "sparse", "sparse"]
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        is_sparse_layer(config, 0)


@pytest.mark.parametrize("variant", [{"q_lora_rank": None}, {"rope_interleave": False, "n_group": 1, "topk_group": 1,
                                                            "rope_parameters": {"rope_type": "default",
                                                                                "rope_theta": 10000.0}}])
def test_config_variants_match_the_reference(variant, tmp_path):
    """A plain q_proj (q_lora_rank None); rotate-half rope, no expert groups, no YaRN (no nextn layer here)."""
    from transformers import AutoModelForCausalLM

    from ember import Engine
    from tests.models.test_vs_transformers import LOGIT_TOL, reference_logits
    from tests.tiny_glm import tiny_glm4_moe_lite
    path = tiny_glm4_moe_lite(tmp_path / "variant", num_nextn_predict_layers=0, **variant)
    engine = Engine(model_path=str(path), dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
    try:
        ids = engine.tokenizer.encode(TEXT)[:50]
        ours = engine.core.prompt_logits(ids).cpu()
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert (ours - reference_logits(ref, ids)).abs().max().item() < LOGIT_TOL
    finally:
        engine.shutdown()
