"""Model loading: turn any model path into a local Hugging Face-layout directory.

``resolve_model_dir(path)`` accepts
  * ``None`` -> the bundled default model (``qwen2.5-coder-0.5b``);
  * a bundled alias or its HF repo id (``smollm2-135m``, ``HuggingFaceTB/SmolLM2-135M-Instruct``...)
    -> its GGUF from the pip package, converted once and cached;
  * a ``.gguf`` file, or a directory holding exactly one ``.gguf`` and no ``config.json``
    -> converted once and cached (see ``gguf_convert``);
  * a directory with ``config.json`` -> itself;
  * anything else -> treated as a hub repo id: found in the hub's local cache (offline), else fetched with
    ``huggingface_hub`` (or ModelScope with ``EMBER_USE_MODELSCOPE=1`` / ``SGLANG_USE_MODELSCOPE=true``); see hub.py.

``iter_weights(model_dir)`` then streams ``(name, tensor)`` pairs from it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .bundled import BUNDLED_MODELS, DEFAULT_MODEL, bundled_gguf_path, canonical_alias, ember_cache_dir
from .gguf_convert import convert_gguf
from .hub import REPO_ID, default_hub, download, find_cached
from .weights import iter_weights, list_weight_files

logger = logging.getLogger("ember.loader")

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "convert_gguf",
    "ember_cache_dir",
    "iter_weights",
    "list_weight_files",
    "resolve_model_dir",
]



def resolve_model_dir(model_path: str | os.PathLike | None = None, *, revision: str | None = None) -> Path:
    """A local directory with config.json, weights and tokenizer files for ``model_path``."""
    if model_path is None:
        model_path = DEFAULT_MODEL
    name = os.fspath(model_path)
    local = Path(name).expanduser()

    if local.is_file():
        if local.suffix.lower() == ".gguf":
            return convert_gguf(local)
        raise ValueError(
            f"Model path {name!r} is a file but not a .gguf file; pass a GGUF file or a model "
            f"directory with config.json"
        )
    if local.is_dir():
        return _resolve_local_dir(local.resolve())

    alias = canonical_alias(name)
    if alias is not None:
        return convert_gguf(bundled_gguf_path(alias), BUNDLED_MODELS[alias].sampling_defaults)

    return _download_from_hub(name, revision)


def _resolve_local_dir(d: Path) -> Path:
    if (d / "config.json").is_file():
        return d
    ggufs = sorted(d.glob("*.gguf"))
    if len(ggufs) == 1:
        return convert_gguf(ggufs[0])
    if len(ggufs) > 1:
        listing = ", ".join(g.name for g in ggufs)
        raise ValueError(f"Directory {d} holds several GGUF files ({listing}); pass the path of one of them")
    raise ValueError(f"Directory {d} is not a model directory: it has no config.json and no .gguf file")


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    """A repo id: the hub's local cache first (works offline), else a download."""
    bundled = ", ".join(sorted(BUNDLED_MODELS))
    cached = None if not REPO_ID.match(repo_id) else find_cached(repo_id, revision=revision)
    if cached is not None:
        logger.info("%r found in the %s cache: %s", repo_id, default_hub(), cached)
        path = cached
    else:
        logger.info("%r is not a local path; fetching it from %s", repo_id, default_hub())
        try:
            path = download(repo_id, revision=revision)
        except ValueError as e:
            raise ValueError(f"Model {repo_id!r} is neither a local file or directory nor a bundled model "
                             f"({bundled}), is not in the hub cache, and could not be fetched from the model hub: "
                             f"{e}") from e
    d = Path(path)
    if not (d / "config.json").is_file():
        return _resolve_local_dir(d)
    return d
