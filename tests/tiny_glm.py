"""A tiny random GLM-4.7-Flash (glm4_moe_lite) checkpoint in the hub's layout, with a GLM-style tokenizer.

transformers' Glm4MoeLiteForCausalLM has no nextn (MTP) layer, so save_pretrained writes none; the hub
checkpoint has one (`model.layers.{num_hidden_layers}.*`: a full MoE decoder layer plus enorm / hnorm / eh_proj /
shared_head.norm / shared_head.head / embed_tokens), so we add it to the saved safetensors the way the hub has it.
"""
from __future__ import annotations

import pathlib

import torch

GLM_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "<tool_response>", "</tool_response>"]

# GLM-4.7's turn layout (simplified): tools listed in the system turn, the assistant turn opens a thinking block
# (or closes it at once with enable_thinking=False), tool calls as <tool_call>name<arg_key>k</arg_key>...
GLM_TEMPLATE = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|observation|><tool_response>{{ m['content'] }}</tool_response>"
    "{% elif m['role'] == 'assistant' %}<|assistant|></think>{{ m['content'] or '' }}"
    "{% for tc in m.get('tool_calls') or [] %}<tool_call>{{ tc['function']['name'] }}"
    "{% for k, v in (tc['function']['arguments'] | fromjson if tc['function']['arguments'] is string "
    "else tc['function']['arguments']).items() %}<arg_key>{{ k }}</arg_key><arg_value>{{ v }}</arg_value>"
    "{% endfor %}</tool_call>{% endfor %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}</think>{% else %}<think>{% endif %}{% endif %}")


def glm_tokenizer():
    """Byte-level BPE (no merges) with GLM's special tokens and a GLM-shaped chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in GLM_SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=GLM_SPECIALS[1:])
    fast.chat_template = GLM_TEMPLATE
    return fast


def _add_mtp_layer(path: pathlib.Path, model, cfg) -> None:
    """Write the nextn layer's tensors into model.safetensors under the hub's names (random, like the rest)."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    n = cfg.num_hidden_layers
    big = tf.Glm4MoeLiteConfig(**{**cfg.to_dict(), "num_hidden_layers": n + 1,
                                  "mlp_layer_types": list(cfg.mlp_layer_types) + ["sparse"]})
    layer = tf.models.glm4_moe_lite.modeling_glm4_moe_lite.Glm4MoeLiteDecoderLayer(big, n)
    H = cfg.hidden_size
    extra = {}
    for name, t in layer.state_dict().items():
        if name == "mlp.experts.gate_up_proj":  # hub layout: one tensor per expert and projection
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                extra[f"mlp.experts.{e}.gate_proj.weight"], extra[f"mlp.experts.{e}.up_proj.weight"] = gate, up
        elif name == "mlp.experts.down_proj":
            for e, w in enumerate(t):
                extra[f"mlp.experts.{e}.down_proj.weight"] = w
        else:
            extra[name] = t
    for name, t in extra.items():  # transformers leaves fresh layers' tensors uninitialised
        if t.dim() > 1:
            t.normal_(0, 0.02)
        elif "bias" in name:
            t.uniform_(-0.05, 0.05)
        else:
            t.fill_(1.0)
    extra.update({"enorm.weight": torch.ones(H), "hnorm.weight": torch.ones(H),
                  "eh_proj.weight": torch.randn(H, 2 * H) * 0.02, "shared_head.norm.weight": torch.ones(H),
                  "shared_head.head.weight": model.lm_head.weight.detach().clone(),
                  "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone()})
    file = path / "model.safetensors"
    state = load_file(str(file))
    state.update({f"model.layers.{n}.{k}": v.contiguous() for k, v in extra.items()})
    save_file(state, str(file), metadata={"format": "pt"})


def tiny_glm4_moe_lite(path: pathlib.Path, **overrides) -> pathlib.Path:
    """4 layers (layer 0 dense), 8 routed experts in 4 groups (best 2 groups kept), top-2, one shared expert,
    q_lora_rank set, YaRN with mscale_all_dim, interleaved rope, a random router bias, one nextn layer.
    `overrides`: config fields to change (e.g. q_lora_rank=None for a plain q_proj, rope_interleave=False)."""
    import transformers as tf
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    tok = glm_tokenizer()
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    cfg = tf.Glm4MoeLiteConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=1.8, norm_topk_prob=True, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], num_nextn_predict_layers=1,
        max_position_embeddings=1024, eos_token_id=eos, pad_token_id=eos[0], bos_token_id=None,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 256,
                         "beta_fast": 32, "beta_slow": 1})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = tf.Glm4MoeLiteForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            # attention scores of order one (at init std 0.02 they are ~0.1 and the softmax is nearly flat, so a
            # wrong softmax scale or rope layout would hide inside the logit tolerance)
            attn = layer.self_attn
            q = attn.q_b_proj if attn.q_lora_rank else attn.q_proj
            for w in (q.weight, attn.kv_b_proj.weight, attn.kv_a_proj_with_mqa.weight):
                w.normal_(0, 0.2)
        for layer in model.model.layers[1:]:  # a router bias large enough to change which experts are chosen
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if cfg.num_nextn_predict_layers:
        _add_mtp_layer(path, model, cfg)
    return path
