"""Model fixtures, each loaded once per test session: ember's engine and the transformers reference."""
import gc
import json
import os

import pytest
import torch

from tests.tiny_models import tiny_model

MODEL_FIXTURES = {"smollm2": "smollm2_dir", "qwen2.5": "qwen_dir", "gemma3": "gemma3_dir",
                  "tiny-qwen3": "tiny_qwen3_dir", "tiny-llama": "tiny_llama_dir", "tiny-qwen2": "tiny_qwen2_dir",
                  "tiny-gemma3": "tiny_gemma3_dir", "tiny-qwen3-moe": "tiny_qwen3_moe_dir",
                  "tiny-minimax-m2": "tiny_minimax_m2_dir", "tiny-glm4-moe-lite": "tiny_glm4_moe_lite_dir",
                  "tiny-step3p5": "tiny_step3p5_dir"}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _tiny_fixture(kind: str):
    @pytest.fixture(scope="session")
    def fixture(tiny_dir):
        return tiny_model(kind, tiny_dir / kind)
    return fixture


tiny_qwen3_dir = _tiny_fixture("qwen3")
tiny_llama_dir = _tiny_fixture("llama")
tiny_qwen2_dir = _tiny_fixture("qwen2")
tiny_gemma3_dir = _tiny_fixture("gemma3")
tiny_qwen3_moe_dir = _tiny_fixture("qwen3_moe")
tiny_minimax_m2_dir = _tiny_fixture("minimax_m2")
tiny_glm4_moe_lite_dir = _tiny_fixture("glm4_moe_lite")
tiny_step3p5_dir = _tiny_fixture("step3p5")


@pytest.fixture(scope="session")
def tiny_step3p5_mtp3_dir(tiny_dir):
    """The tiny Step-3.5 with three MTP layers (Step-3.5-Flash has three): sliding, full, sliding."""
    import tests.step3p5_hub as hub
    from tests.tiny_models import byte_level_tokenizer
    path = tiny_dir / "step3p5_mtp3"
    if (path / "config.json").exists():
        return path
    orig = hub.hub_config

    def hub_config(vocab_size, eos_token_id):
        c = orig(vocab_size, eos_token_id)
        types = c["layer_types"][:hub.N_LAYERS] + ["sliding_attention", "full_attention", "sliding_attention"]
        c.update(num_nextn_predict_layers=3, layer_types=types,
                 rope_theta=[5e6 if t == "full_attention" else 1e4 for t in types],
                 partial_rotary_factors=[0.5 if t == "full_attention" else 1.0 for t in types],
                 swiglu_limits=c["swiglu_limits"][:hub.N_LAYERS] + [0.0] * 3,
                 swiglu_limits_shared=c["swiglu_limits_shared"][:hub.N_LAYERS] + [0.2, 0.0, 0.15])
        return c
    hub.hub_config = hub_config
    try:
        return hub.build_tiny_step3p5(path, byte_level_tokenizer())
    finally:
        hub.hub_config = orig


def _step3p5_reference(path):  # transformers has no text-only Step-3.5 CausalLM class (tests/step3p5_hub.py)
    from tests.step3p5_hub import Step3p5Reference
    return Step3p5Reference(path)


REFERENCES = {"tiny-step3p5": _step3p5_reference}  # name -> loader, where AutoModelForCausalLM cannot load it


# Small LRU caches: a model is loaded once while its tests run, without holding every model at once
# (CI has 24 GiB and runs servers beside these tests).
_engines: dict = {}
_refs: dict = {}
MAX_ENGINES, MAX_REFS = 2, 1


def _remember(cache: dict, key, value, limit: int):
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
    gc.collect()


@pytest.fixture(scope="session")
def engine_for(request):
    """engine_for(name, **server_args) -> ember.Engine, cached per (name, args)."""
    from ember import Engine

    def get(name, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key in _engines:
            _remember(_engines, key, _engines[key], MAX_ENGINES)  # mark as recently used
        else:
            path = request.getfixturevalue(MODEL_FIXTURES[name])
            # float32: compared against the fp32 reference (on CUDA too; EMBER_TEST_DEVICE=cuda runs them there)
            # EMBER_TEST_SERVER_ARGS (JSON): more engine arguments for every test, e.g. the GPU run's
            # {"attention_backend": "triton", "moe_runner_backend": "triton"} (benchmarks/gpu_run.sh)
            kwargs = {"dtype": "float32", "device": os.environ.get("EMBER_TEST_DEVICE", "auto"),
                      "cpu_kv_cache_gb": 0.25, **json.loads(os.environ.get("EMBER_TEST_SERVER_ARGS", "{}")), **kwargs}
            _remember(_engines, key, Engine(model_path=str(path), **kwargs), MAX_ENGINES)
        return _engines[key]
    yield get
    _engines.clear()


@pytest.fixture(scope="session")
def reference_for(request):
    """reference_for(name) -> transformers model (fp32, eval) on the same weights."""
    from transformers import AutoModelForCausalLM

    def get(name):
        if name not in _refs:
            path = request.getfixturevalue(MODEL_FIXTURES[name])
            load = REFERENCES.get(name, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
            _remember(_refs, name, load(path).eval(), MAX_REFS)
        return _refs[name]
    yield get
    _refs.clear()


@pytest.fixture(scope="module")
def vl_engine(model_dir):
    """The engine of a module's multimodal model (the module's `model_dir` fixture), float32, its own pool."""
    from ember import Engine
    eng = Engine(model_path=str(model_dir), dtype="float32", device=os.environ.get("EMBER_TEST_DEVICE", "auto"),
                 cpu_kv_cache_gb=0.25)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def engine(engine_for, request):
    """The engine of the module's NAME (a seed-architecture test module)."""
    return engine_for(request.module.NAME)


@pytest.fixture(scope="module")
def prompts(engine, request):
    """The module's TEXT cut to each of its LENGTHS tokens: prompts of mixed lengths."""
    ids = engine.tokenizer.encode(request.module.TEXT)
    lengths = request.module.LENGTHS
    assert len(ids) >= max(lengths)
    return [ids[:n] for n in lengths]
