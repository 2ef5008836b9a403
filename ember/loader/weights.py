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

    Tensors keep their stored dtype (bf16/fp16/fp32...) and live on the CPU; only one tensor at a
    time is read into memory. A tied lm_head
    is not yielded if the checkpoint does not store it.
    """
    kind, files = list_weight_files(model_dir)
    if kind == "safetensors":
        for path in files:
            yield from read_safetensors(path)
    else:
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format: no mmap
                state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def read_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each tensor of a .safetensors file, in file order, each read into its own memory.

    safetensors' ``safe_open`` maps the file, and every page it reads stays resident in the process until the
    file is closed: a float32 checkpoint would count in full towards peak memory while a quantized model is
    built from it. Reading tensor by tensor (the format is an 8-byte header length, a JSON header with each
    tensor's dtype, shape and byte range, then the data) holds one tensor at a time.
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which ember cannot load")
            yield name, _read_tensor(f, path, name, base, info, dtype)  # (no local keeps it alive here)


def _read_tensor(f, path, name: str, base: int, info: dict, dtype: torch.dtype) -> torch.Tensor:
    start, end = info["data_offsets"]
    tensor = torch.empty(info["shape"], dtype=dtype)
    if end > start:
        f.seek(base + start)
        view = tensor.view(-1).view(torch.uint8).numpy()
        if view.nbytes != end - start or f.readinto(view) != end - start:
            raise ValueError(f"{path}: tensor {name!r} is truncated or its size does not match its shape")
    return tensor
