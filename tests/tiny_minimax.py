"""The tiny MiniMax-M2 checkpoint: transformers' MiniMaxM2ForCausalLM with random weights, saved in hub layout
(block_sparse_moe.experts.{e}.w1/w2/w3), with a byte-level tokenizer carrying MiniMax-M2's special tokens and a
chat template of the same shape as the hub's (role markers, `<think>` opened by the generation prompt, tools in
the system turn), so `--tool-call-parser minimax-m2 --reasoning-parser minimax-append-think` serve it as the
real model."""
from __future__ import annotations

import pathlib

import torch

# ]~!b[ begins the conversation, ]~b]ROLE begins a turn, [e~[ ends one (and is the end-of-sequence token)
SPECIALS = ["]~!b[", "]~b]", "[e~[", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"]
CHAT_TEMPLATE = (  # no whitespace control: every newline below is one the prompt has
    "]~!b[]~b]system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant."
    "{% endif %}"
    "{% if tools %}\n\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    "To call a tool: <minimax:tool_call>\n<invoke name=\"NAME\">\n<parameter name=\"KEY\">VALUE</parameter>\n"
    "</invoke>\n</minimax:tool_call>{% endif %}[e~[\n"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}]~b]user\n{{ m['content'] }}[e~[\n"
    "{% elif m['role'] == 'assistant' %}]~b]ai\n{{ m['content'] or '' }}[e~[\n"
    "{% elif m['role'] == 'tool' %}]~b]tool\n<response>{{ m['content'] }}</response>[e~[\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}]~b]ai\n<think>\n{% endif %}")


def minimax_tokenizer():
    from tests.tiny_models import byte_level_tokenizer

    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.eos_token = "[e~["
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_minimax_m2(path: pathlib.Path) -> pathlib.Path:
    """4 layers, 8 experts top-2, partial rotary (8 of 16 dims), a random router bias that changes the choice;
    weights of std 0.1 so logits span a few units (routing and quantization differences show)."""
    import transformers as tf

    from tests.tiny_models import COMMON
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    tok = minimax_tokenizer()
    cfg = tf.MiniMaxM2Config(**dict(COMMON, intermediate_size=32), vocab_size=len(tok), num_hidden_layers=4,
                             tie_word_embeddings=False, num_local_experts=8, num_experts_per_tok=2, rotary_dim=8,
                             bos_token_id=None, eos_token_id=tok.eos_token_id, initializer_range=0.1)
    model = tf.MiniMaxM2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.uniform_(-0.05, 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
