"""The per-parameter weight loaders: fused and split checkpoint layouts, and errors that name the tensor."""
import pytest
import torch

from ember.layers.linear import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                 VocabParallelEmbedding)
from ember.loader.weight_loading import load_weights
from ember.models.llama import LlamaForCausalLM
from tests.tiny_models import COMMON


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(dict(dict(COMMON, vocab_size=50, num_hidden_layers=1, rms_norm_eps=1e-6, hidden_act="silu",
                                       rope_theta=10000.0, tie_word_embeddings=False), **kw))


def _checkpoint(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, D, I, V = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,),
              "model.layers.0.input_layernorm.weight": (H,), "model.layers.0.post_attention_layernorm.weight": (H,),
              "model.layers.0.self_attn.q_proj.weight": (q, H), "model.layers.0.self_attn.k_proj.weight": (kv, H),
              "model.layers.0.self_attn.v_proj.weight": (kv, H), "model.layers.0.self_attn.o_proj.weight": (H, q),
              "model.layers.0.mlp.gate_proj.weight": (I, H), "model.layers.0.mlp.up_proj.weight": (I, H),
              "model.layers.0.mlp.down_proj.weight": (H, I)}
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def test_split_checkpoint_fills_fused_layers_in_order():
    cfg = _Cfg()
    model, ckpt = LlamaForCausalLM(cfg), _checkpoint(cfg)
    model.load_weights(ckpt.items())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, k, v = attn.qkv_proj.weight.split(attn.split_sizes)
    assert torch.equal(q, ckpt["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(k, ckpt["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(v, ckpt["model.layers.0.self_attn.v_proj.weight"])
    gate, up = mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, ckpt["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, ckpt["model.layers.0.mlp.up_proj.weight"])


def test_missing_tensor_is_named():
    cfg = _Cfg()
    ckpt = _checkpoint(cfg)
    del ckpt["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.0\.self_attn\.qkv_proj\.weight"):
        LlamaForCausalLM(cfg).load_weights(ckpt.items())


def test_misshaped_tensor_is_named():
    cfg = _Cfg()
    ckpt = _checkpoint(cfg)
    ckpt["model.layers.0.mlp.up_proj.weight"] = torch.zeros(cfg.intermediate_size + 1, cfg.hidden_size)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        LlamaForCausalLM(cfg).load_weights(ckpt.items())


def test_fused_checkpoint_tensors_load_too():
    """Checkpoints that store qkv or gate_up already fused fill the same parameters."""
    qkv = QKVParallelLinear(8, 2, num_heads=4, num_kv_heads=2)
    w = torch.randn(16, 8)
    assert qkv.weight_loader(qkv.weight, w) == w.numel()
    assert torch.equal(qkv.weight.data, w)
    merged = MergedColumnParallelLinear(8, [3, 5])
    w = torch.randn(8, 8)
    merged.weight_loader(merged.weight, w)
    assert torch.equal(merged.weight.data, w)


def test_tp_shards_are_the_rank_slices(monkeypatch):
    """With tp=2, rank 1 holds the second half of columns/rows, and KV heads are replicated past their count."""
    import ember.distributed as dist
    monkeypatch.setattr(dist, "_tp_rank", 1)
    monkeypatch.setattr(dist, "_tp_size", 2)
    row = RowParallelLinear(8, 4)
    w = torch.arange(32.0).reshape(4, 8)
    row.weight_loader(row.weight, w)
    assert torch.equal(row.weight.data, w[:, 4:])
    qkv = QKVParallelLinear(8, 2, num_heads=4, num_kv_heads=1)  # 1 KV head on 2 ranks: replicated
    assert (qkv.num_heads, qkv.num_kv_heads, qkv.kv_replicas) == (2, 1, 2)
    full_k = torch.randn(2, 8)
    qkv.weight_loader(qkv.weight, full_k, "k")
    assert torch.equal(qkv.weight.data[4:6], full_k)
    emb = VocabParallelEmbedding(5, 3)  # 3 rows per rank; rank 1 holds rows 3, 4 and one zero row
    table = torch.randn(5, 3)
    emb.weight_loader(emb.weight, table)
    assert torch.equal(emb.weight.data[:2], table[3:]) and not emb.weight.data[2].any()
    head = ParallelLMHead(5, 3)
    head.weight_loader(head.weight, table)
    assert torch.equal(head.weight.data[:2], table[3:])


# --- streaming: layers quantized as their weights arrive (issue 12, lean memory) -------------------------------

def _loaded(cfg, ckpt, method=None):
    from ember.layers.model_quantization import quantize_model, quantizing_loader
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    if method is None:
        model.load_weights(ckpt.items())
        return model
    model.load_weights(ckpt.items(), on_loaded=quantizing_loader(model, method, torch.float32))
    return quantize_model(model, method)


def test_on_loaded_sees_each_module_once_when_all_its_tensors_are_in():
    cfg = _Cfg(tie_word_embeddings=True)
    ckpt = _checkpoint(cfg)
    del ckpt["lm_head.weight"]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    seen, loaded = [], set()
    order = list(ckpt)

    def on_loaded(name, module):
        seen.append(name)
        for pname, p in module.named_parameters(recurse=False):  # complete: every tensor of it already read
            assert torch.count_nonzero(p) > 0, (name, pname)
        loaded.add(name)

    model.load_weights(((n, ckpt[n]) for n in order), on_loaded=on_loaded)
    assert len(seen) == len(set(seen))  # once each
    assert {"model.embed_tokens", "lm_head", "model.layers.0.self_attn.qkv_proj",
            "model.layers.0.mlp.gate_up_proj", "model.norm"} <= loaded  # the tied head completes with the embedding


@pytest.mark.parametrize("method", ["w4a8", "w8a8_int8", "int8"])
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_quantization_equals_quantizing_the_loaded_model(method, tied):
    from ember.layers.model_quantization import quantize_model
    cfg = _Cfg(tie_word_embeddings=tied)
    ckpt = _checkpoint(cfg)
    if tied:
        del ckpt["lm_head.weight"]
    after = quantize_model(_loaded(cfg, ckpt), method)
    streamed = _loaded(cfg, ckpt, method)
    after_mods, n = dict(after.named_modules()), 0
    for name, module in streamed.named_modules():
        if not getattr(module, "quantized", False):
            continue
        other = after_mods[name]
        assert type(other) is type(module), name
        if hasattr(module, "embedding_dim"):
            ids = torch.arange(cfg.vocab_size)
            assert torch.equal(module(ids), other(ids)), name
        else:
            x = torch.randn(3, cfg.intermediate_size if "down_proj" in name else
                            cfg.num_attention_heads * cfg.head_dim if "o_proj" in name else cfg.hidden_size)
            assert torch.equal(module(x), other(x)), name
        n += 1
    assert n == 6  # embedding, qkv, o, gate_up, down, lm_head
    assert not any(isinstance(m, torch.nn.Linear) for m in streamed.modules())
    assert not any(t.dtype == torch.float32 and t.dim() == 2 for t in streamed.parameters())  # no float matrix left


def test_quantized_embedding_is_close_and_compact():
    from ember.layers.quantization import GroupQuantEmbedding
    emb = VocabParallelEmbedding(100, 64)
    torch.nn.init.normal_(emb.weight)
    q = GroupQuantEmbedding(emb)
    ids = torch.tensor([[0, 5, 99], [7, 7, 1]])
    ref, got = emb(ids), q(ids)
    groups = emb.weight.detach().unflatten(-1, (-1, 32))
    step = (groups.amax(-1) - groups.amin(-1)).max() / 255
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert (got - ref).abs().max() <= 0.5 * step * 1.01 + 1e-3  # half a step (+ the fp16 rounding of scale/offset)
    assert (got - ref).abs().max() > 0  # (it is quantized)
    held = sum(b.numel() * b.element_size() for b in q.buffers())
    assert held < emb.weight.numel() * 4 / 3.5


def test_safetensors_are_read_tensor_by_tensor(tmp_path):
    from safetensors.torch import save_file

    from ember.loader.weights import read_safetensors
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(10).reshape(2, 5),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5), "h": torch.randn(4, 4).half(),
               "flag": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    got = dict(read_safetensors(tmp_path / "m.safetensors"))
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        list(read_safetensors(tmp_path / "cut.safetensors"))
