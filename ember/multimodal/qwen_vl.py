"""Qwen2-VL family prompts: each image/video placeholder token expanded to its embedding count, and the
3-D M-RoPE positions of the whole prompt (transformers' Qwen2_5_VLModel.get_rope_index)."""
from __future__ import annotations

import numpy as np

from ember.multimodal.inputs import MMItem, MultimodalInputs


def vision_token_ids(hf_config) -> dict[str, int]:
    return {"image": hf_config.image_token_id, "video": hf_config.video_token_id}


def expand_prompt(ids: list[int], media: list[tuple[str, dict]], hf_config) -> tuple[list[int], MultimodalInputs]:
    """ids: the rendered prompt with one image/video pad token per item, in order; media: (kind, processed data
    with pixel_values and grid_thw [t, h, w] (+ second_per_grid for video)). Returns the expanded ids and the
    request's MultimodalInputs (items at their offsets, M-RoPE positions)."""
    merge = hf_config.vision_config.spatial_merge_size
    pad_of = vision_token_ids(hf_config)
    out, items, it = [], [], iter(media)
    for tok in ids:
        kind = next((k for k, v in pad_of.items() if v == tok), None)
        if kind is None:
            out.append(tok)
            continue
        try:
            got_kind, data = next(it)
        except StopIteration:
            raise ValueError(f"the prompt has more {kind} placeholders than {kind}s were given") from None
        if got_kind != kind:
            raise ValueError(f"placeholder for a {kind} where a {got_kind} was given")
        n = int(np.prod(data["grid_thw"])) // merge ** 2
        items.append(MMItem(kind, len(out), n, data))
        out.extend([tok] * n)
    if next(it, None) is not None:
        raise ValueError("more images/videos than placeholders in the prompt")
    mm = MultimodalInputs(items)
    mm.mrope_positions, mm.mrope_delta = rope_index(len(out), items, hf_config)
    return out, mm


def rope_index(n: int, items: list[MMItem], hf_config) -> tuple[np.ndarray, int]:
    """[3, n] positions: text runs count up on all rows; an item's tokens take (t * interval, h, w) grid
    coordinates offset by the position reached, which then advances by max(h, w)."""
    vc = hf_config.vision_config
    merge, tps = vc.spatial_merge_size, getattr(vc, "tokens_per_second", 1)
    pos = np.zeros((3, n), dtype=np.int64)
    cur, i = 0, 0
    for item in sorted(items, key=lambda x: x.offset):
        k = item.offset - i
        pos[:, i:item.offset] = np.arange(k) + cur
        cur += k
        t, h, w = (int(v) for v in item.data["grid_thw"])
        h, w = h // merge, w // merge
        interval = tps * float(item.data.get("second_per_grid", 1.0)) if item.kind == "video" else 1
        tt = (np.arange(t) * interval).astype(np.int64)
        grid = np.stack(np.meshgrid(tt, np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1) + cur
        pos[:, item.offset:item.offset + item.length] = grid
        cur += max(h, w)
        i = item.offset + item.length
    pos[:, i:] = np.arange(n - i) + cur
    return pos, int(pos.max() + 1 - n) if n else 0


def image_data(image: np.ndarray, processor_config: dict | None = None) -> dict:
    """One RGB image -> this model's item data (transformers' Pillow image processor)."""
    from ember.multimodal.processing import qwen2vl_images
    out = qwen2vl_images([image], processor_config)
    return {"pixel_values": out["pixel_values"], "grid_thw": out["image_grid_thw"][0]}


def video_data(frames: np.ndarray, fps: float, processor_config: dict | None = None) -> dict:
    """Sampled frames [T, H, W, 3] at `fps` per second -> item data; second_per_grid spaces the temporal
    positions (temporal_patch_size frames per grid step)."""
    from ember.multimodal.processing import qwen2vl_video
    cfg = processor_config or {}
    tp = cfg.get("temporal_patch_size", 2)
    size = cfg.get("size") or {}
    out = qwen2vl_video(frames, min_pixels=cfg.get("min_pixels") or size.get("shortest_edge") or 128 * 28 * 28,
                        max_pixels=cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 768,
                        patch_size=cfg.get("patch_size", 14), temporal_patch_size=tp,
                        merge_size=cfg.get("merge_size", 2))
    return {"pixel_values": out["pixel_values_videos"], "grid_thw": out["video_grid_thw"][0],
            "second_per_grid": np.float64(tp / fps)}
