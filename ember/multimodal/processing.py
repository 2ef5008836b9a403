"""Image and video preprocessing without torchvision (PyPI's torchvision does not import beside the CPU torch).

Qwen2-VL images: transformers' own Pillow processor (Qwen2VLImageProcessorPil). Qwen2-VL video and Step3p7
images: the same algorithms as transformers' torchvision processors, on numpy and torch's interpolate, proven equal to their
stored outputs in tests/multimodal/test_processing.py. Inputs are RGB uint8 arrays [H, W, 3] (frames: [T, H, W, 3]).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _normalize(chw_uint8: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    x = chw_uint8.astype(np.float32) * np.float32(1 / 255)
    return (x - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)


def _resize(arr: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3] by torch's antialiased uint8 interpolation: the kernel
    torchvision's resize calls, so the result is bit-identical to transformers' processors (Pillow's own
    filters round ~2% of pixels one step apart)."""
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(height, width), mode=mode, antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


_TORCHVISION: list[bool] = []


def torchvision_available() -> bool:
    """Whether torchvision imports here (PyPI's wheel fails beside the CPU torch build: `torchvision::nms`)."""
    if not _TORCHVISION:
        try:
            import torchvision  # noqa: F401
            _TORCHVISION.append(True)
        except Exception:  # noqa: BLE001 - ImportError, or RuntimeError from a mismatched build
            _TORCHVISION.append(False)
    return _TORCHVISION[0]


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's rule: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen2vl_images(images: list[np.ndarray], processor_config: dict | None = None) -> dict:
    """pixel_values [N, C*2*14*14] (float32) and image_grid_thw [n, 3], by transformers' Pillow processor."""
    cfg = {k: v for k, v in (processor_config or {}).items()
           if k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "size",
                    "image_mean", "image_std")}
    if torchvision_available():  # what AutoImageProcessor picks where torchvision imports (GPU deployments)
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as Processor
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor
    proc = Processor(**cfg)
    out = proc(images=[Image.fromarray(a) for a in images], return_tensors="np")
    return {"pixel_values": np.asarray(out["pixel_values"], dtype=np.float32),
            "image_grid_thw": np.asarray(out["image_grid_thw"], dtype=np.int64)}


def qwen2vl_video(frames: np.ndarray, min_pixels: int = 128 * 28 * 28, max_pixels: int = 28 * 28 * 768,
                  patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2) -> dict:
    """Qwen2VLVideoProcessor on already-sampled frames [T, H, W, 3]: bicubic smart resize, CLIP normalisation,
    the last frame repeated up to a multiple of temporal_patch_size, patches in merge-block order."""
    T, H, W, _ = frames.shape
    h, w = smart_resize(H, W, patch_size * merge_size, min_pixels, max_pixels)
    video = np.stack([_normalize(_resize(f, w, h, "bicubic").transpose(2, 0, 1)) for f in frames])  # [T,C,h,w]
    if pad := -T % temporal_patch_size:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    gt, gh, gw = video.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    C, m, p = video.shape[1], merge_size, patch_size
    x = video.reshape(gt, temporal_patch_size, C, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, C, tp, ph, pw)
    return {"pixel_values_videos": np.ascontiguousarray(x.reshape(gt * gh * gw, C * temporal_patch_size * p * p)),
            "video_grid_thw": np.array([[gt, gh, gw]], dtype=np.int64)}


# ---------------------------------------------------------------- Step3p7
STEP3P7_IMAGE_SIZE, STEP3P7_PATCH_SIZE, STEP3P7_MAX_IMAGE_SIZE = 728, 504, 3024


def step3p7_plan(width: int, height: int, image_size: int = STEP3P7_IMAGE_SIZE, patch_size: int = STEP3P7_PATCH_SIZE,
                 max_image_size: int = STEP3P7_MAX_IMAGE_SIZE):
    """Step3p7ImageProcessor._plan_patches: (global w, h), (crop w, h), window, patches x, patches y, square pad."""
    square = min(width, height) < 32 and max(width / height, height / width) > 4
    if square:
        width = height = max(width, height)
    if max(height, width) > max_image_size:
        scale = max_image_size / max(height, width)
        width, height = int(width * scale), int(height * scale)
    short, long = min(height, width), max(height, width)
    if long <= image_size:
        window = short if long / short > 1.5 else 0
    elif long / short > 4:
        window = min(short, patch_size)
    else:
        window = patch_size
    if window == 0:
        return (width, height), (width, height), 0, 0, 0, square
    crop_w, crop_h = (window * (d // window + (d % window > 0.2 * window)) if d >= window else d
                      for d in (width, height))
    return (width, height), (crop_w, crop_h), window, max(1, crop_w // window), max(1, crop_h // window), square


def step3p7_image(image: np.ndarray, image_size: int = STEP3P7_IMAGE_SIZE, patch_size: int = STEP3P7_PATCH_SIZE,
                  max_image_size: int = STEP3P7_MAX_IMAGE_SIZE) -> dict:
    """One image -> pixel_values [1, 3, S, S], pixel_values_local [n, 3, P, P], num_local_patches n and the
    newline mask (after the last patch of every row but the final one). Bilinear resizes, as the reference."""
    H, W, _ = image.shape
    (gw, gh), (cw, ch), window, nx, ny, square = step3p7_plan(W, H, image_size, patch_size, max_image_size)
    if square:  # extreme aspect: the original at the top-left of a zero square
        side = max(W, H)
        padded = np.zeros((side, side, 3), dtype=np.uint8)
        padded[:H, :W] = image
        image = padded
    glob = _resize(_resize(image, gw, gh, "bilinear"), image_size, image_size, "bilinear")
    out = {"pixel_values": _normalize(glob.transpose(2, 0, 1))[None], "num_local_patches": 0,
           "patch_newline_mask": []}
    if window:
        crop = _resize(image, cw, ch, "bilinear")
        tiles = [crop[r:r + window, c:c + window] for r in range(0, ch, window) for c in range(0, cw, window)]
        out["pixel_values_local"] = np.stack([_normalize(_resize(t, patch_size, patch_size, "bilinear")
                                                         .transpose(2, 0, 1)) for t in tiles])
        out["num_local_patches"] = len(tiles)
        out["patch_newline_mask"] = [c == nx - 1 and r < ny - 1 for r in range(ny) for c in range(nx)]
    return out
