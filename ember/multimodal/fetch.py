"""Image and video inputs, in the API process: a reference (http(s) URL, data: URL, `stepfile://<id>` or a
bare `file-…` id from the Files API) turned into bytes, then decoded (Pillow: JPEG/PNG/GIF/WebP; PyAV:
MP4/MOV/MKV). Every failure is a MediaError naming the problem (400, or 413 for size).

The address guard: a URL's host is resolved first and every address it resolves to must be public (not
loopback, private, link-local - the cloud metadata address 169.254.169.254 included -, reserved, multicast
or unspecified) before any connection is made; redirects are followed by hand, each hop checked the same
way. `--allow-private-media-urls` turns the guard off (tests fetch from 127.0.0.1).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import numpy as np

from ember.multimodal.video import MediaError, Video, decode_video

IMAGE_FORMATS = {"JPEG", "PNG", "GIF", "WEBP"}
VIDEO_CONTAINERS = ("mp4", "mov", "matroska", "webm")  # PyAV format names (mp4 and mov share "mov,mp4,...")


@dataclass
class MediaLimits:
    max_image_bytes: int = 20 * 2**20
    max_video_bytes: int = 128 * 2**20
    max_video_seconds: float = 300.0
    fetch_timeout: float = 15.0
    max_redirects: int = 3
    allow_private: bool = False
    max_items: int = 16  # images + videos per request

    @classmethod
    def from_args(cls, args) -> "MediaLimits":
        d = cls()
        return cls(max_image_bytes=int(getattr(args, "max_image_mb", None) or d.max_image_bytes / 2**20) * 2**20,
                   max_video_bytes=int(getattr(args, "max_video_mb", None) or d.max_video_bytes / 2**20) * 2**20,
                   max_video_seconds=float(getattr(args, "max_video_seconds", None) or d.max_video_seconds),
                   fetch_timeout=float(getattr(args, "media_fetch_timeout", None) or d.fetch_timeout),
                   allow_private=bool(getattr(args, "allow_private_media_urls", False)),
                   max_items=int(getattr(args, "max_images_per_request", None) or d.max_items))


# ---------------------------------------------------------------------------- the address guard
def address_refused(ip: str) -> str | None:
    """Why this address may not be fetched from (None: it is public)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    for what, bad in (("loopback", addr.is_loopback), ("link-local (cloud metadata)", addr.is_link_local),
                      ("private", addr.is_private), ("reserved", addr.is_reserved),
                      ("multicast", addr.is_multicast), ("unspecified", addr.is_unspecified)):
        if bad:
            return what
    return None if addr.is_global else "not a public address"


async def check_host(host: str, port: int) -> None:
    """Resolve `host` and refuse it if any address it resolves to is not public (no connection is made)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MediaError(f"media URL host {host!r} does not resolve: {e.strerror}") from None
    for info in infos:
        why = address_refused(info[4][0])
        if why:
            raise MediaError(f"media URL refused: {host} resolves to {info[4][0]}, a {why} address "
                             "(the server fetches only public addresses unless started with --allow-private-media-urls)")


async def fetch_url(url: str, max_bytes: int, limits: MediaLimits) -> tuple[bytes, str]:
    """(body, content type) of an http(s) URL: guard checked per hop, redirects limited, size limited while
    streaming (413), timeouts and non-200 answers as MediaErrors."""
    import httpx
    for _ in range(limits.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"unsupported media URL {url[:100]!r}: expected http(s)://, data:, or stepfile://")
        if not limits.allow_private:
            await check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        try:
            async with httpx.AsyncClient(timeout=limits.fetch_timeout, follow_redirects=False) as client:
                async with client.stream("GET", url) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(url, resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        raise MediaError(f"fetching media URL {url[:200]} failed: HTTP {resp.status_code}")
                    declared = int(resp.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise MediaError(f"media at {url[:200]} is {declared} bytes; the limit is {max_bytes}", 413)
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise MediaError(f"media at {url[:200]} is larger than the limit of {max_bytes} bytes", 413)
                    return bytes(body), resp.headers.get("content-type", "")
        except httpx.TimeoutException:
            raise MediaError(f"fetching media URL {url[:200]} timed out after {limits.fetch_timeout:g} s") from None
        except httpx.HTTPError as e:
            raise MediaError(f"fetching media URL {url[:200]} failed: {e}") from None
    raise MediaError(f"media URL {url[:200]} redirected more than {limits.max_redirects} times")


def decode_data_url(url: str, max_bytes: int) -> tuple[bytes, str]:
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise MediaError("data: URLs must be base64 (data:<type>;base64,<data>)")
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError(f"data: URL holds more than the limit of {max_bytes} bytes", 413)
    try:
        return base64.b64decode(payload, validate=False), head[:-len(";base64")]
    except (binascii.Error, ValueError):
        raise MediaError("data: URL is not valid base64") from None


async def load_bytes(ref: str, max_bytes: int, limits: MediaLimits, file_store=None) -> tuple[bytes, str]:
    from ember.api.file_store import FileNotFound, is_file_reference, read_file_reference
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError("media url must be a non-empty string")
    ref = ref.strip()
    if ref.startswith("data:"):
        return decode_data_url(ref, max_bytes)
    if is_file_reference(ref) or ref.startswith("stepfile://"):
        if file_store is None:
            raise MediaError("stepfile:// references need the Files API, which is off on this server")
        try:
            data, ctype = await asyncio.to_thread(read_file_reference, file_store, ref)
        except FileNotFound as e:
            raise MediaError(str(e)) from None
        if len(data) > max_bytes:
            raise MediaError(f"file {ref} is {len(data)} bytes; the limit is {max_bytes}", 413)
        return data, ctype
    return await fetch_url(ref, max_bytes, limits)


# ---------------------------------------------------------------------------- decoding
def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a JPEG/PNG/GIF (first frame)/WebP."""
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        if fmt not in IMAGE_FORMATS:
            raise MediaError(f"unsupported image format {fmt}: JPEG, PNG, GIF and WebP are accepted")
        im.seek(0)
        return np.asarray(im.convert("RGB"))
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"image could not be decoded: {e}") from None


def check_video_container(data: bytes) -> None:
    import av
    try:
        with av.open(io.BytesIO(data), mode="r") as c:
            name = c.format.name
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"video could not be decoded: {e}") from None
    if not any(v in name.split(",") for v in VIDEO_CONTAINERS):
        raise MediaError(f"unsupported video format {name}: MP4, MOV (QuickTime) and MKV (Matroska) are accepted")


async def load_image(ref: str, limits: MediaLimits, file_store=None) -> np.ndarray:
    data, _ = await load_bytes(ref, limits.max_image_bytes, limits, file_store)
    return await asyncio.to_thread(decode_image, data)


async def load_video(ref: str, limits: MediaLimits, file_store=None, fps: float = 2.0,
                     max_frames: int = 768) -> Video:
    data, _ = await load_bytes(ref, limits.max_video_bytes, limits, file_store)

    def work():
        check_video_container(data)
        return decode_video(data, limits.max_video_seconds, fps=fps, max_frames=max_frames)
    return await asyncio.to_thread(work)
