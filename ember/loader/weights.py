"""Iterate the weights of a Hugging Face-layout model directory, one tensor at a time."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger("ember.loader")

SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"


def _files_from_index(model_dir: Path, index_name: str) -> list[Path] | None:
    index = model_dir / index_name
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names weight files that are missing: {missing}")
    return [model_dir / f for f in files]


def list_weight_files(model_dir: str | os.PathLike) -> tuple[str, list[Path]]:
    """``("safetensors" | "pt", files)`` holding the weights of ``model_dir``.

    Safetensors are preferred: the files named by ``model.safetensors.index.json``, else
    ``model.safetensors``, else every ``*.safetensors``. Otherwise ``pytorch_model*.bin``.
    """
    d = Path(model_dir)
    files = _files_from_index(d, SAFETENSORS_INDEX)
    if files is None:
        if (d / "model.safetensors").is_file():
            files = [d / "model.safetensors"]
        else:
            files = sorted(d.glob("*.safetensors"))
    if files:
        return "safetensors", files
    files = _files_from_index(d, PT_INDEX)
    if files is None:
        files = sorted(d.glob("pytorch_model*.bin"))
    if files:
        return "pt", files
    raise FileNotFoundError(f"No *.safetensors or pytorch_model*.bin weight files in {d}")


def iter_weights(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight in ``model_dir``, in file order.

    Tensors keep their stored dtype (bf16/fp16/fp32...) and live on the CPU; safetensors files
    are opened lazily, so only one tensor at a time needs to be materialized. A tied lm_head
    is not yielded if the checkpoint does not store it.
    """
    kind, files = list_weight_files(model_dir)
    if kind == "safetensors":
        from safetensors import safe_open

        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    else:
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format: no mmap
                state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state
