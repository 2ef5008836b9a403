"""Step3p7 prompts: each image's single <im_patch> token (as the chat template renders it) expanded as
Step3p7Processor.replace_image_token does: per local crop <patch_start> <im_patch>*P <patch_end> (and
<patch_newline> after the last crop of every row but the last), then <im_start> <im_patch>*G <im_end>."""
from __future__ import annotations

import numpy as np

from ember.multimodal.inputs import MMItem, MultimodalInputs

SPECIAL = ("<im_patch>", "<patch_start>", "<patch_end>", "<patch_newline>", "<im_start>", "<im_end>")
DOWNSAMPLE = 4  # the tower's two stride-2 convolutions


def special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}


def processor_sizes(processor_config: dict | None) -> tuple[int, int]:
    cfg = processor_config or {}
    return int((cfg.get("size") or {}).get("height", 728)), int(cfg.get("patch_size", 504))


def image_data(image: np.ndarray, processor_config: dict | None = None) -> dict:
    from ember.multimodal.processing import step3p7_image
    size, patch = processor_sizes(processor_config)
    out = step3p7_image(image, size, patch, int((processor_config or {}).get("max_image_size", 3024)))
    data = {"pixel_values": out["pixel_values"], "num_local_patches": np.int64(out["num_local_patches"]),
            "patch_newline_mask": np.array(out["patch_newline_mask"], dtype=bool)}
    if "pixel_values_local" in out:
        data["pixel_values_local"] = out["pixel_values_local"]
    return data


def expand_prompt(ids: list[int], media: list[tuple[str, dict]], tokenizer, processor_config: dict | None = None,
                  patch_size_px: int = 14) -> tuple[list[int], MultimodalInputs]:
    sp = special_ids(tokenizer)
    size, patch = processor_sizes(processor_config)
    G = (size // (patch_size_px * DOWNSAMPLE)) ** 2
    P = (patch // (patch_size_px * DOWNSAMPLE)) ** 2
    out, items, it = [], [], iter(media)
    for tok in ids:
        if tok != sp["<im_patch>"]:
            out.append(tok)
            continue
        try:
            kind, data = next(it)
        except StopIteration:
            raise ValueError("the prompt has more image placeholders than images were given") from None
        if kind != "image":
            raise ValueError(f"this model takes images; a {kind} was given")
        span, index = [], []
        mask = list(data.get("patch_newline_mask", []))
        for i in range(int(data.get("num_local_patches", 0))):
            span.append(sp["<patch_start>"])
            index.extend(range(len(span), len(span) + P))
            span += [sp["<im_patch>"]] * P + [sp["<patch_end>"]]
            if i < len(mask) and mask[i]:
                span.append(sp["<patch_newline>"])
        span.append(sp["<im_start>"])
        index.extend(range(len(span), len(span) + G))
        span += [sp["<im_patch>"]] * G + [sp["<im_end>"]]
        items.append(MMItem("image", len(out), len(span), data, embed_index=np.array(index, dtype=np.int64)))
        out.extend(span)
    if next(it, None) is not None:
        raise ValueError("more images than placeholders in the prompt")
    return out, MultimodalInputs(items)
