"""Step-3.5 on a tiny hub-layout checkpoint (tests/step3p5_hub.py): batching, the sliding window under chunked
prefill, the MTP layers, and `ember serve` with the step3p5 parsers over real HTTP.
(Logits and greedy tokens against transformers: tests/models/test_vs_transformers.py, "tiny-step3p5".)"""
import json
import shutil

import pytest
import torch

from tests.models.checks import (WEATHER_MESSAGES, WEATHER_TOOLS, assert_batched_equals_solo,
                                 assert_native_generate_matches, assert_pools_empty, served)
from tests.models.test_vs_transformers import assert_same_greedy, hf_greedy
from tests.step3p5_hub import WINDOW

NAME = "tiny-step3p5"
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
TEXT = ("Sliding windows forget what is far behind them; the full layers remember every token. " * 3)
LENGTHS = [3, 9, 15, 17, 26, 38, 55, 80]  # shorter and longer than the 16-token window


# (fixtures `engine` and `prompts` from tests/models/conftest.py: NAME's engine, TEXT cut to LENGTHS tokens)
def test_batched_prompts_of_different_lengths_equal_solo(engine, prompts, reference_for):
    assert_batched_equals_solo(engine, prompts, reference_for(NAME), GREEDY)


def test_small_chunks_and_pages_past_the_window(engine_for, prompts, reference_for):
    """Prefill chunks of 8 and pages of 4 with a 16-token window: out-of-window pages are released as it goes."""
    small = engine_for(NAME, chunked_prefill_size=8, page_size=4)
    assert small.core.runner.window == WINDOW
    assert sorted(small.core.runner.kv_cache.groups) == ["full", "swa"]
    ids = prompts[-1]
    out = small.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 40})
    ref = reference_for(NAME)
    assert_same_greedy(out["output_ids"], hf_greedy(ref, ids, 40), ref, ids)
    assert_pools_empty(small)


def test_kv_groups_follow_the_layer_types(engine):
    model = engine.core.runner.model
    assert model.kv_groups() == {"full": [0, 4], "swa": [1, 2, 3]}
    heads = [layer.self_attn.num_heads for layer in model.model.layers]
    assert heads == [4, 6, 6, 6, 4]  # attention_other_setting: 6 query heads on sliding layers
    assert [layer.sparse for layer in model.model.layers] == [False, False, True, True, True]


def test_the_flash_config_builds_with_the_model_cards_parameter_counts(tmp_path):
    """Step-3.5-Flash's config through transformers' config class into our model, on the meta device: the shape
    per layer and the totals of the model card (196B parameters, 11B active per token)."""
    from transformers import AutoConfig

    from ember.models.step3p5 import Step3p5ForCausalLM
    from tests.step3p5_hub import flash_config
    (tmp_path / "config.json").write_text(json.dumps(flash_config()))
    config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = Step3p5ForCausalLM(config)
    layers = model.model.layers
    assert model.kv_groups()["full"] == list(range(0, 45, 4)) and len(model.kv_groups()["swa"]) == 33
    assert model.sliding_window() == 512
    assert (layers[0].self_attn.num_heads, layers[1].self_attn.num_heads, layers[1].self_attn.num_kv_heads) == (64, 96, 8)
    assert [layer.sparse for layer in layers[:4]] == [False, False, False, True]
    assert (layers[44].moe.experts.swiglu_limit, layers[44].share_expert.limit, layers[42].moe.experts.swiglu_limit) \
        == (7.0, 16.0, None)
    assert model.model.rotary["full_attention"].rotary_dim == 64 and model.model.rotary["sliding_attention"].rotary_dim == 128
    assert len(model.mtp_layers) == 3 and not model.mtp_layers[0].sparse
    params = {n: p.numel() for n, p in model.named_parameters()}
    main = sum(v for n, v in params.items() if not n.startswith("mtp_layers."))
    experts = sum(v for n, v in params.items() if ".experts.w" in n and not n.startswith("mtp_layers."))
    embeddings = params["model.embed_tokens.weight"] + params["lm_head.weight"]
    active = main - embeddings - experts * (1 - 8 / 288)
    assert 196.0e9 < main < 197.0e9, main
    assert 10.5e9 < active < 11.5e9, active


def test_mtp_layers_are_loaded_under_their_hub_names_and_not_run(engine, tiny_step3p5_dir):
    from safetensors import safe_open
    model = engine.core.runner.model
    assert len(model.mtp_layers) == 1
    mtp = model.mtp_layers[0]
    with safe_open(str(tiny_step3p5_dir / "model.safetensors"), "pt") as f:
        for hub, ours in [("eh_proj.weight", mtp.eh_proj.weight), ("enorm.weight", mtp.enorm.weight),
                          ("transformer.shared_head.output.weight", mtp.transformer.shared_head.output.weight),
                          ("self_attn.g_proj.weight", mtp.self_attn.g_proj.weight),
                          ("mlp.down_proj.weight", mtp.mlp.down_proj.weight)]:
            assert torch.equal(ours.cpu(), f.get_tensor(f"model.layers.5.{hub}")), hub
        q = f.get_tensor("model.layers.5.self_attn.q_proj.weight")
        assert torch.equal(mtp.self_attn.qkv_proj.weight[:q.shape[0]].cpu(), q)
    ids = engine.tokenizer.encode("the plain forward never runs the MTP layer")
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


def test_a_missing_or_misshaped_checkpoint_tensor_is_named(tiny_step3p5_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from ember.engine.model_runner import load_model
    tensors = load_file(str(tiny_step3p5_dir / "model.safetensors"))
    config = AutoConfig.from_pretrained(tiny_step3p5_dir)

    def load(changed: dict):
        d = tmp_path / "ckpt"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        shutil.copy(tiny_step3p5_dir / "config.json", d)
        save_file(changed, str(d / "model.safetensors"))
        return load_model(d, config, torch.float32, "cpu")

    without = {k: v for k, v in tensors.items() if k != "model.layers.5.eh_proj.weight"}
    with pytest.raises(ValueError, match="mtp_layers.0.eh_proj.weight"):
        load(without)
    bad = dict(tensors, **{"model.layers.3.moe.up_proj.weight": tensors["model.layers.3.moe.up_proj.weight"][:7]})
    with pytest.raises(ValueError, match="model.layers.3.moe.up_proj.weight"):
        load(bad)


def test_router_bias_stays_float32_in_a_bfloat16_model(tiny_step3p5_dir):
    from safetensors import safe_open
    from transformers import AutoConfig

    from ember.engine.model_runner import load_model
    model, _ = load_model(tiny_step3p5_dir, AutoConfig.from_pretrained(tiny_step3p5_dir), torch.bfloat16, "cpu")
    moe = model.model.layers[3].moe
    assert moe.gate.weight.dtype == moe.experts.w13.dtype == torch.bfloat16
    with safe_open(str(tiny_step3p5_dir / "model.safetensors"), "pt") as f:
        assert torch.equal(moe.router_bias, f.get_tensor("model.layers.3.moe.router_bias"))  # float32, unrounded


# ------------------------------------------------------------------------------ serving (acceptance 6)
@pytest.fixture(scope="module")
def server(tiny_step3p5_dir):
    with served(tiny_step3p5_dir, "--tool-call-parser step3p5 --reasoning-parser step3p5") as url:
        yield url


def test_served_with_its_parsers_gives_the_engines_tokens(server, engine):
    import openai
    engine.flush_cache()
    messages, tools = WEATHER_MESSAGES, WEATHER_TOOLS
    chat_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    want = engine.generate(input_ids=chat_ids, sampling_params=GREEDY)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="EMPTY", max_retries=0, timeout=300)
    r = client.chat.completions.create(model="default", messages=messages, tools=tools, temperature=0,
                                       max_tokens=GREEDY["max_new_tokens"], extra_body={"ignore_eos": True})
    msg = r.choices[0].message
    # the step3p5 reasoning parser: text up to `</think>` is reasoning (random weights never close it)
    text = (msg.model_extra.get("reasoning_content") or "") + (msg.content or "")
    assert r.usage.prompt_tokens == len(chat_ids)
    assert r.usage.completion_tokens == len(want["output_ids"])
    assert text == want["text"]
    assert not msg.tool_calls

    assert_native_generate_matches(server, engine, engine.tokenizer.encode(TEXT)[:40], GREEDY)
