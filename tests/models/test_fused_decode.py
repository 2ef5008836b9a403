"""The fused C++ decode step (w4a8, Llama family) against the torch path it replaces, on real weights."""
import pytest
import torch

from ember.layers.fused_decode import FusedDecoder

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a land far away, there lived a"]


def _decode_steps_both_ways(engine, check_rows_alone: bool = False):
    """Generate greedily with the fused path; at every decode step also run the torch path on the same batch
    (first, so the fused step's own K/V are the ones that stay in the cache). Returns per step (mean KL,
    top-1 agreement, relative error of the centred logits)."""
    runner = engine.core.runner
    fused = runner.fused_decoder
    assert isinstance(fused, FusedDecoder)
    stats, alone_checked = [], 0
    original = runner._logits

    def both(batch):
        nonlocal alone_checked
        if not fused.applies_to(batch):
            return original(batch)
        with torch.inference_mode():
            ref = runner.model(batch)
            got = original(batch)
            if check_rows_alone and batch.attn["full"].batch_size > 1:
                assert _rows_alone_equal(fused, batch)
                alone_checked += 1
        kl = torch.nn.functional.kl_div(torch.log_softmax(got, -1), torch.log_softmax(ref, -1), log_target=True,
                                        reduction="none").sum(-1)
        centred = ref - ref.mean(-1, keepdim=True)
        stats.append((kl.mean().item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      ((got - ref).norm() / centred.norm()).item()))
        return got

    runner._logits = both
    try:
        engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    finally:
        runner._logits = original
    assert len(stats) >= 20, "the fused path did not run"
    if check_rows_alone:
        assert alone_checked >= 20
    return stats


def _rows_alone_equal(fused, batch) -> bool:
    """Each row of a batched fused step equals the same row run alone (a request's result does not depend on
    what it is batched with); rewriting a row's K/V writes the same values."""
    meta = batch.attn["full"]
    x = fused.embed(batch.input_ids)
    together = fused.stack.forward(x, batch.positions, meta.write_slots, meta.kv_slots, meta.kv_lens)
    for i in range(meta.batch_size):
        n = int(meta.kv_lens[i])
        alone = fused.stack.forward(x[i:i + 1], batch.positions[i:i + 1], meta.write_slots[i:i + 1],
                                    meta.kv_slots[i:i + 1, :n].contiguous(), meta.kv_lens[i:i + 1])
        if not torch.equal(alone[0], together[i]):
            return False
    return True


def test_fused_decode_matches_the_torch_path_on_smollm2(engine_for):
    """Same layers, other float rounding: the int8 activation groups turn rounding-level differences into
    KL ~0.003 per step here, which is what a 1e-6 relative nudge of the embeddings gives the torch path too."""
    stats = _decode_steps_both_ways(engine_for("smollm2", quantization="w4a8"), check_rows_alone=True)
    mean_kl = sum(s[0] for s in stats) / len(stats)
    top1 = sum(s[1] for s in stats) / len(stats)
    assert mean_kl < 0.02 and max(s[0] for s in stats) < 0.1 and top1 > 0.95, (mean_kl, top1)


def _randomize_(tensors, mean: float, std: float) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for t in tensors:
            t.normal_(mean, std)  # in place: the fused step shares these tensors with the torch modules


def test_fused_decode_with_qkv_bias(engine_for):
    """Qwen2's q/k/v biases, on a tiny random Qwen2 (head_dim 16) whose biases are made non-zero (transformers
    initialises them to zero). Its activations are small and smooth, so both paths agree to float rounding."""
    engine = engine_for("tiny-qwen2", quantization="w4a8")
    _randomize_([layer.self_attn.qkv_proj.bias for layer in engine.core.runner.model.model.layers], 0, 0.5)
    stats = _decode_steps_both_ways(engine)
    assert max(s[2] for s in stats) < 1e-4, stats


def test_fused_decode_with_qk_norms(engine_for):
    """Qwen3's per-head RMSNorm of q and k, with weights made other than ones (their initial value)."""
    engine = engine_for("tiny-qwen3", quantization="w4a8")
    _randomize_([n.weight for layer in engine.core.runner.model.model.layers
                 for n in (layer.self_attn.q_norm, layer.self_attn.k_norm)], 1, 0.3)
    stats = _decode_steps_both_ways(engine)
    assert max(s[2] for s in stats) < 1e-4, stats


def test_fused_decode_only_where_it_applies(engine_for):
    assert engine_for("smollm2", quantization="w4a8", disable_fused_decode=True).core.runner.fused_decoder is None
    assert engine_for("tiny-gemma3", quantization="w4a8").core.runner.fused_decoder is None  # sliding windows
    assert engine_for("smollm2").core.runner.fused_decoder is None  # exact fp32 weights


def test_fused_decode_rejects_bad_metadata(engine_for):
    fused = engine_for("smollm2", quantization="w4a8").core.runner.fused_decoder
    hidden = fused.embed.weight.shape[1]
    x = torch.zeros(1, hidden)
    one = torch.tensor([1])
    with pytest.raises(RuntimeError, match="KV slot"):
        fused.stack.forward(x, one, torch.tensor([10**9]), torch.tensor([[1]]), one)
    with pytest.raises(RuntimeError, match="rotary"):
        fused.stack.forward(x, torch.tensor([10**9]), one, torch.tensor([[1]]), one)
    with pytest.raises(RuntimeError, match="KV slot or length"):
        fused.stack.forward(x, one, one, torch.tensor([[1]]), torch.tensor([2]))
