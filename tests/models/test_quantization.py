"""--quantization int8|int4|w8a8_int8: the CPU kernels stay within a stated tolerance of the exact fp32 path."""
import os

import pytest
import torch

from ember import kernels
from ember.layers.quantization import GroupQuantLinear, Int4Linear, Int8Linear, W8A8Linear

# Stated tolerances (SmolLM2-135M, a chat prompt; fp32 is the reference):
#   mean KL(fp32 || quantized) per prompt position, and top-1 agreement of the next-token prediction.
# (w8a8_int8 is looser on SmolLM2 than on Qwen2.5-Coder-0.5B, where its KL is 0.010 against int4's 0.037:
# SmolLM2's activations have outlier channels that per-token int8 flattens.)
# Measured here (AMD EPYC Zen 5, 2026-12-04): int8 0.011 / 0.946, int4 0.055 / 0.865, w8a8_int8 0.115 / 0.838
# (fbgemm with VNNI; 0.006 / 0.973 on the AVX2 group kernel), w4a8 0.066 / 0.865 (both kernel variants); the
# tolerances are ~1.5x those KLs and one position of top-1 below.
TOLERANCE = {"int8": (0.017, 0.92), "int4": (0.085, 0.83), "w8a8_int8": (0.15, 0.8), "w4a8": (0.1, 0.83)}


def test_quantized_linear_layers_approximate_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384, bias=True)
    x = torch.randn(7, 256)
    ref = lin(x)
    for make, tol in ((Int8Linear, 0.01), (Int4Linear, 0.1), (W8A8Linear, 0.02),
                      (lambda m: GroupQuantLinear(m, 4), 0.1), (lambda m: GroupQuantLinear(m, 8), 0.015)):
        rel = ((make(lin)(x) - ref).norm() / ref.norm()).item()
        assert rel < tol, (make, rel)


def _unpack_codes(layer: GroupQuantLinear) -> torch.Tensor:
    """The layer's codes back as q [N, K], read from the kernel's tile layout (vnni_gemm.cpp's header)."""
    return layer.codes()[0].reshape(layer.out_features, -1).long()


@pytest.mark.parametrize("bits", [4, 8])
def test_group_gemm_kernel_matches_its_math(bits):
    """The C++ kernel computes exactly y = sum_g dw*xd*(q.a) + mw*xd*sum(a) (float64 here), on shapes with
    a partial tile, one group, many groups, and batches that are not a multiple of the 4-row pass."""
    torch.manual_seed(bits)
    for n, k, m in ((40, 64, 1), (48, 96, 5), (1152, 896, 3), (200, 1536, 9)):
        lin = torch.nn.Linear(k, n, bias=False)
        layer = GroupQuantLinear(lin, bits)
        x = torch.randn(m, k) * torch.logspace(-1, 1, m)[:, None]
        q = _unpack_codes(layer).double().view(n, k // 32, 32)
        dw = layer.dw.double().transpose(1, 2).reshape(-1, k // 32)[:n]
        mw = layer.mw.double().transpose(1, 2).reshape(-1, k // 32)[:n]
        xg = x.view(m, k // 32, 32)
        xd = xg.abs().amax(-1) / 127
        a = torch.round(xg * torch.where(xd > 0, 1 / xd, 0.0)[..., None]).double()
        xd = xd.double()
        ref = (torch.einsum("ngk,mgk->mng", q, a) * dw * xd[:, None] + mw * (xd * a.sum(-1))[:, None]).sum(-1)
        got = layer(x).double()
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5, (n, k, m)
        w = (dw[..., None] * q + mw[..., None]).float().view(n, k)  # the codes dequantized: close to the weights
        assert ((w - lin.weight).norm() / lin.weight.norm()).item() < (0.1 if bits == 4 else 0.005)


@pytest.mark.parametrize("levels", [15, 255])
def test_cpp_group_fit_is_the_torch_fit(levels):
    """The quantizer's per-group fit in C++ (ember/kernels/group_fit.cpp) runs the torch version's algorithm: the same
    codes, scales and offsets for all but near-tied groups (their sums run in another order), and the same total
    error; constant groups (d = 0) included."""
    from ember.layers.quantization import _fit_groups, _fit_groups_torch
    torch.manual_seed(levels)
    g = torch.randn(4000, 28, 32) * torch.rand(4000, 28, 1)
    g[0, 0] = 0.5  # a constant group
    ours, ref = _fit_groups(g, levels), _fit_groups_torch(g, levels)
    assert ours[0].dtype == torch.uint8 and ours[1].dtype == ours[2].dtype == torch.float16
    same = (ours[0] == ref[0]).all(-1) & (ours[1] == ref[1]) & (ours[2] == ref[2])
    assert same.float().mean() > 0.999 and same[0, 0]  # (measured: 0.9997)
    assert ours[1][0, 0] == 0 and (ours[0][0, 0] == 0).all()

    def error(r):
        return ((r[1].float()[..., None] * r[0].float() + r[2].float()[..., None] - g) ** 2).sum()
    assert abs(error(ours) / error(ref) - 1) < 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_select_rows_keeps_the_codes_of_those_rows(bits):
    """GroupQuantLinear.select_rows (a draft model's lm_head cut to --speculative-token-map): the chosen rows, in any
    order and crossing tile boundaries, re-tiled with their own codes: outputs bit-identical to the full layer's."""
    torch.manual_seed(bits)
    layer = GroupQuantLinear(torch.nn.Linear(96, 200, bias=True), bits)
    ids = torch.tensor([199, 0, 5, 17, 18, 100, 33, 15, 16])
    cut = layer.select_rows(ids)
    assert cut.out_features == len(ids) and cut.qweight.shape[0] == 1  # one tile of 16 rows
    x = torch.randn(5, 96)
    assert torch.equal(cut(x), layer(x)[:, ids])


@pytest.mark.parametrize("make", [W8A8Linear, GroupQuantLinear])
def test_rows_do_not_depend_on_the_batch(make):
    """Activations are quantized per token (w8a8_int8) or per group of a token (w4a8), so a request's
    result is the same alone or in any batch."""
    torch.manual_seed(0)
    layer = make(torch.nn.Linear(256, 384, bias=True))
    x = torch.randn(9, 256) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different scales
    batched = layer(x)
    for i in range(len(x)):
        assert torch.equal(layer(x[i:i + 1]), batched[i:i + 1]), i


def _assert_within_tolerance(exact, quant, method):
    ids = exact.tokenizer.apply_chat_template([{"role": "user", "content": "Explain what a hash map is."}],
                                              add_generation_prompt=True, tokenize=True, return_dict=False)
    ref, got = exact.core.prompt_logits(ids), quant.core.prompt_logits(ids)
    kl = torch.nn.functional.kl_div(torch.log_softmax(got, -1), torch.log_softmax(ref, -1),
                                    log_target=True, reduction="none").sum(-1).mean().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    max_kl, min_top1 = TOLERANCE[method]
    assert kl < max_kl and top1 > min_top1, f"{method}: mean KL {kl:.4f}, top-1 agreement {top1:.3f}"
    out = quant.generate(input_ids=ids, sampling_params={"max_new_tokens": 16, "temperature": 0})
    assert out["text"].strip()


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8_int8", "w4a8"])
def test_quantized_model_within_tolerance(method, engine_for):
    _assert_within_tolerance(engine_for("smollm2"), engine_for("smollm2", quantization=method), method)


@pytest.mark.parametrize("method", ["w8a8_int8", "w4a8"])
def test_quantized_model_within_tolerance_on_the_avx2_kernels(method, engine_for, smollm2_dir):
    """The AVX2 path (what a CPU without AVX-512 VNNI runs), on any machine with AVX2: the same tolerance.
    (w8a8_int8 there leaves fbgemm, whose int16 pair sums saturate with 8-bit activations: mean KL 0.23, and
    0.37 with the 7-bit activations that avoid it; ember's exact group kernel: 0.006, fbgemm with VNNI: 0.115.)"""
    from ember import Engine

    if "avx2" not in kernels.supported_variants() or os.environ.get("EMBER_TEST_DEVICE", "cpu") != "cpu":
        pytest.skip("needs a CPU with AVX2")
    with kernels.forced_variant("avx2"):
        quant = Engine(model_path=str(smollm2_dir), quantization=method, dtype="float32", device="cpu",
                       cpu_kv_cache_gb=0.25)
    ns = kernels.load_variant("avx2")
    layers = [m for m in quant.core.runner.model.modules() if isinstance(m, GroupQuantLinear)]
    assert layers and all(m.kernel_ns == ns for m in layers)
    _assert_within_tolerance(engine_for("smollm2"), quant, method)
