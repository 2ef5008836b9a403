"""MediaPlanner on Qwen2.5-VL: chat parts -> placeholder text -> expanded prompt, native video, detail low."""
import asyncio
import base64
import io

import pytest

from ember.multimodal.fetch import MediaLimits
from ember.multimodal.video import encode_test_video
from tests.tiny_vl import make_frames, make_image, tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    from transformers import AutoTokenizer

    from ember.multimodal.planner import MediaPlanner
    path = tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl") / "qwen2_5_vl")
    return MediaPlanner(path, AutoTokenizer.from_pretrained(path), "tiny-vl")


def png_url(w, h, seed):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(make_image(w, h, seed)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prompt(planner, parts):
    messages, refs = planner.split_messages([{"role": "user", "content": parts}], 4)
    media = asyncio.run(planner.load(refs, MediaLimits()))
    text = "".join(p.get("text", "") for p in messages[0]["content"])
    ids = planner.tokenizer.encode(text)
    return planner.expand(ids, media)


def test_image_and_native_video(planner):
    video = "data:video/mp4;base64," + base64.b64encode(encode_test_video(make_frames(8, 90, 120), fps=4)).decode()
    ids, mm = prompt(planner, [{"type": "text", "text": "look: "},
                               {"type": "image_url", "image_url": {"url": png_url(100, 60, 1)}},
                               {"type": "video_url", "video_url": {"url": video}}])
    assert [it.kind for it in mm.items] == ["image", "video"]
    cfg = planner.cfg
    assert ids.count(cfg.image_token_id) == mm.items[0].length and ids.count(cfg.video_token_id) == mm.items[1].length
    assert mm.items[1].data["grid_thw"][0] == 2  # 4 frames sampled from 2 s -> 2 temporal patches
    assert mm.mrope_positions.shape == (3, len(ids))


def test_detail_low_uses_fewer_tokens(planner):
    url = png_url(1000, 800, 2)
    planner.pp = dict(planner.pp, max_pixels=28 * 28 * 512)  # (the tiny model's own cap is below "low"'s)
    n = {d: prompt(planner, [{"type": "image_url", "image_url": {"url": url, "detail": d}}])[1].items[0].length
         for d in ("low", "high")}
    assert n["low"] < n["high"] and n["low"] <= 256
