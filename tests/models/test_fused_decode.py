"""The fused C++ decode step (w4a8, Llama family) against the torch path it replaces, on real weights."""
import pytest
import torch

from ember import kernels
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
        if not batch.fused:
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
    what it is batched with, nor a verify's token on the drafts after it); rewriting a row's K/V writes the same
    values."""
    write_slots = batch.attn["full"].write_slots
    kv_slots, kv_lens = fused.row_slots(batch)
    x = fused.embed(batch.input_ids)
    together = fused.stack.forward(x, batch.positions, write_slots, kv_slots, kv_lens)
    for i in range(x.shape[0]):
        n = int(kv_lens[i])
        alone = fused.stack.forward(x[i:i + 1], batch.positions[i:i + 1], write_slots[i:i + 1],
                                    kv_slots[i:i + 1, :n].contiguous(), kv_lens[i:i + 1])
        if not torch.equal(alone[0], together[i]):
            return False
    return True


def test_fused_decode_matches_the_torch_path_on_smollm2(engine_for):
    """Same layers, other float rounding: the int8 activation groups turn rounding-level differences into
    KL ~0.003 per step here, which is what a 1e-6 relative nudge of the embeddings gives the torch path too."""
    stats = _decode_steps_both_ways(engine_for("smollm2", quantization="w4a8"), check_rows_alone=True)
    mean_kl = sum(s[0] for s in stats) / len(stats)
    top1 = sum(s[1] for s in stats) / len(stats)
    assert mean_kl < 0.005 and max(s[0] for s in stats) < 0.015 and top1 > 0.95, (mean_kl, top1)  # measured: 0.0025 / 0.0074 / 0.986


def test_fused_decode_on_the_avx2_kernels(engine_for, smollm2_dir):
    """The AVX2 build (a CPU without AVX-512 runs it; here forced on any AVX2 machine): its fused step (AVX2
    exp, dot, axpy, SiLU around the AVX2 group GEMM) against its own torch path, rows alone as in a batch."""
    from ember import Engine

    if "avx2" not in kernels.supported_variants():
        pytest.skip("needs a CPU with AVX2")
    with kernels.forced_variant("avx2"):
        engine = Engine(model_path=str(smollm2_dir), quantization="w4a8", dtype="float32", device="cpu",
                        cpu_kv_cache_gb=0.25)
    fused = engine.core.runner.fused_decoder
    assert fused is not None and fused.kernel_ns == kernels.load_variant("avx2")
    stats = _decode_steps_both_ways(engine, check_rows_alone=True)
    mean_kl = sum(s[0] for s in stats) / len(stats)
    top1 = sum(s[1] for s in stats) / len(stats)
    assert mean_kl < 0.005 and max(s[0] for s in stats) < 0.015 and top1 > 0.95, (mean_kl, top1)  # measured: 0.0025 / 0.0074 / 0.986


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
    hidden = fused.embed.embedding_dim
    x = torch.zeros(1, hidden)
    one = torch.tensor([1])
    with pytest.raises(RuntimeError, match="KV slot"):
        fused.stack.forward(x, one, torch.tensor([10**9]), torch.tensor([[1]]), one)
    with pytest.raises(RuntimeError, match="rotary"):
        fused.stack.forward(x, torch.tensor([10**9]), one, torch.tensor([[1]]), one)
    with pytest.raises(RuntimeError, match="KV slot or length"):
        fused.stack.forward(x, one, one, torch.tensor([[1]]), torch.tensor([2]))


def test_a_request_decoding_beside_a_prefill_gets_its_solo_tokens(engine_for):
    """Requests arriving while others decode make steps that mix one-token rows with prefill chunks: the one-token
    rows still take the fused step (the torch path rounds differently), so a request's greedy tokens do not
    depend on what arrived beside it (the default server runs w4a8 for the bundled GGUFs: a concurrent chat
    request once changed another's words). Every step here is checked to have been mixed at least once."""
    from ember.engine.io_struct import GenerateReq
    from ember.engine.sampling_params import SamplingParams

    engine = engine_for("smollm2", quantization="w4a8", chunked_prefill_size=32)
    greedy = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    long_prompt = " ".join(["a long story about the sea and the ships that sail on it"] * 12)
    prompts = [PROMPTS[0], long_prompt, PROMPTS[2], long_prompt + " again"]
    solo = [engine.generate(p, greedy)["output_ids"] for p in prompts]
    engine.flush_cache()
    core, runner = engine.core, engine.core.runner
    mixed, original = [], runner.forward

    def spy(reqs, extend_lens, *a, **kw):
        if 1 in extend_lens and max(extend_lens) > 1:
            mixed.append(list(extend_lens))
        return original(reqs, extend_lens, *a, **kw)

    runner.forward = spy
    outputs, steps = {i: [] for i in range(len(prompts))}, 0
    try:
        core.add_request(GenerateReq("0", engine.tokenizer.encode(prompts[0]), SamplingParams(**greedy)))
        while core.has_work():
            for out in core.step():
                outputs[int(out.rid)] += out.new_token_ids
            steps += 1
            if steps in (3, 6, 9):  # each arrives while the earlier ones decode
                i = steps // 3
                core.add_request(GenerateReq(str(i), engine.tokenizer.encode(prompts[i]), SamplingParams(**greedy)))
    finally:
        runner.forward = original
    assert mixed, "no step mixed decode rows with a prefill chunk"
    for i in range(len(prompts)):
        assert outputs[i] == solo[i], f"request {i} changed beside a prefill"


def test_verify_rows_share_their_keys_and_each_equals_the_row_alone(engine_for):
    """A speculative verify runs several new tokens of one request in the fused step; its attention reads the
    request's keys and values once per kv head for all of them (and all of that head's query heads). Each row must
    still equal the same row run alone, bit for bit: two requests' verifies in one batch, and with the query heads
    split over more threads than there are kv heads."""
    from ember.speculative.draft_model import _DraftReq

    engine = engine_for("smollm2", quantization="w4a8")
    runner, fused = engine.core.runner, engine.core.runner.fused_decoder
    allocators, page = runner.kv_cache.allocators, runner.kv_cache.page_size
    reqs, rows = [], (4, 5)
    for prompt, n in zip(PROMPTS[1:], rows):
        ids = engine.tokenizer.encode(prompt * 3)
        tables = {g: a.alloc(-(-(len(ids) + n) // page)) for g, a in allocators.items()}
        reqs.append(_DraftReq(ids[:-n], 0, tables))
        with torch.inference_mode():
            runner.forward([reqs[-1]], [len(ids) - n])  # the prefix's K/V
        reqs[-1].kv_len, reqs[-1].token_ids = len(ids) - n, ids  # then n new tokens, as drafts ride in a verify
    try:
        batch = runner.build_batch(reqs, list(rows))
        kv_slots, kv_lens = fused.row_slots(batch)
        assert fused.applies_to(batch) and kv_slots.shape[0] == sum(rows)
        with torch.inference_mode():
            assert _rows_alone_equal(fused, batch)
            x, outs = fused.embed(batch.input_ids), []
            threads = torch.get_num_threads()
            for t in (1, 6):  # 6 threads: the 3 query heads of each kv head (SmolLM2: 9 of 3) split into 2 tasks
                torch.set_num_threads(t)
                try:
                    outs.append(fused.stack.forward(x, batch.positions, batch.attn["full"].write_slots, kv_slots,
                                                    kv_lens))
                finally:
                    torch.set_num_threads(threads)
        assert torch.equal(outs[0], outs[1])
    finally:
        for r in reqs:
            for g, table in r.page_tables.items():
                allocators[g].free(table)
