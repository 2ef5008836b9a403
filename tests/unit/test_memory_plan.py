"""The memory plan (ember/engine/memory_plan.py) from config.json alone: weight bytes and KV bytes per token per layer
group equal the numbers computed by hand from the config's formulas, for the real configs of Step-3.5-Flash,
GLM-4.7-Flash and MiniMax-M2 (tests/data/*/config.json) and for dense models; `ember serve --dry-run` prints it
without loading weights, and a started engine reports the same numbers."""
import json
import pathlib

import pytest

from ember.engine.memory_plan import plan_from_config
from ember.server_args import ServerArgs

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
BF16, FP32 = 2, 4
ARGS = dict(dtype="bfloat16", device="cpu", cpu_kv_cache_gb=64.0)


def step3p5_flash(c: dict) -> tuple[int, int, dict]:
    """(parameters without the MTP layers, weight bytes, KV bytes/token per group) of a hub step3p5 config."""
    V, H, D, kv, L, K = c["vocab_size"], c["hidden_size"], c["head_dim"], c["num_attention_groups"], \
        c["num_hidden_layers"], c["num_nextn_predict_layers"]
    E, I, Im, Is = c["moe_num_experts"], c["intermediate_size"], c["moe_intermediate_size"], c["share_expert_dim"]
    heads = {"full_attention": c["num_attention_heads"],
             "sliding_attention": c["attention_other_setting"]["num_attention_heads"]}
    moe = {int(i) for i in c["moe_layers_enum"].split(",")}

    def layer(i):
        h = heads[c["layer_types"][i]]
        attn = H * h * D + 2 * H * kv * D + h * D * H + H * h + 2 * D  # q, k, v, o, head-wise gate, q/k norms
        mlp = E * 3 * H * Im + E * H + E + 3 * H * Is if i in moe else 3 * H * I  # experts, router (+bias), shared
        return attn + mlp + 2 * H
    main = 2 * V * H + H + sum(layer(i) for i in range(L))  # embedding, lm_head (untied), final norm
    mtp = sum(layer(L + j) + 2 * H + 2 * H * H + H + V * H for j in range(K))  # e/h norms, eh_proj, shared head
    fp32_router_bias = len(moe) * E * (FP32 - BF16)  # kept in float32, as the hub stores it
    per_layer_kv = kv * 2 * D * BF16
    types = c["layer_types"][:L]
    kv_bytes = {"full": types.count("full_attention") * per_layer_kv, "swa": types.count("sliding_attention") * per_layer_kv}
    return main, (main + mtp) * BF16 + fp32_router_bias, kv_bytes


def glm47_flash(c: dict) -> tuple[int, int, dict]:
    V, H, L, K, nh = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_nextn_predict_layers"], \
        c["num_attention_heads"]
    qr, kvr, nope, rope, vd = c["q_lora_rank"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], \
        c["v_head_dim"]
    E, I, Im, S = c["n_routed_experts"], c["intermediate_size"], c["moe_intermediate_size"], c["n_shared_experts"]

    def layer(i):
        attn = (H * qr + qr + qr * nh * (nope + rope)  # q_a_proj, q_a_layernorm, q_b_proj
                + H * (kvr + rope) + kvr + kvr * nh * (nope + vd)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
                + nh * vd * H)  # o_proj
        dense = i < c["first_k_dense_replace"]
        mlp = 3 * H * I if dense else E * 3 * H * Im + S * 3 * H * Im + E * H + E  # experts, shared, router (+bias)
        return attn + mlp + 2 * H
    main = 2 * V * H + H + sum(layer(i) for i in range(L))
    # the nextn layer: its decoder layer, enorm/hnorm, eh_proj, shared_head.norm (its embed/head copies equal the
    # main model's: not kept)
    mtp = sum(layer(L + j) + 2 * H + 2 * H * H + H for j in range(K))
    return main, (main + mtp) * BF16, {"full": L * (kvr + rope) * BF16}  # MLA: latent + rope key, no value


def minimax_m2(c: dict) -> tuple[int, int, dict]:
    V, H, L, D, nh, kv = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["head_dim"], \
        c["num_attention_heads"], c["num_key_value_heads"]
    E, I = c["num_local_experts"], c["intermediate_size"]
    attn = H * nh * D + 2 * H * kv * D + nh * D * H + nh * D + kv * D  # q, k, v, o; q/k norms over the projection
    moe = E * 3 * H * I + E * H + E  # experts, router, routing bias
    main = 2 * V * H + H + L * (attn + moe + 2 * H)
    return main, main * BF16, {"full": L * kv * 2 * D * BF16}


# (test data directory, hand formula, the model card's total parameters in billions)
REAL = {"step3p5_flash": (step3p5_flash, 196), "glm47_flash": (glm47_flash, 30), "minimax_m2": (minimax_m2, 230)}


@pytest.mark.parametrize("name", list(REAL))
def test_plan_of_real_configs_equals_the_hand_computed_bytes(name):
    formula, card_billions = REAL[name]
    config = json.loads((DATA / name / "config.json").read_text())
    params, weight, kv = formula(config)
    assert abs(params / 1e9 - card_billions) / card_billions < 0.02  # the published size (main model)
    plan = plan_from_config(DATA / name, ServerArgs(**ARGS))
    assert plan.weight_bytes == weight
    assert plan.kv_bytes_per_token == kv
    budget = 64 * 2**30
    assert plan.kv_budget_bytes == budget
    if "swa" in kv:  # the window + one chunk (+ 2 pages) per running request; the full layers get the rest
        a = ServerArgs(**ARGS)
        swa = a.max_running_requests * (config["sliding_window"] + a.chunked_prefill_size + 2 * a.page_size)
        assert plan.kv_tokens == {"swa": swa, "full": (budget - swa * kv["swa"]) // kv["full"]}
    else:
        assert plan.kv_tokens == {"full": budget // kv["full"]}


def test_plan_of_dense_models_counts_what_transformers_builds(tmp_path):
    """Gemma 3 (tied embeddings, 5 sliding : 1 full layers) and Llama shapes in float32, against the parameter count
    of transformers' own model and the KV formula."""
    import torch
    import transformers as tf
    common = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    configs = {
        "llama": (tf.LlamaConfig(**common, num_hidden_layers=3, architectures=["LlamaForCausalLM"]),
                  tf.LlamaForCausalLM, {"full": 3 * 2 * 2 * 16 * FP32}),
        "gemma3": (tf.Gemma3TextConfig(**common, num_hidden_layers=6, sliding_window=32,
                                       architectures=["Gemma3ForCausalLM"]),
                   tf.Gemma3ForCausalLM, {"full": 1 * 2 * 2 * 16 * FP32, "swa": 5 * 2 * 2 * 16 * FP32}),
    }
    for name, (config, cls, kv) in configs.items():
        config.save_pretrained(tmp_path / name)
        with torch.device("meta"):
            reference = cls(config)
        params = sum(p.numel() for p in reference.parameters())  # (tied weights once)
        plan = plan_from_config(tmp_path / name, ServerArgs(dtype="float32", device="cpu", cpu_kv_cache_gb=0.01))
        assert plan.num_params == params, name
        assert plan.weight_bytes == params * FP32, name
        assert plan.kv_bytes_per_token == kv, name
        assert plan.sliding_window == (32 if name == "gemma3" else None)


def test_dry_run_prints_the_plan_and_loads_nothing(capsys):
    from ember.cli import main
    rc = main(["serve", "--model-path", str(DATA / "minimax_m2"), "--dry-run", "--dtype", "bfloat16",
               "--device", "cpu", "--cpu-kv-cache-gb", "64"])  # the directory holds no weights at all
    out = capsys.readouterr().out
    assert rc == 0
    _, weight, kv = minimax_m2(json.loads((DATA / "minimax_m2" / "config.json").read_text()))
    assert f"({weight} bytes)" in out
    assert f"{kv['full']} bytes/token" in out
    assert f"tokens that fit: {64 * 2**30 // kv['full']}" in out


def test_a_started_engine_reports_the_dry_run_numbers(tmp_path):
    from ember import Engine
    from tests.tiny_models import tiny_model
    path = tiny_model("gemma3", tmp_path / "gemma3")
    args = dict(dtype="float32", device="cpu", cpu_kv_cache_gb=0.01, max_running_requests=4)
    engine = Engine(model_path=str(path), **args)
    planned = plan_from_config(path, ServerArgs(model_path=str(path), **args)).to_dict()
    served = engine.core.stats()["memory_plan"]
    assert served == planned
    pools = engine.core.stats()["pools"]
    for g, tokens in served["kv_tokens"].items():  # the pools hold what the plan says (+ the padding page)
        assert pools[g]["total"] == tokens // served["page_size"]
