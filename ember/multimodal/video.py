"""Video decoding with PyAV (MP4 / MOV / MKV, any codec FFmpeg's libraries read) and frame sampling at a
rate: transformers' Qwen2VLVideoProcessor.sample_frames rule, without torchvision."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np


class MediaError(ValueError):
    """An input that cannot be used: status 400 (or 413 where it is too large); the message names why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Video:
    frames: np.ndarray  # [T, H, W, 3] uint8, the sampled frames
    fps: float  # sampling rate the frames represent (frames per second of the source's timeline)
    duration: float  # seconds


def sample_indices(total: int, source_fps: float, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768,
                   temporal_patch_size: int = 2) -> list[int]:
    """Qwen2VLVideoProcessor.sample_frames with `fps`: frames at `fps` per second of video, at least
    min_frames, a multiple of temporal_patch_size, evenly spaced."""
    max_frames = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    n = total / source_fps * fps
    n = min(max(n, min_frames), max_frames, total)
    n = max(temporal_patch_size, math.floor(n / temporal_patch_size) * temporal_patch_size)
    n = min(n, total)
    return [int(i) for i in np.arange(0, total, total / n)][:n]


def decode_video(data: bytes, max_seconds: float = 300.0, fps: float = 2.0, max_frames: int = 768,
                 min_frames: int = 4, temporal_patch_size: int = 2) -> Video:
    """Decode and sample. Raises MediaError naming the problem (undecodable, no video stream, too long)."""
    import av
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # noqa: BLE001 - FFmpeg's many error types all mean "not a video we can read"
        raise MediaError(f"video could not be decoded: {e}") from None
    with container:
        if not container.streams.video:
            raise MediaError("video has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        duration = (float(stream.duration * stream.time_base) if stream.duration else
                    container.duration / 1e6 if container.duration else 0.0)
        if duration > max_seconds:
            raise MediaError(f"video is {duration:.1f} s long; the limit is {max_seconds:g} s", 400)
        # frames are converted to RGB only where sampled (a 5-minute clip decodes ~9000 frames); the count comes
        # from the container, or the duration, and is corrected if decoding finds fewer
        expected = stream.frames or int(round(duration * rate))
        want = set(sample_indices(expected, rate, fps, min_frames, max_frames, temporal_patch_size)) if expected else None
        kept, n = {}, 0
        try:
            for n, frame in enumerate(container.decode(stream), start=1):
                if want is None or (n - 1) in want:
                    kept[n - 1] = frame.to_ndarray(format="rgb24")
        except Exception as e:  # noqa: BLE001
            raise MediaError(f"video could not be decoded: {e}") from None
    if not n:
        raise MediaError("video has no frames")
    duration = duration or n / rate
    if duration > max_seconds:
        raise MediaError(f"video is {duration:.1f} s long; the limit is {max_seconds:g} s", 400)
    if want is None or n != expected:  # the sampling over the frames that really are there
        idx = [i for i in sample_indices(n, rate, fps, min_frames, max_frames, temporal_patch_size) if i in kept]
        if want is not None and len(idx) < 2:
            idx = sorted(kept)
        idx = idx[:len(idx) // temporal_patch_size * temporal_patch_size] or idx[:1]
    else:
        idx = sorted(kept)
    return Video(np.stack([kept[i] for i in idx]), fps=len(idx) / max(duration, 1e-6), duration=duration)


def encode_test_video(frames: np.ndarray, fps: int = 4, container: str = "mp4", codec: str = "mpeg4") -> bytes:
    """frames [T, H, W, 3] uint8 -> a video file's bytes (tests, docs examples)."""
    import av
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return buf.getvalue()
