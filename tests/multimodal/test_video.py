"""PyAV decoding and frame sampling: MP4, MOV and MKV; the sampled count follows Qwen2-VL's rule (2 per second,
at least 4, even); too long is refused; a non-video and an unsupported container name their problem."""
import numpy as np
import pytest

from ember.multimodal.fetch import check_video_container
from ember.multimodal.video import MediaError, decode_video, encode_test_video, sample_indices
from tests.tiny_vl import make_frames


@pytest.mark.parametrize("container", ["mp4", "mov", "matroska"])
def test_containers_decode_and_sample(container):
    frames = make_frames(24, 48, 64)  # 6 s at 4 fps -> 12 frames at 2 per second
    data = encode_test_video(frames, fps=4, container=container)
    check_video_container(data)
    v = decode_video(data)
    assert v.frames.shape == (12, 48, 64, 3) and v.duration == pytest.approx(6.0, abs=0.3)
    # every other frame, close to the source (lossy codec)
    assert np.abs(v.frames.astype(int) - frames[::2]).mean() < 12
    assert np.abs(v.frames.astype(int) - frames[1::2]).mean() > np.abs(v.frames.astype(int) - frames[::2]).mean()


def test_sampling_rule():
    assert sample_indices(8, 4.0) == [0, 2, 4, 6]  # 2 s: 4 frames (the minimum)
    assert len(sample_indices(300, 30.0)) == 20 and sample_indices(300, 30.0)[:3] == [0, 15, 30]
    assert len(sample_indices(9000, 30.0, max_frames=64)) == 64
    assert len(sample_indices(7, 30.0)) % 2 == 0


def test_too_long_and_not_a_video():
    data = encode_test_video(make_frames(24, 48, 64), fps=4)
    with pytest.raises(MediaError, match="6.0 s long; the limit is 5 s"):
        decode_video(data, max_seconds=5)
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_video(b"\x00\x00\x00 not a video at all")


def test_unsupported_container():
    import io

    import av
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in make_frames(4, 48, 64):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with pytest.raises(MediaError, match="unsupported video format avi"):
        check_video_container(buf.getvalue())
