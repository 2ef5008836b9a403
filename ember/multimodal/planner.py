"""Chat messages with image/video parts -> a text-only conversation (each part replaced by the served model's
placeholder text, so any chat template renders it) plus the decoded, preprocessed media in prompt order; and,
once the prompt is tokenized, its expansion into the model's placeholder layout (ember/multimodal/*_prompt).

Per model: Qwen2-VL family (qwen2_vl, qwen2_5_vl): images and native video. Step3p7: images (global view plus
local crops; detail "low" keeps the global view only) and video as sampled frames, each an image of its own.
"""
from __future__ import annotations

import asyncio
import json
import pathlib

from ember.multimodal.fetch import MediaLimits, load_image, load_video
from ember.multimodal.video import MediaError

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
STEP_FRAMES = 8  # frames a video becomes for a model without native video (each a global 728 px view)


class MediaPlanner:
    def __init__(self, model_dir, tokenizer, model_name: str):
        from transformers import AutoConfig
        self.cfg = AutoConfig.from_pretrained(model_dir)
        self.model_type = getattr(self.cfg, "model_type", None)
        self.tokenizer, self.model_name = tokenizer, model_name
        pp = pathlib.Path(model_dir) / "preprocessor_config.json"
        self.pp = json.loads(pp.read_text()) if pp.exists() else {}

    @property
    def takes_images(self) -> bool:
        return self.model_type in QWEN_TYPES or self.model_type == "step3p7"

    @property
    def native_video(self) -> bool:
        return self.model_type in QWEN_TYPES

    def placeholder(self, kind: str) -> str:
        if self.model_type == "step3p7":
            return "<im_patch>"
        return f"<|vision_start|><|{'image' if kind == 'image' else 'video'}_pad|><|vision_end|>"

    # ------------------------------------------------------------------ messages
    def split_messages(self, messages: list, max_items: int) -> tuple[list, list[tuple[str, str, str, str]]]:
        """(messages with media parts as placeholder text parts, [(kind, url, detail, param)] in order)."""
        out, refs = [], []
        for i, m in enumerate(messages or []):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, list):
                out.append(m)
                continue
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("image_url", "video_url"):
                    parts.append(part)
                    continue
                param = f"messages.{i}.content.{j}.{kind}"
                if not self.takes_images:
                    raise MediaError(f"model {self.model_name} does not accept image or video inputs (text only)")
                spec = part.get(kind)
                spec = {"url": spec} if isinstance(spec, str) else spec
                if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                    raise MediaError(f"{param}.url must be a string")
                detail = spec.get("detail") or "auto"
                if detail not in ("low", "high", "auto"):
                    raise MediaError(f"{param}.detail must be low, high or auto, got {detail!r}")
                media = "image" if kind == "image_url" else "video"
                refs.append((media, spec["url"], detail, param))
                if len(refs) > max_items:
                    raise MediaError(f"too many images/videos in one request: the limit is {max_items} "
                                     "(--max-images-per-request)")
                if media == "video" and not self.native_video:
                    parts.append({"type": "text", "text": self.placeholder("image") * STEP_FRAMES})
                else:
                    parts.append({"type": "text", "text": self.placeholder(media)})
            out.append(dict(m, content=parts))
        return out, refs

    async def load(self, refs, limits: MediaLimits, file_store=None) -> list[tuple[str, dict]]:
        """Fetch, decode and preprocess every item (concurrently); [(kind, model data)] in prompt order."""
        async def one(kind, url, detail, param):
            try:
                if kind == "image":
                    img = await load_image(url, limits, file_store)
                    return [await asyncio.to_thread(self.image_data, img, detail)]
                video = await load_video(url, limits, file_store,
                                         max_frames=768 if self.native_video else STEP_FRAMES)
                if self.native_video:
                    return [await asyncio.to_thread(self.video_data, video)]
                frames = [video.frames[k] for k in range(len(video.frames))][:STEP_FRAMES]
                frames += [frames[-1]] * (STEP_FRAMES - len(frames))  # (the placeholder count is fixed)
                return [await asyncio.to_thread(self.image_data, f, "low") for f in frames]
            except MediaError as e:
                raise MediaError(f"{param}: {e}", e.status) from None
        groups = await asyncio.gather(*(one(*r) for r in refs))
        return [x for g in groups for x in g]

    # ------------------------------------------------------------------ per model
    def image_data(self, image, detail: str) -> tuple[str, dict]:
        if self.model_type == "step3p7":
            from ember.multimodal.step3p7_prompt import image_data
            data = image_data(image, self.pp)
            if detail == "low":  # the global view alone
                data = {k: v for k, v in data.items() if k not in ("pixel_values_local",)}
                data["num_local_patches"], data["patch_newline_mask"] = 0, data["patch_newline_mask"][:0]
            return "image", data
        from ember.multimodal.qwen_vl import image_data
        pp = dict(self.pp)
        if detail == "low":  # at most 256 merged tokens (64 at the processor's 28 px per token side)
            pp["max_pixels"] = min(pp.get("max_pixels") or (pp.get("size") or {}).get("longest_edge") or 12845056,
                                   256 * 28 * 28)
            pp.pop("size", None)
        return "image", image_data(image, pp)

    def video_data(self, video) -> tuple[str, dict]:
        from ember.multimodal.qwen_vl import video_data
        return "video", video_data(video.frames, video.fps, self.pp)

    def expand(self, ids: list[int], media):
        if self.model_type == "step3p7":
            from ember.multimodal.step3p7_prompt import expand_prompt
            return expand_prompt(ids, media, self.tokenizer, self.pp)
        from ember.multimodal.qwen_vl import expand_prompt
        return expand_prompt(ids, media, self.cfg)
