"""The group GEMM's build variants (ember/kernels): the AVX-512 VNNI path where the CPU has it, the AVX2 path
on any x86 CPU with AVX2 (an AVX-512 machine runs it too: CI exercises both), and the portable scalar loop
that every build carries as `group_gemm_reference` agree BIT FOR BIT: the integer dot products are exact on
every path and the float epilogue runs the same operations in the same order."""
import pytest
import torch

from ember import kernels

SIMD = ["amx", "avx512", "avxvnni", "avx2"]


def _ops(variant):
    if variant not in kernels.supported_variants():
        pytest.skip(f"this CPU cannot run the {variant} kernels")
    return getattr(torch.ops, kernels.load_variant(variant))


def _random_weight(gen, n, k, bits):
    """Any bytes are valid codes in both layouts; fp16 scales and offsets of the sizes real weights have."""
    tiles, ng = -(-n // 16), k // 32
    q = torch.randint(0, 256, (tiles, ng, 256 if bits == 4 else 512), generator=gen, dtype=torch.uint8)
    dw = (torch.rand(tiles, ng, 16, generator=gen) * 0.02).half()
    mw = (torch.randn(tiles, ng, 16, generator=gen) * 0.05).half()
    return q, dw, mw


# ragged M (not a multiple of the 4- and 8-row passes), N (partial tiles of 16 and halves of 8) and K (odd group
# counts)
SHAPES = [(1, 1, 32), (2, 7, 64), (3, 8, 96), (4, 9, 32), (5, 16, 160), (6, 23, 224), (7, 40, 96), (9, 200, 896),
          (13, 17, 1536), (1, 1152, 896), (8, 8, 64), (16, 24, 96), (19, 5, 32), (27, 41, 288), (32, 9, 64),
          (300, 21, 96), (260, 3, 64)]  # (AMX: blocks of 16 rows with and without a tail, passes of 256 rows)


@pytest.mark.parametrize("variant", SIMD)
@pytest.mark.parametrize("bits", [4, 8])
def test_simd_paths_equal_the_portable_loop_bit_for_bit(variant, bits):
    ops = _ops(variant)
    gen = torch.Generator().manual_seed(bits)
    for m, n, k in SHAPES:
        q, dw, mw = _random_weight(gen, n, k, bits)
        x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]
        x[0, :32] = 0  # an all-zero group (scale 0)
        x[-1, -32:] = torch.arange(-16, 16) + 0.5  # halves: ties, rounded to even
        x[-1, -1] = 127  # (scale 1)
        got = ops.group_gemm(x, q, dw, mw, bits, n)
        ref = ops.group_gemm_reference(x, q, dw, mw, bits, n)
        assert got.shape == (m, n)
        assert torch.equal(got, ref), (m, n, k, (got - ref).abs().max().item())


def test_amx_build_takes_its_tiles():
    """The amx build runs its AMX tile: the variant is listed only where Linux grants the tile state
    (kernels.amx_granted), and the kernel would fall back to VNNI, silently, without it."""
    ops = _ops("amx")
    assert ops.uses_amx()
    assert not _ops("avx512").uses_amx()


@pytest.mark.parametrize("bits", [4, 8])
def test_variants_agree_with_each_other(bits):
    """Every variant this CPU runs gives the same bits as the process's default build (and its reference)."""
    default = getattr(torch.ops, kernels.load_group_gemm())
    gen = torch.Generator().manual_seed(10 + bits)
    m, n, k = 6, 72, 480
    q, dw, mw = _random_weight(gen, n, k, bits)
    x = torch.randn(m, k, generator=gen)
    ref = default.group_gemm_reference(x, q, dw, mw, bits, n)
    for variant in kernels.supported_variants():
        if variant != "portable":
            assert torch.equal(getattr(torch.ops, kernels.load_variant(variant)).group_gemm(x, q, dw, mw, bits, n), ref)


@pytest.mark.parametrize("variant", SIMD)
@pytest.mark.parametrize("bits", [4, 8])
def test_largest_products_do_not_saturate(variant, bits):
    """All codes at their maximum times activations at +-127: the int16 pair sums of `vpmaddubsw` reach their
    largest values (8 x 3,810 per group). With x = +-127 the activation scale is 1, so the answer is exact."""
    ops = _ops(variant)
    m, n, k = 2, 16, 64
    q = torch.full((1, k // 32, 256 if bits == 4 else 512), 255, dtype=torch.uint8)
    dw, mw = torch.ones(1, k // 32, 16).half(), torch.zeros(1, k // 32, 16).half()
    x = torch.full((m, k), 127.0)
    x[1] = -127
    top = 15 if bits == 4 else 255
    expected = torch.tensor([[top * 127 * k], [-top * 127 * k]], dtype=torch.float32).expand(m, n)
    assert torch.equal(ops.group_gemm(x, q, dw, mw, bits, n), expected)


def test_variant_selection_follows_the_cpu_flags():
    assert kernels.supported_variants(set()) == ["portable"]
    assert kernels.supported_variants({"avx2", "fma", "f16c"}) == ["avx2", "portable"]
    assert kernels.supported_variants({"avx2", "fma", "f16c", "avx_vnni"}) == ["avxvnni", "avx2", "portable"]
    zen4 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    assert kernels.supported_variants(zen4) == ["avx512", "avx2", "portable"]
    assert kernels.supported_variants(zen4 | {"amx_tile", "amx_int8"})[:2] == ["amx", "avx512"]  # Sapphire Rapids
    assert kernels.supported_variants(zen4 - {"avx512_vnni"})[0] == "avx2"  # Skylake-SP: AVX-512 without VNNI
    assert getattr(torch.ops, kernels.load_group_gemm()).kernel_isa() == kernels.default_variant()


@pytest.mark.parametrize("variant", SIMD + ["portable"])
def test_kernels_run_on_every_thread(variant):
    """The kernels split work with at::parallel_for, which runs serially in an extension compiled without OpenMP
    (every kernel then used one core: the eighth session found and fixed it)."""
    import os
    ops = _ops(variant)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("one CPU here")
        assert ops.parallel_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", SIMD + ["portable"])
def test_silu_and_mul_matches_torch(variant):
    """The quantized MLP's activation (the fused decode step's silu(gate) * up, also used by the torch path):
    within float32 rounding of torch's, on vector widths and ragged tails, any leading shape."""
    ops = _ops(variant)
    gen = torch.Generator().manual_seed(3)
    for shape in [(1, 2 * 4864), (3, 5, 2 * 24), (7, 2 * 13), (0, 2 * 8)]:
        x = torch.randn(shape, generator=gen) * 4
        gate, up = x.chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        got = ops.silu_and_mul(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="gate \\| up"):
        ops.silu_and_mul(torch.randn(2, 7))
