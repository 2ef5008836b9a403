"""Tiny random-weight checkpoints for architectures we have no real weights for, built with transformers'
own classes and saved as safetensors (the same layout a hub download has)."""
from __future__ import annotations

import pathlib

import torch


def byte_level_tokenizer():
    """A real (byte-level BPE, no merges) tokenizer with a ChatML template: encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=1024)


def tiny_model(kind: str, path: pathlib.Path) -> pathlib.Path:
    """kind: qwen3 | llama | qwen2 | gemma3 (window 16, 1 full : 2 sliding layers) | qwen3_moe | minimax_m2
    (MoE: 4 layers, 8 experts, top-2)."""
    import transformers as tf
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    tok = byte_level_tokenizer()
    common = dict(COMMON, vocab_size=len(tok), eos_token_id=tok.eos_token_id, num_hidden_layers=2,
                  tie_word_embeddings=False)
    if kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**dict(common, num_hidden_layers=3, tie_word_embeddings=True), sliding_window=16,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  query_pre_attn_scalar=16)
        model = tf.Gemma3ForCausalLM(cfg)
    elif kind == "qwen3_moe":  # 4 layers: MoE on 0, 2, 3 (stride 1), layer 1 dense via mlp_only_layers
        cfg = tf.Qwen3MoeConfig(**dict(common, num_hidden_layers=4), moe_intermediate_size=32, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                                initializer_range=0.1)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif kind == "minimax_m2":  # partial rotary, router bias, MiniMax's special tokens and template
        from tests.tiny_minimax import tiny_minimax_m2
        return tiny_minimax_m2(path)
    elif kind == "glm4_moe_lite":  # MLA + grouped sigmoid MoE + a nextn layer, GLM tokenizer (tests/tiny_glm.py)
        from tests.tiny_glm import tiny_glm4_moe_lite
        return tiny_glm4_moe_lite(path)
    elif kind == "step3p5":  # hub layout; window 16, 4 / 6 query heads, 8 experts top-3, an MTP layer
        from tests.step3p5_hub import build_tiny_step3p5
        return build_tiny_step3p5(path, tok)
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_qwen3(path: pathlib.Path) -> pathlib.Path:
    return tiny_model("qwen3", path)
