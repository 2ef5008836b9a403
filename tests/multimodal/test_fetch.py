"""Media inputs in the API process: the address guard refuses non-public hosts before any connection,
data: URLs and their limits, GIF/WebP decoding, unsupported formats, and a text-only model named in its 400."""
import asyncio
import base64
import io
import socket
import threading

import numpy as np
import pytest

from ember.multimodal.fetch import MediaLimits, address_refused, decode_image, fetch_url, load_bytes
from ember.multimodal.video import MediaError
from tests.tiny_vl import make_image


class CountingListener:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port, self.accepted, self.stop = self.sock.getsockname()[1], 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("ip, why", [("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
                                     ("169.254.169.254", "link-local"), ("::1", "loopback"), ("0.0.0.0", "private"),
                                     ("::ffff:127.0.0.1", "loopback"), ("fd00:ec2::254", "private"),
                                     ("100.64.0.1", "not a public address")])
def test_address_guard_classifies(ip, why):
    assert why in (address_refused(ip) or "")


def test_public_addresses_pass():
    assert address_refused("93.184.216.34") is None and address_refused("2606:4700::1111") is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254"])
def test_refused_without_connecting(host):
    """The guard resolves first and refuses: the listener (when the host is ours) never sees a connection."""
    listener = CountingListener()
    try:
        with pytest.raises(MediaError) as e:
            asyncio.run(fetch_url(f"http://{host}:{listener.port}/a.jpg", 1 << 20, MediaLimits(fetch_timeout=2)))
        assert "refused" in str(e.value) and "--allow-private-media-urls" in str(e.value)
        assert listener.accepted == 0
    finally:
        listener.close()


def test_allowed_with_the_flag_connects():
    listener = CountingListener()
    try:
        with pytest.raises(MediaError):  # the listener closes at once: a failed fetch, but a connection was made
            asyncio.run(fetch_url(f"http://127.0.0.1:{listener.port}/a.jpg", 1 << 20,
                                  MediaLimits(fetch_timeout=2, allow_private=True)))
        assert listener.accepted >= 1
    finally:
        listener.close()


def test_data_urls_and_size_limit():
    data, mime = asyncio.run(load_bytes("data:image/png;base64," + base64.b64encode(b"abc").decode(), 10,
                                        MediaLimits()))
    assert data == b"abc" and mime == "image/png"
    with pytest.raises(MediaError) as e:
        asyncio.run(load_bytes("data:image/png;base64," + base64.b64encode(b"x" * 100).decode(), 10, MediaLimits()))
    assert e.value.status == 413
    with pytest.raises(MediaError, match="base64"):
        asyncio.run(load_bytes("data:image/png,abc", 10, MediaLimits()))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_image_formats(fmt):
    from PIL import Image
    img = make_image(40, 30, 3)
    buf = io.BytesIO()
    if fmt == "GIF":  # two frames: the first is taken
        frames = [Image.fromarray(img), Image.fromarray(255 - img)]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    else:
        Image.fromarray(img).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = decode_image(buf.getvalue())
    assert out.shape == (30, 40, 3)
    if fmt in ("PNG", "WEBP"):
        np.testing.assert_array_equal(out, img)
    if fmt == "GIF":  # palette quantised, but the first frame, not the inverted second
        assert np.abs(out.astype(int) - img).mean() < np.abs(out.astype(int) - (255 - img)).mean()


def test_unsupported_and_undecodable():
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(make_image(8, 8, 0)).save(buf, format="BMP")
    with pytest.raises(MediaError, match="unsupported image format BMP"):
        decode_image(buf.getvalue())
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(b"\x89PNG garbage")


def test_text_only_model_is_named(tmp_path):
    from ember.multimodal.planner import MediaPlanner
    from tests.tiny_models import tiny_model
    from transformers import AutoTokenizer
    path = tiny_model("qwen3", tmp_path / "q3")
    planner = MediaPlanner(path, AutoTokenizer.from_pretrained(path), "my-text-model")
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(MediaError, match="model my-text-model does not accept image"):
        planner.split_messages(msgs, 4)


def test_limits_from_server_flags():
    from ember.server_args import ServerArgs
    default = MediaLimits.from_args(ServerArgs())
    assert not default.allow_private and default.max_video_bytes == 128 * 2**20 and default.max_video_seconds == 300
    flagged = MediaLimits.from_args(ServerArgs(allow_private_media_urls=True, max_video_mb=4, max_video_seconds=2,
                                               max_images_per_request=3, max_image_mb=1))
    assert flagged.allow_private and flagged.max_video_bytes == 4 * 2**20 and flagged.max_video_seconds == 2
    assert flagged.max_items == 3 and flagged.max_image_bytes == 2**20
