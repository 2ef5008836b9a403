"""--quantization of MoE experts: close to the fp32 experts, a token's result independent of its batch, and
quantize_model reaches the experts while the router stays in full precision."""
import pytest
import torch

from ember.layers.moe import MoEExperts, RouterGate, route_softmax
from ember.layers.moe_quant import GROUP_KERNEL_BITS, QuantMoEExperts
from ember.layers.model_quantization import quantize_model

E, H, I, K = 8, 64, 96, 2


def _experts(seed=0):
    torch.manual_seed(seed)
    layer = MoEExperts(E, H, I)
    layer.w13.data.normal_(std=0.1)
    layer.w2.data.normal_(std=0.1)
    return layer


# relative error of the layer's output, two chained GEMMs on Gaussian weights (measured: w8a8_int8 0.018,
# w4a8 0.138, int8 0.012)
@pytest.mark.parametrize("method,tol", [("w8a8_int8", 0.025), ("w4a8", 0.16), ("int8", 0.015)])
def test_quantized_experts_approximate_fp32(method, tol):
    fp = _experts()
    q = QuantMoEExperts(fp, method)
    x = torch.randn(11, H)
    w, ids = route_softmax(torch.randn(11, E), K, True)
    ref, got = fp(x, w, ids), q(x, w, ids)
    assert ((got - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("method", ["w8a8_int8", "w4a8"])
def test_a_token_gets_the_same_result_alone_or_batched(method):
    q = QuantMoEExperts(_experts(1), method)
    x = torch.randn(9, H) * torch.logspace(-2, 2, 9)[:, None]
    w, ids = route_softmax(torch.randn(9, E), K, True)
    batched = q(x, w, ids)
    for t in range(9):
        assert torch.equal(q(x[t:t + 1], w[t:t + 1], ids[t:t + 1]), batched[t:t + 1]), t


def test_quantize_model_quantizes_experts_and_keeps_the_router():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = RouterGate(H, E)
            self.experts = _experts(2)

    model = torch.nn.Sequential(Block())
    with torch.no_grad():  # the router is torch.empty until loaded: give it values (NaN never equals itself)
        model[0].gate.weight.normal_()
    router = model[0].gate.weight.detach().clone()
    quantize_model(model, "w8a8_int8")
    assert isinstance(model[0].experts, QuantMoEExperts) and isinstance(model[0].gate, RouterGate)
    assert torch.equal(model[0].gate.weight, router)
    assert not any(n.endswith(("w13", "w2")) for n, _ in model.named_parameters())  # fp expert weights freed


def _by_definition(q: QuantMoEExperts, x, w, ids, limit):
    """The expert layer step by step in torch, each GEMM the group kernel's own op on that expert's matrix."""
    ops = getattr(torch.ops, q.kernel_ns)
    bits = GROUP_KERNEL_BITS[q.method]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in sorted(range(ids.shape[1]), key=lambda j: int(ids[t, j])):
            e = int(ids[t, j])
            if not 0 <= e < q.num_experts:
                continue
            gate, up = ops.group_gemm(x[t:t + 1], q.q13[e], q.dw13[e], q.mw13[e], bits, 2 * I).split(I, -1)
            gate = torch.nn.functional.silu(gate)
            if limit:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            out[t] += ops.group_gemm(gate * up, q.q2[e], q.dw2[e], q.mw2[e], bits, H)[0] * w[t, j]
    return out


@pytest.mark.parametrize("method", ["w8a8_int8", "w4a8"])
@pytest.mark.parametrize("limit", [None, 0.5])
def test_the_one_call_expert_layer_follows_its_definition(method, limit):
    """ember.ops.moe_experts (grouping, both GEMMs, SwiGLU with Step-3.5's clamp, weighted sum) against the
    same steps in torch; ids outside [0, E) (experts of another expert-parallel rank) are skipped."""
    fp = _experts(3)
    fp.swiglu_limit = limit
    q = QuantMoEExperts(fp, method)
    x = torch.randn(7, H)
    w, ids = route_softmax(torch.randn(7, E), K, True)
    ids[2, 1], ids[5, 0] = E + 3, -1  # held elsewhere
    got, want = q.routed(x, w, ids), _by_definition(q, x, w, ids, limit)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # std::exp vs torch's vectorised exp
    if limit:  # the clamp is active on these inputs (it changes the result)
        fp.swiglu_limit = None
        assert not torch.allclose(got, _by_definition(q, x, w, ids, None), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["w8a8_int8", "w4a8"])
def test_the_expert_layer_kernel_is_bit_exact_across_instruction_sets(method):
    from ember import kernels

    variants = [v for v in ("amx", "avx512", "avxvnni", "avx2", "portable") if v in kernels.supported_variants()]
    q = QuantMoEExperts(_experts(4), method)
    x = torch.randn(5, H) * torch.logspace(-2, 2, 5)[:, None]
    w, ids = route_softmax(torch.randn(5, E), K, True)
    args = (x, ids, w, q.q13, q.dw13, q.mw13, q.q2, q.dw2, q.mw2, I, 0.0)
    outs = {v: getattr(torch.ops, kernels.load_variant(v)).moe_experts(*args) for v in variants}
    for v in variants[1:]:
        assert torch.equal(outs[v], outs[variants[0]]), v
