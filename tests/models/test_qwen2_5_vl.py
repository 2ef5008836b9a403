"""Acceptance 1 for Qwen2.5-VL: with one image, two images and a short video, ember's logits at every prompt
position are within 2e-3 of transformers' (same processor outputs) and 16 greedy tokens are identical."""
import json
import os
import uuid

import numpy as np
import pytest
import torch

from ember.engine.io_struct import GenerateReq
from ember.engine.sampling_params import SamplingParams
from ember.multimodal.qwen_vl import expand_prompt, image_data, video_data
from ember.multimodal.video import decode_video, encode_test_video
from tests.models.test_vs_transformers import LOGIT_TOL, assert_same_greedy
from tests.tiny_vl import make_frames, make_image, tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl") / "qwen2_5_vl")


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


class WithMedia:
    """The reference called on token ids alone (as assert_same_greedy does), with the request's media."""

    def __init__(self, model, cfg, media):
        self.model, self.cfg, self.media = model, cfg, media

    def __call__(self, ids):
        kw = {"mm_token_type_ids": ((ids == self.cfg.image_token_id).int() + 2 * (ids == self.cfg.video_token_id).int())}
        imgs = [d for k, d in self.media if k == "image"]
        vids = [d for k, d in self.media if k == "video"]
        if imgs:
            kw["pixel_values"] = torch.from_numpy(np.concatenate([d["pixel_values"] for d in imgs]))
            kw["image_grid_thw"] = torch.tensor(np.stack([d["grid_thw"] for d in imgs]))
        if vids:
            kw["pixel_values_videos"] = torch.from_numpy(np.concatenate([d["pixel_values"] for d in vids]))
            kw["video_grid_thw"] = torch.tensor(np.stack([d["grid_thw"] for d in vids]))
            kw["second_per_grid_ts"] = torch.tensor([float(d["second_per_grid"]) for d in vids])
        with torch.no_grad():
            return self.model(input_ids=ids, **kw)


def greedy_reference(ref, ids, n):
    out = []
    for _ in range(n):  # full recompute each step: positions of generated tokens by transformers' own rule
        out.append(int(ref(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def run(engine, ids, mm, n):
    core = engine.core
    rid = uuid.uuid4().hex
    core.add_request(GenerateReq(rid, ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True), mm=mm))
    got, cached = [], None
    while True:
        for out in core.step():
            if out.rid == rid:
                got += out.new_token_ids
                if out.finished:
                    return got, out
    return got, cached


def media_for(case, model_dir):
    pp = json.loads((model_dir / "preprocessor_config.json").read_text())
    if case == "one image":
        return [("image", image_data(make_image(100, 60, 1), pp))]
    if case == "two images":
        return [("image", image_data(make_image(100, 60, 1), pp)), ("image", image_data(make_image(50, 90, 2), pp))]
    video = decode_video(encode_test_video(make_frames(8, 90, 120), fps=4))  # a real MP4 through PyAV
    return [("video", video_data(video.frames, video.fps, pp))]


@pytest.mark.parametrize("case", ["one image", "two images", "video"])
def test_logits_and_16_greedy_tokens_match(case, vl_engine, reference, model_dir):
    media = media_for(case, model_dir)
    parts = [{"type": k} for k, _ in media] + [{"type": "text", "text": f"describe the {case}"}]
    ids = vl_engine.tokenizer.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    ids, mm = expand_prompt(ids, media, reference.config)
    assert all(it.length >= 6 for it in mm.items)  # several 2x2 attention windows per item
    ref = WithMedia(reference, reference.config, media)
    theirs = ref(torch.tensor([ids])).logits[0].float()
    ours = vl_engine.core.prompt_logits(ids, mm).cpu()
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < LOGIT_TOL * max(1.0, theirs.abs().max().item() / 10), f"max abs logit diff {diff}"
    got, out = run(vl_engine, ids, mm, 16)
    assert out.prompt_tokens == len(ids)
    assert_same_greedy(got, greedy_reference(ref, ids, 16), ref, ids)


def pools_balance(core):
    for g, pool in core.stats()["pools"].items():
        assert pool["free"] + pool["cached"] == pool["total"], (g, pool)


def test_prefix_cache_keys_images_by_content(vl_engine, model_dir):
    """The same image again hits the cache through its tokens; another image of the same size (same token
    count, same placeholder ids) stops the match where it starts."""
    pp = json.loads((model_dir / "preprocessor_config.json").read_text())
    text = [{"type": "text", "text": "a long enough question about this picture, to fill pages " * 2}]

    def request(seed):
        media = [("image", image_data(make_image(100, 60, seed), pp))]
        ids = vl_engine.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}] + text}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
        return expand_prompt(ids, media, vl_engine.core.hf_config)
    vl_engine.flush_cache()
    ids, mm = request(1)
    _, first = run(vl_engine, ids, mm, 4)
    ids2, mm2 = request(1)
    _, again = run(vl_engine, ids2, mm2, 4)
    item = mm.items[0]
    page = vl_engine.core.runner.kv_cache.page_size
    assert first.cached_tokens == 0 and again.cached_tokens >= (len(ids) - 1) // page * page > item.offset + item.length
    ids3, mm3 = request(2)
    assert ids3 == ids and mm3.items[0].key_id != item.key_id  # same tokens; only the key tells them apart
    _, other = run(vl_engine, ids3, mm3, 4)
    assert other.cached_tokens <= item.offset
    pools_balance(vl_engine.core)


def run_together(engine, cases, n):
    core, rids = engine.core, []
    for ids, mm in cases:
        rids.append(uuid.uuid4().hex)
        core.add_request(GenerateReq(rids[-1], ids, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True),
                                     mm=mm))
    got, done = {r: [] for r in rids}, set()
    while len(done) < len(rids):
        for out in core.step():
            got[out.rid] += out.new_token_ids
            if out.finished:
                done.add(out.rid)
    return [got[r] for r in rids]


def three_cases(vl_engine, model_dir):
    """(ids, mm) of three requests: two images, a video, one image."""
    cases = []
    for case in ("two images", "video", "one image"):
        media = media_for(case, model_dir)
        parts = [{"type": k} for k, _ in media] + [{"type": "text", "text": f"describe the {case}"}]
        ids = vl_engine.tokenizer.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
        cases.append(expand_prompt(ids, media, vl_engine.core.hf_config))
    return cases


def test_chunked_prefill_inside_images_and_batched_encoding(model_dir, vl_engine):
    """16-token prefill chunks split the images and the video; three requests (two images, a video, one image)
    run in one batch (their items encoded together): the same greedy tokens as unchunked, one at a time."""
    from ember import Engine
    chunked = Engine(model_path=str(model_dir), dtype="float32", device=os.environ.get("EMBER_TEST_DEVICE", "auto"),
                     cpu_kv_cache_gb=0.25, chunked_prefill_size=16, disable_radix_cache=True)
    try:
        cases = three_cases(vl_engine, model_dir)
        assert any(it.offset % 16 + it.length > 16 for _, mm in cases for it in mm.items)  # a chunk splits an item
        expected = [run(vl_engine, ids, mm, 12)[0] for ids, mm in cases]
        vl_engine.flush_cache()
        for eng in (chunked, vl_engine):  # chunked; then all three in one batch of the unchunked engine
            calls = []
            encode = eng.core.runner.model.encode_items
            eng.core.runner.model.encode_items = lambda items: calls.append(len(items)) or encode(items)
            try:
                assert run_together(eng, cases, 12) == expected
            finally:
                del eng.core.runner.model.encode_items
            pools_balance(eng.core)
        assert calls == [4]  # the unchunked batch: the four items of three requests in one encoder pass
    finally:
        chunked.shutdown()


def test_overlapped_decode_of_image_and_video_requests(model_dir, vl_engine):
    """Overlap scheduling (on by default on CUDA; forced on here) takes the decode steps of image and video requests:
    their M-RoPE positions do not depend on the tokens. The same greedy tokens as without it."""
    from ember.engine.overlap import OverlapStep
    core, cases = vl_engine.core, three_cases(vl_engine, model_dir)
    vl_engine.flush_cache()
    want = run_together(vl_engine, cases, 10)
    vl_engine.flush_cache()
    core.overlap, launched = OverlapStep(core), []
    launch = core.overlap.launch
    core.overlap.launch = lambda batch: launched.append(sum(r.mm is not None for r in batch.reqs)) or launch(batch)
    try:
        assert run_together(vl_engine, cases, 10) == want
        while core.has_work():  # (the last step in flight: its requests have all finished)
            core.step()
    finally:
        core.overlap = None
    assert len(launched) >= 8 and max(launched) == 3
    pools_balance(core)
