"""The MoE layer against transformers' own routers and experts (Qwen3-MoE, MiniMax-M2, GLM-4.7-Flash, Step-3.5),
its grouping (one GEMM pair per chosen expert, untouched experts never read) and its weight loader."""
import pytest
import torch
from transformers import Glm4MoeLiteConfig, MiniMaxM2Config, Qwen3MoeConfig
from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteTopkRouter
from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter
from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
from transformers.models.step3p7.modeling_step3p7 import Step3p7Experts

from ember.layers.moe import MoEExperts, route_sigmoid, route_softmax

H, I, E, K = 32, 16, 8, 3


def _same_choice(ours, theirs):
    """Same experts per token (order free) and the same weight for each."""
    (w1, i1), (w2, i2) = ours, theirs
    o1, o2 = i1.argsort(-1), i2.argsort(-1)
    assert torch.equal(i1.gather(1, o1), i2.gather(1, o2))
    torch.testing.assert_close(w1.gather(1, o1), w2.gather(1, o2).float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_router_matches_qwen3_moe(norm):
    torch.manual_seed(0)
    router = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                               norm_topk_prob=norm))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, H)
    logits, w, ids = router(x)
    _same_choice(route_softmax(logits, K, norm), (w, ids))


def test_sigmoid_router_matches_minimax_m2():
    torch.manual_seed(1)
    router = MiniMaxM2TopKRouter(MiniMaxM2Config(hidden_size=H, num_local_experts=E, num_experts_per_tok=K))
    torch.nn.init.normal_(router.weight, std=0.1)
    bias = torch.randn(E) * 0.3  # large enough to change which experts win
    x = torch.randn(20, H)
    logits, w, ids = router(x, bias)
    _same_choice(route_sigmoid(logits, K, bias), (w, ids))
    assert not torch.equal(route_sigmoid(logits, K, None)[1].sort(-1).values, ids.sort(-1).values)


@pytest.mark.parametrize("n_group,topk_group", [(4, 2), (4, 4), (1, 1)])
def test_grouped_sigmoid_router_matches_glm4_moe_lite(n_group, topk_group):
    torch.manual_seed(2)
    cfg = Glm4MoeLiteConfig(hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, n_group=n_group,
                            topk_group=topk_group, routed_scaling_factor=1.8, norm_topk_prob=True)
    router = Glm4MoeLiteTopkRouter(cfg)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_(std=0.2)
    x = torch.randn(32, H)
    logits, w, ids = router(x)
    _same_choice(route_sigmoid(logits, K, router.e_score_correction_bias, True, 1.8, n_group, topk_group), (w, ids))


def test_ties_choose_the_same_experts_as_the_references():
    """Saturated / equal scores: torch.topk picks the same set whichever way the reference sorts."""
    logits = torch.tensor([[0.0] * E, [1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 1.0], [40.0] * 4 + [-40.0] * 4])
    probs = torch.softmax(logits, -1)
    assert torch.equal(route_softmax(logits, K, True)[1], torch.topk(probs, K, dim=-1).indices)
    scores = torch.sigmoid(logits)
    assert torch.equal(route_sigmoid(logits, K, None)[1].sort(-1).values,
                       torch.topk(scores, K, dim=-1, sorted=False).indices.sort(-1).values)


def _experts_like(ref_gate_up, ref_down, **kw):
    ours = MoEExperts(E, H, I, **kw)
    ours.load_expert_weight("gate_up", ref_gate_up.detach())
    ours.load_expert_weight("down", ref_down.detach())
    return ours


@pytest.mark.parametrize("T", [1, 2, 13])
def test_experts_match_qwen3_moe_experts(T):
    torch.manual_seed(3)
    ref = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, num_experts=E, moe_intermediate_size=I))
    torch.nn.init.normal_(ref.gate_up_proj)
    torch.nn.init.normal_(ref.down_proj)
    ours = _experts_like(ref.gate_up_proj, ref.down_proj)
    x = torch.randn(T, H)
    w, ids = route_softmax(torch.randn(T, E), K, True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, w, ids), ref(x, ids, w), rtol=1e-5, atol=1e-4)


def test_experts_with_swiglu_clamp_match_step3p7():
    torch.manual_seed(4)
    cfg = Step3p7TextConfig(hidden_size=H, moe_num_experts=E, moe_intermediate_size=I, num_hidden_layers=1,
                            swiglu_limits=[2.0])
    ref = Step3p7Experts(cfg, 0)
    assert ref.limit == 2.0 and ref.num_experts == E
    torch.nn.init.normal_(ref.gate_up_proj)
    torch.nn.init.normal_(ref.down_proj)
    ours = _experts_like(ref.gate_up_proj, ref.down_proj, swiglu_limit=2.0)
    x = torch.randn(9, H) * 3
    w, ids = route_sigmoid(torch.randn(9, E), K, None)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, w, ids), ref(x, ids, w), rtol=1e-5, atol=1e-4)


class _Counting(MoEExperts):
    def __init__(self, *a):
        super().__init__(*a)
        self.calls = []

    def expert_mlp(self, e, x):
        self.calls.append((e, x.shape[0]))
        return super().expert_mlp(e, x)

    def experts_up(self, experts, x):  # batch 1 runs the chosen experts stacked
        self.calls += [(e, x.shape[0]) for e in experts]
        return super().experts_up(experts, x)


@pytest.mark.parametrize("T", [1, 16])
def test_each_chosen_expert_runs_once_over_its_tokens_and_others_are_not_read(T):
    torch.manual_seed(5)
    layer = _Counting(E, H, I)
    layer.w13.data.normal_()
    layer.w2.data.normal_()
    ids = torch.stack([torch.randperm(E - 2)[:K] for _ in range(T)])  # experts E-2, E-1 never chosen
    layer.w13.data[E - 2:] = float("nan")  # reading them would poison the output
    layer.w2.data[E - 2:] = float("nan")
    x, w = torch.randn(T, H), torch.rand(T, K)
    out = layer(x, w, ids)
    assert torch.isfinite(out).all()
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert sorted(layer.calls) == [(e, int(n)) for e, n in enumerate(counts.tolist()) if n]
    # the grouped sum equals the per-token definition
    ref = torch.stack([sum(w[t, j] * layer.expert_mlp(int(ids[t, j]), x[t:t + 1])[0] for j in range(K))
                       for t in range(T)])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # GEMMs of 1 vs n rows: last-bit differences


def test_a_token_alone_gets_the_same_bits_as_in_a_batch_of_one_row_groups():
    """Batch 1 skips the sort but adds the experts in the same order as the grouped path."""
    torch.manual_seed(6)
    layer = MoEExperts(E, H, I)
    layer.w13.data.normal_()
    layer.w2.data.normal_()
    x = torch.randn(2, H)
    ids = torch.tensor([[5, 1, 3], [0, 2, 4]])  # disjoint experts: each GEMM sees one row either way
    w = torch.rand(2, K)
    assert torch.equal(layer(x[:1], w[:1], ids[:1]), layer(x, w, ids)[:1])


def test_loader_per_expert_and_stacked_layouts_fill_the_same_weights():
    torch.manual_seed(7)
    gate, up, down = torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I)
    a = MoEExperts(E, H, I)
    n = sum(a.weight_loader(a.w13, gate[e], "gate", e) + a.weight_loader(a.w13, up[e], "up", e)
            + a.weight_loader(a.w2, down[e], "down", e) for e in range(E))
    b = MoEExperts(E, H, I)
    m = b.weight_loader(b.w13, torch.cat([gate, up], 1), "gate_up") + b.weight_loader(b.w2, down, "down")
    assert n == m == a.w13.numel() + a.w2.numel()
    assert torch.equal(a.w13, b.w13) and torch.equal(a.w2, b.w2)
    assert torch.equal(a.w13[3, :I], gate[3]) and torch.equal(a.w13[3, I:], up[3])
    c = MoEExperts(E, H, I)
    c.weight_loader(c.w13, gate, "gate")  # stacked gate and up separately (Step-3.5's hub files)
    c.weight_loader(c.w13, up, "up")
    assert torch.equal(c.w13, a.w13)


def test_loader_rejects_bad_shapes_shards_and_experts():
    layer = MoEExperts(E, H, I)
    with pytest.raises(ValueError, match=r"\(16, 33\).*\(16, 32\).*gate, expert 2"):
        layer.weight_loader(layer.w13, torch.zeros(I, H + 1), "gate", 2)
    with pytest.raises(ValueError, match="does not belong to w2"):
        layer.weight_loader(layer.w2, torch.zeros(I, H), "up", 0)
    with pytest.raises(ValueError, match="out of range"):
        layer.weight_loader(layer.w2, torch.zeros(H, I), "down", E)
    with pytest.raises(ValueError, match=r"\(7, 32, 16\)"):
        layer.weight_loader(layer.w2, torch.zeros(E - 1, H, I), "down")


def test_tensor_parallel_rank_takes_its_slice_of_the_expert_width(monkeypatch):
    import ember.distributed as dist
    monkeypatch.setattr(dist, "_tp_rank", 1)
    monkeypatch.setattr(dist, "_tp_size", 2)
    layer = MoEExperts(E, H, I)
    assert layer.intermediate_size == I // 2
    gate, up, down = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    layer.weight_loader(layer.w13, gate, "gate", 1)
    layer.weight_loader(layer.w13, up, "up", 1)
    layer.weight_loader(layer.w2, down, "down", 1)
    assert torch.equal(layer.w13[1], torch.cat([gate[I // 2:], up[I // 2:]]))
    assert torch.equal(layer.w2[1], down[:, I // 2:])
