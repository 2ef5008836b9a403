"""Acceptance: ember's logits and greedy tokens match transformers on the same weights."""
import pytest
import torch

PROMPTS = {
    "smollm2": [{"role": "user", "content": "What is the capital of France?"}],
    "qwen2.5": [{"role": "user", "content": "Write a Python function that reverses a string."}],
    "gemma3": "The capital of France is",
    "tiny-qwen3": [{"role": "user", "content": "hello there, tiny model"}],
    "tiny-llama": "random weights, llama layout",
    "tiny-qwen2": "random weights, qwen2 layout with q/k/v biases",
    "tiny-gemma3": "random weights, gemma3 layout: a prompt much longer than its 16-token window " * 2,
    "tiny-qwen3-moe": [{"role": "user", "content": "random weights, 8 experts, top-2 softmax routing"}],
    "tiny-minimax-m2": [{"role": "user", "content": "random weights, sigmoid routing with a bias, partial rotary"}],
    "tiny-glm4-moe-lite": [{"role": "user", "content": "random weights: latent attention, grouped routing, yarn"}],
    "tiny-step3p5": [{"role": "user", "content": "random weights: 3 sliding-window layers to 1 full, 8 experts"}],
}
LOGIT_TOL = 2e-3  # fp32: kernels differ in summation order only


def prompt_ids(tokenizer, prompt):
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)


def reference_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def assert_same_greedy(ours, theirs, ref, prompt):
    """Identical, except that at the first difference the reference's top-2 logits may tie (< 1e-4)."""
    if ours == theirs:
        return
    i = next(k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b) if any(
        a != b for a, b in zip(ours, theirs)) else min(len(ours), len(theirs))
    logits = reference_logits(ref, prompt + theirs[:i])[-1]
    top2 = logits.topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < 1e-4, f"greedy tokens differ at position {i} and the reference is not tied there (gap {gap:.2e})"


def hf_greedy(ref, ids, n):
    """n argmax tokens from transformers, never stopping at EOS (like ignore_eos)."""
    out_ids = []
    with torch.no_grad():
        out = ref(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            out_ids.append(tok)
            out = ref(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return out_ids


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_and_32_greedy_tokens_match(name, engine_for, reference_for):
    engine, ref = engine_for(name), reference_for(name)
    ids = prompt_ids(engine.tokenizer, PROMPTS[name])
    # prefill logits at every prompt position
    ours = engine.core.prompt_logits(ids).cpu()
    theirs = reference_logits(ref, ids)
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < LOGIT_TOL * max(1.0, theirs.abs().max().item() / 10), f"max abs logit diff {diff}"
    # 32 greedy tokens through the scheduler
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 32, "temperature": 0, "ignore_eos": True})
    assert len(out["output_ids"]) == 32
    assert_same_greedy(out["output_ids"], hf_greedy(ref, ids, 32), ref, ids)


def test_gemma3_sliding_window_beyond_the_window(engine_for, reference_for):
    """A prompt longer than the 512-token window, prefilled in chunks so out-of-window pages are released."""
    engine = engine_for("gemma3", chunked_prefill_size=128)
    ref = reference_for("gemma3")
    assert engine.core.runner.window == 512
    words = ("The history of the city goes back many centuries, with markets, bridges, rivers and "
             "churches built by generations of people who lived there. ")
    ids = engine.tokenizer.encode(words * 30)[:700]
    assert len(ids) > 600
    theirs = reference_logits(ref, ids)
    ours = engine.core.prompt_logits(ids).cpu()
    assert (ours[-1] - theirs[-1]).abs().max().item() < 2e-2
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 16, "temperature": 0, "ignore_eos": True})
    assert_same_greedy(out["output_ids"], hf_greedy(ref, ids, 16), ref, ids)
    # every sliding-window page is returned or kept by the prefix cache (the bound on what a request holds is
    # unit-tested in test_scheduler)
    pools = engine.core.stats()["pools"]
    assert pools["swa"]["free"] + pools["swa"]["cached"] == pools["swa"]["total"]


def test_tiny_gemma3_window_with_small_chunks(engine_for, reference_for):
    """Window 16, prefill chunks of 8 and a long decode: out-of-window pages are released as we go."""
    engine = engine_for("tiny-gemma3", chunked_prefill_size=8, page_size=4)
    ref = reference_for("tiny-gemma3")
    ids = engine.tokenizer.encode("sliding windows forget what is far behind them. " * 2)
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 40, "temperature": 0, "ignore_eos": True})
    assert_same_greedy(out["output_ids"], hf_greedy(ref, ids, 40), ref, ids)
    pools = engine.core.stats()["pools"]
    assert pools["swa"]["free"] + pools["swa"]["cached"] == pools["swa"]["total"]
