"""RMSNorm (alone, or after a residual add) and SiLU x up in one Triton kernel each (ember/layers/fused_triton.py),
under Triton's interpreter, against the layers' torch forms: per-head strided views (q / k norms), Gemma's
unit-offset weight, widths that are not powers of 2, float32 and float16; which layers use_triton_layers switches;
tiny engines give the same tokens with them."""
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config

from tests.triton_interpreter import interpreted

with interpreted():
    pytest.importorskip("triton", minversion="3.9")
    from ember.layers import fused_triton

from ember.layers.mlp import GatedMLP, gated_act  # noqa: E402
from ember.layers.norm import RMSNorm, ShardedRMSNorm  # noqa: E402
from ember.layers.rotary import RotaryEmbedding  # noqa: E402
from ember.layers.triton_layers import use_triton_layers  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpret")

# as measured: float32 differs in the last bits (summation order, exp), <= 1e-6 on the norm's values up to ~6 and
# 4e-6 on SiLU x up's up to ~80; float16 norms come out identical (the roundings are the torch form's), SiLU x up
# within one float16 step (exp's last bit in float32 can round the other way: 1 element of 5500)
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=0, rtol=1e-3)}


def test_the_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(fused_triton._rms_norm_kernel, InterpretedFunction)


@pytest.mark.parametrize("unit_offset", [False, True], ids=["plain", "unit_offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "heads"])
def test_rms_norm_matches_the_torch_form(unit_offset, dtype, layout):
    torch.manual_seed(0)
    T, H, D = 7, 3, 48
    norm = RMSNorm(D, 1e-6, unit_offset)
    norm.weight.data = (torch.randn(D) * 0.5 + (0 if unit_offset else 1)).to(dtype)
    if layout == "heads":  # q of one qkv projection as the attention layers pass it: [T, H, D], token stride 5 * D
        x = torch.randn(T, (H + 2) * D).mul(2).to(dtype)[:, :H * D].view(T, H, D)
        assert not x.is_contiguous()
    else:
        x = torch.randn(T, D).mul(2).to(dtype)
    want = norm(x)
    norm.fused = True
    got = norm(x)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **(TOL[dtype] if dtype == torch.float32 else dict(atol=0, rtol=0)))


@pytest.mark.parametrize("unit_offset", [False, True], ids=["plain", "unit_offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_then_rms_norm_matches_the_torch_form(unit_offset, dtype):
    """The residual add and the norm after it (a decoder layer's middle): the sum is the torch sum exactly, the norm
    as above."""
    torch.manual_seed(2)
    T, D = 6, 40
    norm = RMSNorm(D, 1e-6, unit_offset)
    norm.weight.data = (torch.randn(D) * 0.5 + (0 if unit_offset else 1)).to(dtype)
    x = torch.randn(T, 2 * D).mul(2).to(dtype)[:, :D]  # (a strided view: copied to contiguous first)
    delta = torch.randn(T, D).to(dtype)
    want_sum, want = norm.add_norm(x, delta)
    norm.fused = True
    got_sum, got = norm.add_norm(x, delta)
    assert torch.equal(got_sum, x + delta) and torch.equal(want_sum, x + delta)
    torch.testing.assert_close(got, want, **(TOL[dtype] if dtype == torch.float32 else dict(atol=0, rtol=0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("I", [40, 1100])  # one column block, and two with a ragged end
@pytest.mark.parametrize("limit", [None, 2.5])  # Step-3.5's clamp
def test_silu_and_mul_matches_the_torch_form(dtype, I, limit):
    torch.manual_seed(1)
    gate_up = torch.randn(5, 2 * I).mul(3).to(dtype)
    gate, up = gate_up.split(I, dim=-1)
    want = gated_act(F.silu, gate, up, limit)
    if limit is not None:
        assert not torch.equal(want, F.silu(gate) * up)
    got = fused_triton.silu_and_mul(gate_up, limit)
    assert got.shape == (5, I) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype == torch.float16:  # the same roundings: all but exp's rare last-bit flip (rounding once: ~30 % differ)
        assert (got != want).sum() <= 0.002 * got.numel()


def test_use_triton_layers_takes_the_layers_with_a_triton_form():
    from ember.models.qwen2_5_vl import MRotaryEmbedding
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    model = torch.nn.ModuleList([RotaryEmbedding(cfg, 16, 64), RMSNorm(8), GatedMLP(8, 16), GatedMLP(8, 16, "gelu"),
                                 ShardedRMSNorm(8, 0, 8), GatedMLP(8, 16, limit=7.0)])
    assert use_triton_layers(model) == {"rope": 1, "rms_norm": 1, "silu_and_mul": 2}
    assert [getattr(m, "fused", False) for m in model] == [True, True, True, False, False, True]
    assert MRotaryEmbedding.fused is False and RotaryEmbedding.fused is False and RMSNorm.fused is False


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])  # q/k norms on strided heads + SiLU; unit-offset norms + GELU
def test_tiny_engines_give_the_same_tokens_with_the_triton_layers(kind, tmp_path_factory):
    from ember import Engine
    from tests.tiny_models import tiny_model
    path = tiny_model(kind, tmp_path_factory.mktemp("tiny") / kind)
    rng = random.Random(3)
    prompts = [[rng.randint(3, 200) for _ in range(rng.randint(5, 20))] for _ in range(3)]
    sampling = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    engine = Engine(model_path=str(path), dtype="float32", device="cpu", attention_backend="triton", page_size=4,
                    max_total_tokens=512, context_length=100, disable_radix_cache=True)
    try:
        model = engine.core.runner.model
        want = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sampling)]
        logits = engine.core.prompt_logits(prompts[0] + want[0])
        switched = use_triton_layers(model)
        assert switched["rms_norm"] > 0 and switched["rope"] > 0
        assert (switched["silu_and_mul"] > 0) == (kind == "qwen3")
        got = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sampling)]
        assert got == want
        torch.testing.assert_close(engine.core.prompt_logits(prompts[0] + want[0]), logits, atol=2e-5, rtol=0)
    finally:
        for m in engine.core.runner.model.modules():
            m.__dict__.pop("fused", None)
        engine.shutdown()
