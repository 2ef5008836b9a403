"""Tiny random-weight vision-language checkpoints (transformers' own classes, save_pretrained layout) with
their tokenizer, chat template and image processor config."""
from __future__ import annotations

import pathlib

import torch

from tests.tiny_models import byte_level_tokenizer

QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# content parts: images/videos render as Qwen2-VL's placeholder triple, text as itself
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] in ('video', 'video_url') %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# small images: at most 16 patches of 28 px (4 merged tokens per 28x28 block... 16 tokens per image)
QWEN_VL_PIXELS = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 16}


def tiny_qwen2_5_vl(path: pathlib.Path) -> pathlib.Path:
    """2 text layers (hidden 64, M-RoPE sections 2/3/3), 4 vision blocks (32 wide, 2 heads) with window
    attention on blocks 0 and 2 (windows of 2x2 merged tokens) and full attention on 1 and 3."""
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    tok = byte_level_tokenizer()
    tok.add_tokens(QWEN_VL_TOKENS, special_tokens=True)
    tok.chat_template = QWEN_VL_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, eos_token_id=tok.eos_token_id, initializer_range=0.1)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
                  fullatt_block_indexes=[1, 3], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  tokens_per_second=2, initializer_range=0.1)
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
                              initializer_range=0.1)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(**QWEN_VL_PIXELS).save_pretrained(path)
    return path


def make_image(w, h, seed):
    """An RGB uint8 image [h, w, 3]: gradients plus seeded rectangles, made by the generator of the processor
    fixtures (tests/data/processor_fixtures/make_step3p7_processor_fixture.py, a script that runs on its own where
    torchvision imports), so that tests rebuild the fixtures' inputs exactly."""
    import importlib.util

    import numpy as np
    script = pathlib.Path(__file__).parent / "data" / "processor_fixtures" / "make_step3p7_processor_fixture.py"
    spec = importlib.util.spec_from_file_location("make_step3p7_processor_fixture", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return np.asarray(module.test_image(w, h, seed))


def make_frames(T=8, H=90, W=120):
    import numpy as np
    t, y, x = np.mgrid[0:T, 0:H, 0:W]
    return np.stack([(x * 255 // (W - 1) + 24 * t) % 256, (y * 255 // (H - 1)) % 256,
                     ((x + y + 40 * t) * 127 // (W + H)) % 256], axis=-1).astype(np.uint8)


STEP_TOKENS = ["<im_patch>", "<patch_start>", "<patch_end>", "<patch_newline>", "<im_start>", "<im_end>"]
STEP_TEMPLATE = QWEN_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<im_patch>")
# a 168 px global view (12x12 ViT grid -> 3x3 = 9 rows) and 112 px crops (8x8 -> 2x2 = 4 rows each)
STEP_PROCESSOR = {"image_processor_type": "Step3p7ImageProcessor", "size": {"height": 168, "width": 168},
                  "patch_size": 112, "max_image_size": 3024, "resample": 2, "do_rescale": True,
                  "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def tiny_step3p7(path: pathlib.Path) -> pathlib.Path:
    """Step3p7ForConditionalGeneration: tests/step3p5_hub.py's tiny Step MoE text model (5 layers, window 16,
    8 experts top-3; no MTP layer) in the hub's weight layout, a 2-layer 32-wide ViT, the projector."""
    import json
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.models.step3p7 import Step3p7Config, Step3p7ForConditionalGeneration

    from tests.step3p5_hub import N_LAYERS, _randomize, hub_config, to_hub
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer()
    tok.add_tokens(STEP_TOKENS, special_tokens=True)
    tok.chat_template = STEP_TEMPLATE
    hub = hub_config(len(tok), tok.eos_token_id)
    hub["num_nextn_predict_layers"] = 0
    for k in ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
        hub[k] = hub[k][:N_LAYERS]
    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "config.json").write_text(json.dumps(hub))
        text = AutoConfig.from_pretrained(d)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=168,
                  patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, layer_scale_init_value=0.1)
    cfg = Step3p7Config(text_config=text.to_dict(), vision_config=vision,
                        image_token_id=tok.convert_tokens_to_ids("<im_patch>"), tie_word_embeddings=False)
    cfg.architectures = ["Step3p7ForConditionalGeneration"]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Step3p7ForConditionalGeneration(cfg).eval()
    _randomize(model.model.language_model, gen)
    with torch.no_grad():  # layer scales away from their constant init, so their application is checked
        for layer in model.model.vision_model.layers:  # (q, k wide enough that attention, and rotary, matter)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, 0.3, generator=gen)
            layer.lambda_1.copy_(0.5 + torch.rand(layer.lambda_1.shape, generator=gen))
            layer.lambda_2.copy_(0.5 + torch.rand(layer.lambda_2.shape, generator=gen))
    state = model.state_dict()
    text_state = {k[len("model.language_model."):]: v for k, v in state.items() if k.startswith("model.language_model.")}
    tensors = to_hub(text_state)  # model.layers.* in the hub's names, stacked experts
    tensors.update({k: v for k, v in state.items() if not k.startswith("model.language_model.")})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(STEP_PROCESSOR, indent=1))
    return path


def step3p7_reference(path: pathlib.Path):
    """transformers' Step3p7ForConditionalGeneration on the tiny checkpoint (hub text names converted back)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.step3p7 import Step3p7ForConditionalGeneration

    from tests.step3p5_hub import from_hub
    cfg = AutoConfig.from_pretrained(path)
    model = Step3p7ForConditionalGeneration(cfg)
    saved = load_file(str(path / "model.safetensors"))
    hub_text = {k: v for k, v in saved.items() if k.startswith("model.layers.") or k in
                ("model.embed_tokens.weight", "model.norm.weight")}
    state = {"model.language_model." + k: v for k, v in from_hub(hub_text, cfg.text_config.num_hidden_layers).items()}
    state.update({k: v for k, v in saved.items() if k not in hub_text})
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def _interleave_rope(t, heads):
    """Split halves -> interleaved rotary pairs per head (the inverse of ember's _rope_halves)."""
    n = t.shape[0]
    return t.reshape(heads, 2, n // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def step3p7_in_stepfun_layout(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The tiny Step3p7 checkpoint with its vision tower and projector under stepfun's own names (OpenCLIP-style,
    fused rope-interleaved qkv: what transformers' conversion_mapping renames from)."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig
    heads = AutoConfig.from_pretrained(src).vision_config.num_attention_heads
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    renames = [(r"^embeddings\.patch_embedding\.weight$", "conv1.weight"),
               (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
               (r"^layers\.", "transformer.resblocks."), (r"^pre_layernorm\.", "ln_pre."),
               (r"^downsampler1\.", "vit_downsampler1."), (r"^downsampler2\.", "vit_downsampler2."),
               (r"\.lambda_1$", ".ls_1.gamma"), (r"\.lambda_2$", ".ls_2.gamma"), (r"\.mlp\.fc1\.", ".mlp.c_fc."),
               (r"\.mlp\.fc2\.", ".mlp.c_proj."), (r"\.self_attn\.", ".attn."), (r"\.layernorm_before\.", ".ln_1."),
               (r"\.layernorm_after\.", ".ln_2.")]
    out, qkv = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.startswith("model.multi_modal_projector."):
            out["vit_large_projector." + name[len("model.multi_modal_projector."):]] = t
            continue
        if not name.startswith("model.vision_model."):
            out[name] = t
            continue
        sub = name[len("model.vision_model."):]
        m = re.match(r"^(layers\.\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", sub)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = _interleave_rope(t, heads) if m[2] in "qk" else t
            continue
        for pat, rep in renames:
            sub = re.sub(pat, rep, sub)
        out["vision_model." + sub] = t
    for (layer, kind), parts in qkv.items():
        base = "vision_model." + layer.replace("layers.", "transformer.resblocks.")
        out[f"{base}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
