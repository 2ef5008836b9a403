"""The Triton MoE runner (ember/layers/moe_triton.py) on CPU under Triton's interpreter: the block alignment, the
grouped GEMMs against the torch path of the same MoEExperts (every routing shape: one token, many tokens per
expert, experts nobody chose, experts held by another expert-parallel rank, Step-3.5's clamp, widths that are not
a multiple of a tile), the flag, and tiny MoE models in an engine on either runner giving the same tokens."""
import random

import pytest
import torch

from tests.triton_interpreter import interpreted

with interpreted():
    pytest.importorskip("triton", minversion="3.9")
    from ember.layers import moe_triton
    from ember.layers.moe_triton import align_blocks, block_rows, fused_experts

from ember.layers.moe import MoEExperts, route_sigmoid, route_softmax  # noqa: E402
from ember.layers.moe_runner import resolve_moe_runner  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpret")


def test_the_kernel_is_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(moe_triton._grouped_gemm_kernel, InterpretedFunction)


@pytest.mark.parametrize("T, k, E, block_m", [(1, 2, 8, 16), (5, 3, 8, 16), (200, 2, 4, 64), (3, 8, 64, 16)])
def test_blocks_hold_every_pair_once_each_block_one_expert(T, k, E, block_m):
    torch.manual_seed(T)
    ids = torch.stack([torch.randperm(E + 2)[:k] - 1 for _ in range(T)])  # -1 and E: held by other ranks
    sorted_ids, block_expert = align_blocks(ids, E, block_m)
    n = T * k
    assert sorted_ids.numel() == block_expert.numel() * block_m
    assert sorted_ids.numel() <= max(n * block_m, -(-(n + (E + 1) * (block_m - 1)) // block_m) * block_m)
    flat = ids.reshape(-1)
    held = [p for p in range(n) if 0 <= flat[p] < E]
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        pairs = [p for p in sorted_ids[b * block_m:(b + 1) * block_m].tolist() if p < n]
        if e == E:  # skipped: pairs not held here, or nothing
            assert all(not 0 <= flat[p] < E for p in pairs)
            continue
        assert pairs and all(flat[p] == e for p in pairs)
        assert pairs == sorted(pairs)  # tokens in order within an expert
        seen += pairs
    assert sorted(seen) == held  # every held pair once
    # at decode, one block per chosen expert (the unchosen get none)
    if T == 1:
        assert sum(e < E for e in block_expert.tolist()) == len(held)


def _layer(E, H, I, seed, **kw):
    torch.manual_seed(seed)
    layer = MoEExperts(E, H, I, **kw)
    with torch.no_grad():
        layer.w13.normal_(0, 0.2)
        layer.w2.normal_(0, 0.2)
    return layer


TOL = dict(atol=5e-6, rtol=0)  # float32, outputs up to ~12; measured max error 2.4e-6 (tl.dot's summation order)


@pytest.mark.parametrize("T", [1, 3, 37, 130])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_triton_experts_match_the_torch_path(T, router):
    E, H, I, k = 8, 80, 48, 3  # H, 2I: not multiples of the 64-wide tiles
    layer = _layer(E, H, I, T)
    x = torch.randn(T, H)
    logits = torch.randn(T, E)
    w, ids = route_softmax(logits, k, True) if router == "softmax" else route_sigmoid(logits, k, None)
    with torch.no_grad():
        ref = layer.routed(x, w, ids)
        out = fused_experts(layer, x, w, ids)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOL)


def test_swiglu_clamp_and_experts_held_elsewhere():
    """Step-3.5's clamp, and expert parallel: rank 1 of 2 holds experts 4-7; the torch path of that rank sums only
    them, and so must the kernels (ids of other ranks' experts fall outside [0, 4) after the offset)."""
    T, E, H, I, k = 21, 8, 32, 32, 2
    layer = _layer(E // 2, H, I, 5, swiglu_limit=0.3)
    layer.ep_size, layer.expert_offset = 2, E // 2
    x = torch.randn(T, H)
    w, ids = route_softmax(torch.randn(T, E), k, True)
    with torch.no_grad():
        ref = layer.routed(x, w, ids)
        layer.runner = "triton"
        out = layer.routed(x, w, ids)
    assert (ref == 0).all(dim=1).any()  # some tokens chose no expert of this rank
    torch.testing.assert_close(out, ref, **TOL)


def test_half_precision():
    """float16 weights and activations (the GPU's kind; the interpreter cannot do bfloat16 dots): float32
    accumulation, output in x's dtype. Outputs reach ~9, where one fp16 step is 0.0078: measured max error against
    the float32 path on the same fp16 values 4.5e-3 (6 seeds), about the output's own rounding."""
    T, E, H, I, k = 9, 8, 64, 32, 2
    layer = _layer(E, H, I, 7)
    x = torch.randn(T, H)
    w, ids = route_softmax(torch.randn(T, E), k, True)
    with torch.no_grad():
        layer.w13.data, layer.w2.data = layer.w13.half().float(), layer.w2.half().float()
        ref = layer.routed(x.half().float(), w, ids)
        layer.w13.data, layer.w2.data = layer.w13.half(), layer.w2.half()
        out = fused_experts(layer, x.half(), w, ids)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=8e-3, rtol=0)


def test_block_rows():
    assert block_rows(2, 8) == 16  # decode: one small block per chosen expert
    assert block_rows(64 * 2, 8) == 16
    assert block_rows(4096 * 8, 64) == 64


def test_runner_choice(monkeypatch):
    assert resolve_moe_runner(None, "cuda") == resolve_moe_runner("auto", "cuda") == "torch"  # opt-in for now
    assert resolve_moe_runner("triton", "cpu") == "triton"  # under TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="quantization w4a8"):
        resolve_moe_runner("triton", "cpu", "w4a8")
    with pytest.raises(ValueError, match="not one of"):
        resolve_moe_runner("cutlass", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="triton runs on CUDA; on cpu only under TRITON_INTERPRET=1"):
        resolve_moe_runner("triton", "cpu")
    from ember.server_args import check_server_args, parse_serve_args
    args, given = parse_serve_args(["--moe-runner-backend", "triton", "--device", "cpu"])
    assert any("--moe-runner-backend triton runs on CUDA" in e for e in check_server_args(args, given))


@pytest.mark.parametrize("kind", ["qwen3_moe", "step3p5"])
def test_engine_on_the_triton_moe_runner_gives_the_torch_runners_tokens(kind, tmp_path_factory, monkeypatch):
    """Tiny Qwen3-MoE (softmax router) and Step-3.5 (sigmoid router, clamp, shared expert) in an engine: batched
    prompts, chunked prefill, a prefix-cache hit, decode at batch 1 and 3."""
    from ember import Engine
    from tests.tiny_models import tiny_model
    path = tiny_model(kind, tmp_path_factory.mktemp("tiny") / kind)
    rng = random.Random(4)
    base = [rng.randint(3, 200) for _ in range(20)]
    prompts = [base, [rng.randint(3, 200) for _ in range(5)], base + [rng.randint(3, 200) for _ in range(7)]]
    sampling = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    calls = []

    def counted(*args):
        calls.append(args[1].shape[0])
        return fused_experts(*args)
    monkeypatch.setattr(moe_triton, "fused_experts", counted)  # (the layer looks it up at each call)
    outputs = {}
    for runner in ("torch", "triton"):
        engine = Engine(model_path=str(path), dtype="float32", device="cpu", moe_runner_backend=runner,
                        page_size=4, chunked_prefill_size=16, max_total_tokens=512)
        assert engine.core.runner.moe_runner == runner
        first = engine.generate(input_ids=prompts[0], sampling_params=sampling)["output_ids"]
        rest = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sampling)]
        outputs[runner] = [first] + rest
        del engine
        assert bool(calls) == (runner == "triton")
    assert 1 in calls and max(calls) > 1  # decode at batch 1 and prefill chunks ran on the kernels
    assert outputs["triton"] == outputs["torch"]
