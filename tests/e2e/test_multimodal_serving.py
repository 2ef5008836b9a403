"""Seed 004 (step-3.7-flash multimodal guide) as written, against `ember serve` on a tiny random-weight
Step3p7 over real HTTP with the official openai SDK (and the Anthropic SDK for an image block): image URLs
(served from 127.0.0.1, allowed by --allow-private-media-urls), base64 data URLs, Files API uploads used as
stepfile://, two images in one message, detail low vs high, an MP4 made with PyAV; usage counts the media
tokens; the prefix cache reuses an image; errors name their problem while a text stream carries on."""
from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest

from ember.multimodal.video import encode_test_video
from tests.tiny_vl import make_frames, make_image

MODEL = "step-3.7-flash"
GREEDY = {"temperature": 0, "max_tokens": 8}


def jpeg(w, h, seed) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(make_image(w, h, seed)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def encoded(data: bytes, fmt: str) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime="image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def media_site():
    """A plain HTTP server on 127.0.0.1 with sample.jpg, other.jpg and demo.mp4 (404 for anything else)."""
    files = {"/sample.jpg": (jpeg(300, 200, 1), "image/jpeg"), "/other.jpg": (jpeg(300, 200, 7), "image/jpeg"),
             "/demo.mp4": (encode_test_video(make_frames(8, 90, 120), fps=4), "video/mp4")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, ctype = files.get(self.path, (None, None))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", files
    srv.shutdown()


@pytest.fixture(scope="module")
def server(e2e_servers, tmp_path_factory):
    from tests.tiny_vl import tiny_step3p7
    path = tiny_step3p7(tmp_path_factory.getbasetemp() / "tiny-step3p7-e2e")
    s = e2e_servers.get("step3p7", ["--model-path", str(path), "--served-model-name", MODEL,
                                    "--allow-private-media-urls", "--max-images-per-request", "4",
                                    "--max-image-mb", "1", "--max-video-seconds", "4"])
    yield s
    e2e_servers.stop("step3p7")


def chat(client, parts, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                          **{**GREEDY, **kw})


def text_only_tokens(client, text, parts=1):
    """Prompt tokens of the same message with each media part an empty text part (same separators)."""
    return chat(client, [{"type": "text", "text": text}] + [{"type": "text", "text": ""}] * parts).usage.prompt_tokens


IMAGE_TOKENS = 6 * (1 + 4 + 1) + 1 + (1 + 9 + 1)  # 300x200: 6 crops (a row break after the 3rd) + the global view


def test_image_url_from_a_local_server(server, media_site):
    client = server.openai()
    url, _ = media_site
    r = chat(client, [{"type": "text", "text": "这张图片里是什么?请详细描述一下。"},
                      {"type": "image_url", "image_url": {"url": f"{url}/sample.jpg"}}])
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens == text_only_tokens(client, "这张图片里是什么?请详细描述一下。") + IMAGE_TOKENS


def test_base64_and_stepfile_and_the_same_image_is_cached(server, media_site, tmp_path):
    client = server.openai()
    _, files = media_site
    body = files["/sample.jpg"][0]
    a = chat(client, [{"type": "text", "text": "描述这张图片"}, {"type": "image_url", "image_url": {"url": data_url(body)}}])
    path = tmp_path / "sample.jpg"
    path.write_bytes(body)
    f = client.files.create(file=open(path, "rb"), purpose="storage")
    b = chat(client, [{"type": "text", "text": "描述这张图片"}, {"type": "image_url", "image_url": {"url": f"stepfile://{f.id}"}}])
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content  # the same pixels, greedy
    assert b.usage.prompt_tokens_details.cached_tokens >= b.usage.prompt_tokens - 16  # all but the last page
    c = chat(client, [{"type": "text", "text": "描述这张图片"}, {"type": "image_url", "image_url": {"url": f.id}}])
    assert c.usage.prompt_tokens == a.usage.prompt_tokens  # a bare file id works too


def test_different_images_give_different_outputs(server, media_site):
    client = server.openai()
    url, _ = media_site
    outs = [chat(client, [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": f"{url}/{n}"}}],
                 logprobs=True, top_logprobs=5)
            for n in ("sample.jpg", "other.jpg")]
    first = [[(t.token, round(t.logprob, 4)) for t in o.choices[0].logprobs.content[0].top_logprobs] for o in outs]
    assert first[0] != first[1]
    assert outs[0].usage.prompt_tokens_details.cached_tokens < outs[0].usage.prompt_tokens - 16 or \
        outs[1].usage.prompt_tokens_details.cached_tokens < outs[1].usage.prompt_tokens - 16


def test_two_images_and_detail_low_vs_high(server, media_site):
    client = server.openai()
    url, _ = media_site
    one = chat(client, [{"type": "text", "text": "比较这两张图片的差异"},
                        {"type": "image_url", "image_url": {"url": f"{url}/sample.jpg"}}])
    two = chat(client, [{"type": "text", "text": "比较这两张图片的差异"},
                        {"type": "image_url", "image_url": {"url": f"{url}/sample.jpg"}},
                        {"type": "image_url", "image_url": {"url": f"{url}/other.jpg"}}])
    assert one.usage.prompt_tokens == text_only_tokens(client, "比较这两张图片的差异") + IMAGE_TOKENS
    assert two.usage.prompt_tokens == text_only_tokens(client, "比较这两张图片的差异", 2) + 2 * IMAGE_TOKENS
    low, high = (chat(client, [{"type": "text", "text": "x"},
                               {"type": "image_url", "image_url": {"url": f"{url}/sample.jpg", "detail": d}}])
                 for d in ("low", "high"))
    assert low.usage.prompt_tokens < high.usage.prompt_tokens


def test_video_url_mp4(server, media_site):
    client = server.openai()
    url, _ = media_site
    r = chat(client, [{"type": "text", "text": "请概括这个视频的主要内容,并提取关键信息点。"},
                      {"type": "video_url", "video_url": {"url": f"{url}/demo.mp4"}}])
    base = text_only_tokens(client, "请概括这个视频的主要内容,并提取关键信息点。")
    assert r.usage.prompt_tokens == base + 8 * (1 + 9 + 1)  # 8 sampled frames, each a global view


def test_anthropic_image_block(server, media_site):
    import anthropic
    _, files = media_site
    client = anthropic.Anthropic(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    msg = client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                     "data": base64.b64encode(files["/sample.jpg"][0]).decode()}},
        {"type": "text", "text": "What is in this image?"}]}])
    assert msg.content and msg.usage.input_tokens > 40


@pytest.mark.parametrize("part, status, words", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}},
     400, "could not be decoded"),
    ({"type": "image_url", "image_url": {"url": "BMP"}}, 400, "unsupported image format"),
    ({"type": "image_url", "image_url": {"url": "/missing.jpg"}}, 400, "HTTP 404"),
    ({"type": "image_url", "image_url": {"url": "BIG"}}, 413, "limit"),
    ({"type": "video_url", "video_url": {"url": "LONG"}}, 400, "long"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.jpg"}}, 400, "unsupported media URL"),
    ({"type": "image_url", "image_url": {"url": "stepfile://file-doesnotexist"}}, 400, "no such file"),
])
def test_errors_name_the_problem_while_a_stream_continues(server, media_site, part, status, words):
    import openai
    client = server.openai()
    url, files = media_site
    spec = part.get("image_url") or part["video_url"]
    if spec["url"] == "BMP":
        spec["url"] = data_url(encoded(files["/sample.jpg"][0], "BMP"), "image/bmp")
    elif spec["url"] == "BIG":  # > --max-image-mb 1
        spec["url"] = data_url(np.random.RandomState(0).bytes(1_600_000))
    elif spec["url"] == "LONG":  # 6 s > --max-video-seconds 4
        spec["url"] = data_url(encode_test_video(make_frames(24, 48, 64), fps=4), "video/mp4")
    elif spec["url"].startswith("/"):
        spec["url"] = url + spec["url"]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count to ten"}],
                                            max_tokens=24, temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, [{"type": "text", "text": "x"}, part])
    assert e.value.status_code == status and words in e.value.message, e.value.message
    rest = [c for c in stream]
    assert first is not None and rest[-1].choices[0].finish_reason == "length"


def test_too_many_images(server, media_site):
    import openai
    url, _ = media_site
    parts = [{"type": "image_url", "image_url": {"url": f"{url}/sample.jpg"}}] * 5
    with pytest.raises(openai.BadRequestError) as e:
        chat(server.openai(), [{"type": "text", "text": "x"}, *parts])
    assert "too many images" in e.value.message and "4" in e.value.message


def test_pool_accounting_after_the_mixed_run(server):
    """After images, videos, errors and text streams (the tests above): every page is free or held by the
    prefix cache, none leaked by a request."""
    import time
    deadline = time.monotonic() + 30
    while True:
        stats = server.stats()
        if not stats.get("running") and not stats.get("waiting"):
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    for group, pool in stats["pools"].items():
        assert pool["free"] + pool["cached"] == pool["total"], (group, pool)
    server.assert_alive()
