"""Preprocessing without torchvision equals transformers' processors (stored references in ../shared/fixtures)."""
import json
from pathlib import Path

import numpy as np
import pytest

from ember.multimodal.processing import qwen2vl_images, qwen2vl_video, smart_resize, step3p7_image
from tests.tiny_vl import make_image

# copies of ../shared/fixtures (transformers' outputs where torchvision imports; README.md there says how they were
# made), kept in the repository so CI's clean clone has them
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "processor_fixtures"


@pytest.mark.parametrize("index", range(5))
def test_step3p7_image_matches_transformers(index):
    meta = json.loads((FIXTURES / "step3p7_processor_reference.json").read_text())["images"][index]
    ref = np.load(FIXTURES / "step3p7_processor_reference.npz")
    w, h, tag = meta["w"], meta["h"], f"{meta['w']}x{meta['h']}"
    ours = step3p7_image(make_image(w, h, meta["seed"]))
    outs = meta["outputs"]
    assert [ours["num_local_patches"]] == outs["num_local_patches"]["value"]
    if "patch_newline_masks" in outs:
        assert [ours["patch_newline_mask"]] == outs["patch_newline_masks"]["value"]
    for key in ("pixel_values", "pixel_values_local"):
        if key not in outs:
            assert key not in ours
            continue
        got = ours[key]
        assert list(got.shape) == outs[key]["shape"]
        sample = got[..., ::7, ::7]
        # the same uint8 resize kernel: equal up to float32 normalisation rounding (measured 4.8e-7)
        np.testing.assert_allclose(sample, ref[f"{tag}/{key}/sample"], rtol=0, atol=1e-6)
        # per-channel sums cover the pixels the sample skips (float32 sum rounding: measured < 0.1; one pixel
        # one uint8 step off moves a sum by 0.015, a different resize by hundreds)
        sums = got.astype(np.float64).sum(axis=(-1, -2))
        np.testing.assert_allclose(sums, ref[f"{tag}/{key}/channel_sums"], rtol=0, atol=0.2)


def test_qwen2vl_video_matches_transformers():
    ref = np.load(FIXTURES / "qwen2vl_video_reference.npz")
    ours = qwen2vl_video(ref["frames"], min_pixels=56 * 56, max_pixels=112 * 112)
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    theirs = ref["pixel_values_videos"].astype(np.float32)
    # equal up to the reference's float16 storage (relative 2^-11; measured max 8.9e-4 absolute)
    np.testing.assert_allclose(ours["pixel_values_videos"], theirs, rtol=2 ** -11, atol=1e-5)


def test_qwen2vl_images_use_transformers_pillow_processor():
    img = make_image(100, 60, 0)
    out = qwen2vl_images([img], {"min_pixels": 56 * 56, "max_pixels": 112 * 112})
    h, w = smart_resize(60, 100, 28, 56 * 56, 112 * 112)
    assert out["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    assert out["pixel_values"].shape == (h * w // 196, 3 * 2 * 14 * 14)
