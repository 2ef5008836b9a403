"""Acceptance 1 for Step3p7 (Step-3.7-Flash): with one image (global view + local crops with a row break) and
two images, ember's logits at every prompt position are within 2e-3 of transformers' Step3p7ForConditional-
Generation on the same processor outputs, and 16 greedy tokens are identical."""
import copy
import json
import os

import numpy as np
import pytest
import torch

from ember.multimodal.step3p7_prompt import expand_prompt, image_data
from tests.models.test_qwen2_5_vl import run
from tests.models.test_vs_transformers import LOGIT_TOL, assert_same_greedy, hf_greedy
from tests.tiny_vl import make_image, step3p7_reference, tiny_step3p7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_step3p7(tmp_path_factory.mktemp("vl") / "step3p7")


@pytest.fixture(scope="module")
def reference(model_dir):
    return step3p7_reference(model_dir)


class WithImages:
    def __init__(self, model, media):
        self.model, self.data = model, [d for _, d in media]

    def __call__(self, ids, past_key_values=None, use_cache=False):
        if past_key_values is not None:  # decode steps: text only (a generated <im_patch> is just a token)
            with torch.no_grad():
                return self.model(input_ids=ids, past_key_values=past_key_values, use_cache=True)
        kw = {"pixel_values": torch.from_numpy(np.concatenate([d["pixel_values"] for d in self.data])),
              "num_local_patches": [int(d["num_local_patches"]) for d in self.data]}
        local = [d["pixel_values_local"] for d in self.data if "pixel_values_local" in d]
        if local:
            kw["pixel_values_local"] = torch.from_numpy(np.concatenate(local))
        with torch.no_grad():
            return self.model(input_ids=ids, use_cache=use_cache, **kw)


@pytest.mark.parametrize("case", ["one image", "two images"])
def test_logits_and_16_greedy_tokens_match(case, vl_engine, reference, model_dir):
    pp = json.loads((model_dir / "preprocessor_config.json").read_text())
    media = [("image", image_data(make_image(300, 200, 1), pp))]
    if case == "two images":
        media.append(("image", image_data(make_image(100, 80, 2), pp)))
    assert int(media[0][1]["num_local_patches"]) == 6 and media[0][1]["patch_newline_mask"].any()
    parts = [{"type": "image"} for _ in media] + [{"type": "text", "text": f"describe the {case}"}]
    ids = vl_engine.tokenizer.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    ids, mm = expand_prompt(ids, media, vl_engine.tokenizer, pp)
    ref = WithImages(reference, media)
    theirs = ref(torch.tensor([ids])).logits[0].float()
    ours = vl_engine.core.prompt_logits(ids, mm).cpu()
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < LOGIT_TOL * max(1.0, theirs.abs().max().item() / 10), f"max abs logit diff {diff}"
    got, out = run(vl_engine, ids, mm, 16)
    assert out.prompt_tokens == len(ids)
    assert_same_greedy(got, hf_greedy(ref, ids, 16), ref, ids)


def test_stepfun_checkpoint_layout(model_dir, vl_engine, tmp_path):
    """stepfun's own names (vision_model.transformer.resblocks.*, fused interleaved in_proj, vit_large_projector):
    transformers' loader reads them back to the same weights, and ember serves the same logits from them."""
    from transformers.models.step3p7 import Step3p7ForConditionalGeneration

    from ember import Engine
    from tests.tiny_vl import step3p7_in_stepfun_layout
    hub = step3p7_in_stepfun_layout(model_dir, tmp_path / "stepfun")
    theirs = Step3p7ForConditionalGeneration.from_pretrained(hub, dtype=torch.float32).state_dict()
    ref = step3p7_reference(model_dir).state_dict()
    vision = [k for k in ref if "vision_model" in k or "projector" in k]
    assert vision and all(torch.equal(theirs[k], ref[k]) for k in vision)
    pp = json.loads((model_dir / "preprocessor_config.json").read_text())
    media = [("image", image_data(make_image(300, 200, 1), pp))]
    ids = vl_engine.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    ids, mm = expand_prompt(ids, media, vl_engine.tokenizer, pp)
    other = Engine(model_path=str(hub), dtype="float32", device=os.environ.get("EMBER_TEST_DEVICE", "auto"),
                   cpu_kv_cache_gb=0.25)
    try:
        # (each its own copy: an item keeps the embeddings its vl_engine computed)
        assert torch.equal(other.core.prompt_logits(ids, copy.deepcopy(mm)),
                           vl_engine.core.prompt_logits(ids, copy.deepcopy(mm)))
    finally:
        other.shutdown()
