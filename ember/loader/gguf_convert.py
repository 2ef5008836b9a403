"""Convert a GGUF file into a cached Hugging Face-layout directory.

The result, ``<cache>/hf/<stem>-<hash>/``, holds ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32, dequantized, HF tensor names; shards and an index past 256 MB) and the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template). Everything downstream
(the model loader, the tokenizer manager, reference tests with transformers) then only ever
sees a plain HF directory.

Converting is slow (transformers builds the tokenizer from GGUF metadata in 9-29 s and
dequantizes every tensor), so it is done once per GGUF file: the cache key hashes the file's
absolute path, size and mtime. The build happens in a temporary directory that is renamed
into place, under an fcntl lock, so concurrent processes never see or write a half-built dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .bundled import ember_cache_dir, file_lock
from .weight_loading import freed_memory_returned

logger = logging.getLogger("ember.loader")

# Bump when the output of the conversion changes, so that old cache entries are not reused.
CONVERTER_VERSION = 2  # 2: sharded, written in the GGUF's order
MARKER_FILE = ".ember_converted.json"


def converted_dir_for(gguf_path: str | os.PathLike) -> Path:
    """The cache directory that ``convert_gguf(gguf_path)`` uses (existing or not)."""
    p = Path(gguf_path).expanduser().resolve()
    st = p.stat()
    key = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return ember_cache_dir() / "hf" / f"{p.stem}-{digest}"


def is_converted(out_dir: Path) -> bool:
    return (out_dir / MARKER_FILE).is_file() and (out_dir / "config.json").is_file()


def convert_gguf(gguf_path: str | os.PathLike, sampling_defaults: dict[str, float] | None = None) -> Path:
    """Return an HF-layout directory for ``gguf_path``, converting it on first use.

    ``sampling_defaults`` (a bundled model's hub ``generation_config.json`` values, which its GGUF lacks)
    are added to the directory's generation config where the GGUF gave none.
    """
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    out_dir = converted_dir_for(src)
    if not is_converted(out_dir):
        _convert_locked(src, out_dir)
    else:
        logger.debug("Using cached conversion %s for %s", out_dir, src)
    if sampling_defaults:
        _add_generation_defaults(out_dir, sampling_defaults)
    return out_dir


def _add_generation_defaults(out_dir: Path, defaults: dict[str, float]) -> None:
    path = out_dir / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    missing = {k: v for k, v in defaults.items() if k not in gen}
    if not missing:
        return
    gen.update(missing)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(gen, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


# GGUF's optional sampling metadata (general.sampling.*) -> generation_config.json fields.
_GGUF_SAMPLING = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                  "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}


def _convert_locked(src: Path, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_converted(out_dir):  # another process finished it while we waited
            return
        if out_dir.exists():  # leftover without a marker: not ours to trust
            shutil.rmtree(out_dir)
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # from a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        try:
            build = work / "out"
            build.mkdir()
            _convert_into(src, build, work / "src")
            os.chmod(build, 0o755)
            os.replace(build, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------


def _gguf_fields(src: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Scalar/str metadata of a GGUF file (arrays skipped) and {tensor name: quant type}."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(src))
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > 64:
            continue  # tokenizer vocab/merges/scores
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - odd field types are not needed here
            pass
    qtypes = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta, qtypes


def gguf_weight_bits(src: str | os.PathLike) -> tuple[float, str]:
    """Bits per weight of a GGUF's layer matrices (blk.* 2-D tensors, averaged by element count) and its quant
    type: the file type it declares (`general.file_type`, e.g. Q4_K_M), else its layers' most common type. (The
    declared type is what the file was made as: a small model's Q4_K_M stores many rows as Q5_0, whose width is
    not a multiple of the K-quants' 256-blocks.)"""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(src))
    declared = None
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            declared = LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            declared = None
    bits, count, by_type = 0.0, 0, {}
    for t in reader.tensors:
        if not t.name.startswith("blk.") or len(t.shape) < 2:
            continue
        n = int(t.n_elements)
        bits += _bits_per_weight(t.tensor_type.name) * n
        count += n
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + n
    if not count:
        raise ValueError(f"{src}: no layer matrices")
    return bits / count, declared or max(by_type, key=by_type.get)


def converted_weight_bits(model_dir: str | os.PathLike) -> tuple[float, str] | None:
    """(bits per weight, quant type) of the GGUF a converted directory came from; None if it did not come from
    one (or the file is gone)."""
    marker = Path(model_dir) / MARKER_FILE
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    if "quant_type" in info:
        return info["weight_bits"], info["quant_type"]
    src = info.get("source")  # converted before the marker recorded it
    return gguf_weight_bits(src) if src and Path(src).is_file() else None


def _bits_per_weight(qtype: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return nbytes * 8 / block


def _convert_into(src: Path, out: Path, staging: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t_start = time.perf_counter()
    # transformers resolves gguf_file relative to a directory: give it a private directory that
    # holds only a link to the file, so a stray config.json next to the GGUF is never picked up.
    staging.mkdir()
    (staging / src.name).symlink_to(src)
    meta, qtypes = _gguf_fields(src)
    arch = meta.get("general.architecture", "?")
    logger.info("Converting %s (%s, %.0f MB) to %s", src, arch, src.stat().st_size / 1e6, out)

    config = AutoConfig.from_pretrained(staging, gguf_file=src.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    notes = _fix_config(config, meta)

    # An empty (meta-device) model gives the HF parameter names and the class name.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    t0 = time.perf_counter()
    config.dtype = torch.float32
    with freed_memory_returned():  # (each tensor's float32 pages go back as soon as its shard is written)
        shapes, tie_note = _write_weights(_iter_dequantized(src, skeleton), out, skeleton, config, qtypes)
    logger.info("Dequantized %d tensors into float32 safetensors in %.1fs", len(shapes), time.perf_counter() - t0)
    if tie_note:
        notes.append(tie_note)
    for note in notes:
        logger.info("Config fix: %s", note)
    _check_complete(skeleton, config, shapes)
    del skeleton
    config.save_pretrained(out)

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=src.name)
    template = meta.get("tokenizer.chat_template")
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    _patch_tokenizer_config(out, template, getattr(config, "max_position_embeddings", None))
    try:
        gen = GenerationConfig.from_model_config(config)
        for key, name in _GGUF_SAMPLING.items():
            if key in meta:
                setattr(gen, name, meta[key])
                gen.do_sample = True  # (transformers refuses to save sampling fields without it)
        eos = _end_of_generation_ids(tokenizer, config)
        if eos:
            gen.eos_token_id = eos if len(eos) > 1 else eos[0]
        gen.save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - a generation config is optional
        logger.warning("No generation_config.json: %s", e)
    logger.info("Built tokenizer in %.1fs", time.perf_counter() - t0)

    marker = {
        "source": str(src),
        "size": src.stat().st_size,
        "mtime_ns": src.stat().st_mtime_ns,
        "architecture": arch,
        "converter_version": CONVERTER_VERSION,
        "transformers_version": transformers.__version__,
        "config_fixes": notes,
        **dict(zip(("weight_bits", "quant_type"), gguf_weight_bits(src))),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    logger.info("Converted %s in %.1fs", src.name, marker["seconds"])


# Tokens that end a turn or a document in the chat formats of common GGUF models; llama.cpp
# stops on these too ("end of generation" tokens), and HF generation configs list them as eos.
_EOG_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


def _end_of_generation_ids(tokenizer, config) -> list[int]:
    eos = config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    for tok in _EOG_TOKENS:
        tid = vocab.get(tok)
        if tid is not None and tid not in ids and tid != getattr(config, "unk_token_id", None):
            ids.append(tid)
    return ids


SHARD_BYTES = 256 * 2**20  # float32 bytes per safetensors shard: what conversion holds besides the embeddings


def _iter_dequantized(src: Path, skeleton):
    """(HF name, float32 tensor) for each tensor of the GGUF file, one at a time.

    This is the loop of transformers' ``load_gguf_checkpoint(..., return_tensors=True)`` (its name mapping and
    per-architecture tensor processors, e.g. llama's q/k permutation), which would return every tensor at once: a
    float32 copy of the whole model. Where those internals are not importable, that function is called instead.
    """
    import mmap

    import torch
    from gguf import GGUFReader, dequantize
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint, read_field,
        )
    except ImportError:  # another transformers layout: whole-model conversion
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        tensors = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=skeleton)["tensors"]
        while tensors:
            name = next(iter(tensors))
            yield name, tensors.pop(name).to(torch.float32)
        return
    parsed = load_gguf_checkpoint(str(src))  # config and tokenizer fields, as the tensor processors expect them
    reader = GGUFReader(str(src))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    for tensor in reader.tensors:
        result = processor.process(weights=_dequantize_rows(tensor, dequantize), name=tensor.name,
                                   tensor_key_mapping=mapping, parsed_parameters=parsed)
        name, weights = result.name, result.weights
        del result
        if not weights.flags.writeable:  # a view of the (read-only) file: F32/F16 tensors
            weights = np.copy(weights)
        if name in mapping:
            yield mapping[name], torch.from_numpy(weights).to(torch.float32)
        del weights
        try:  # the file's pages read so far would otherwise stay resident (the reader maps the whole file)
            reader.data._mmap.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):
            pass


def _dequantize_rows(tensor, dequantize, rows: int = 1024):
    """gguf's dequantize, 1024 rows at a time into one float array: on a whole vocab x hidden matrix its float
    temporaries are three times the result (1.6 GB more for Qwen2.5-0.5B's lm_head)."""
    data = tensor.data
    if data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:rows], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for r0 in range(rows, data.shape[0], rows):
        out[r0:r0 + rows] = dequantize(data[r0:r0 + rows], tensor.tensor_type)
    return out


def _write_weights(tensors, out: Path, skeleton, config, qtypes: dict[str, str]):
    """Write the tensors as float32 safetensors shards of SHARD_BYTES (one file, model.safetensors, when they fit,
    else model-0000N.safetensors and an index), holding back only the embeddings until the lm_head tie is decided
    (llama.cpp writes them first).
    Returns ({name: shape} written, the tie note or None)."""
    from safetensors.torch import save_file

    emb, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    held_names = {_param_name(skeleton, emb)} if emb is not None else set()
    if head is not None and "output.weight" in qtypes:  # (no output.weight: tied, nothing to wait for)
        held_names.add(_param_name(skeleton, head))
    held, shard, files, weight_map, shapes, tie_note = {}, {}, [], {}, {}, None

    def decide_tie() -> str | None:  # (once both embeddings are read, or at the end)
        note = _maybe_tie_embeddings(skeleton, config, held, qtypes)
        for name in held_names - held.keys():
            shapes.pop(name, None)  # (the lm_head, now tied)
        shard.update(held)
        held.clear()
        return note

    def flush() -> None:
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard.clear()

    for name, t in tensors:
        shapes[name] = tuple(t.shape)
        if name in held_names:
            held[name] = t
            if held.keys() == held_names:
                tie_note = decide_tie()
            continue
        shard[name] = t.contiguous()
        del t
        if sum(v.nbytes for v in shard.values()) >= SHARD_BYTES:
            flush()
    if held:
        tie_note = decide_tie()
    flush()
    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
    else:
        total = sum((out / f).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return shapes, tie_note


def _param_name(model, module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}.weight" if name else "weight"
    return None


def _check_complete(skeleton, config, shapes: dict[str, tuple]) -> None:
    """Every parameter of the HF model is there, with its shape (bar a tied lm_head)."""
    tensors = dict(shapes)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        head = skeleton.get_output_embeddings()
        name = _param_name(skeleton, head) if head is not None else None
        if name:
            expected.pop(name, None)
            tensors.pop(name, None)
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion produced an incomplete state dict: missing {sorted(missing)[:10]}, "
            f"unexpected {sorted(unexpected)[:10]}"
        )
    for k, shape in tensors.items():
        if tuple(shape) != expected[k]:
            raise RuntimeError(f"GGUF tensor {k} has shape {tuple(shape)}, the model wants {expected[k]}")


def _patch_tokenizer_config(out: Path, template: str | None, max_len: int | None) -> None:
    """Make sure tokenizer_config.json carries the chat template (whatever transformers did)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    if template and not cfg.get("chat_template"):
        cfg["chat_template"] = template
    if max_len and cfg.get("model_max_length", 0) > 10**12:  # transformers' "unset" value
        cfg["model_max_length"] = int(max_len)
    for key in ("is_local", "local_files_only"):  # transformers' load-time kwargs leak in
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _fix_config(config, meta: dict[str, Any]) -> list[str]:
    """Repair what the GGUF -> HF config mapping loses. Returns notes of what was changed."""
    notes: list[str] = []
    arch = meta.get("general.architecture", "")

    def setattr_noted(name: str, value: Any) -> None:
        old = getattr(config, name, None)
        if old != value:
            setattr(config, name, value)
            notes.append(f"{name}: {old!r} -> {value!r}")

    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06. Use the shortest
    # decimal that round-trips through float32, as in the original config.json.
    for key in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        value = getattr(config, key, None)
        if isinstance(value, float):
            short = float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))
            if short != value:
                setattr(config, key, short)

    # Logit soft-capping (gemma2) is stored in GGUF but not mapped by transformers.
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if f"{arch}.{key}" in meta and hasattr(config, key):
            setattr_noted(key, float(meta[f"{arch}.{key}"]))

    if config.model_type in ("gemma3_text", "gemma3"):
        notes += _fix_gemma3_config(config, meta, setattr_noted)
    return notes


def _fix_gemma3_config(config, meta: dict[str, Any], setattr_noted) -> list[str]:
    """Gemma 3 (text): sliding window layout, dual RoPE bases, query scaling.

    The GGUF stores the sliding window size and the global RoPE base; llama.cpp hardcodes the
    rest (5 local : 1 global layers, local RoPE base 10 000, query scale 1/sqrt(head_dim) except
    for the 27B model), and so does this.
    """
    notes: list[str] = []
    arch = "gemma3"
    n_layers = config.num_hidden_layers
    sw = meta.get(f"{arch}.attention.sliding_window")
    if sw:
        setattr_noted("sliding_window", int(sw))
    pattern = int(meta.get(f"{arch}.attention.sliding_window_pattern", 6) or 6)
    layer_types = [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)
    ]
    setattr_noted("layer_types", layer_types)

    global_theta = float(meta.get(f"{arch}.rope.freq_base", 1_000_000.0))
    local_theta = float(meta.get(f"{arch}.rope.freq_base_swa", 10_000.0))
    full = {"rope_type": "default", "rope_theta": global_theta}
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if scaling_type and scaling_type != "none" and factor:
        full = {"rope_type": str(scaling_type), "rope_theta": global_theta, "factor": float(factor)}
    rope = {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
    if hasattr(config, "rope_parameters"):
        current = getattr(config, "rope_parameters", None) or {}
        wanted_subset = all(
            all(current.get(k, {}).get(kk) == vv for kk, vv in v.items()) for k, v in rope.items()
        )
        if not wanted_subset:
            setattr_noted("rope_parameters", rope)
    else:  # transformers 4.x layout
        setattr_noted("rope_theta", global_theta)
        setattr_noted("rope_local_base_freq", local_theta)
        setattr_noted("rope_scaling", {k: v for k, v in full.items() if k != "rope_theta"} if "factor" in full else None)

    head_dim = int(meta.get(f"{arch}.attention.key_length", config.head_dim))
    if n_layers == 62:  # gemma-3-27b scales queries by hidden_size / num_heads
        scalar = config.hidden_size // config.num_attention_heads
    else:
        scalar = head_dim
    setattr_noted("query_pre_attn_scalar", scalar)
    return notes


def _maybe_tie_embeddings(skeleton, config, tensors: dict[str, Any], qtypes: dict[str, str]) -> str | None:
    """Tie lm_head to the input embeddings when the GGUF stores the same matrix twice.

    llama.cpp sometimes writes ``output.weight`` for a model whose HF original ties it to
    ``token_embd.weight`` (Qwen2.5-0.5B here: Q8_0 and Q5_0 copies). Keeping both costs a full
    vocab x hidden float32 matrix; when they agree up to quantization noise, keep only the more
    precise copy and tie, as in the original checkpoint.
    """
    import torch

    if getattr(config, "tie_word_embeddings", False):
        return None
    emb, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    if emb is None or head is None:
        return None
    emb_name, head_name = _param_name(skeleton, emb), _param_name(skeleton, head)
    a, b = tensors.get(emb_name), tensors.get(head_name)
    if a is None or b is None or a.shape != b.shape:
        return None
    rel = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-12)).item()
    if not math.isfinite(rel) or rel > 0.1:  # unrelated matrices differ by ~sqrt(2)
        return None
    q_emb, q_head = qtypes.get("token_embd.weight"), qtypes.get("output.weight")
    try:
        use_head = _bits_per_weight(q_head) > _bits_per_weight(q_emb)
    except Exception:  # noqa: BLE001
        use_head = False
    if use_head:
        tensors[emb_name] = b
    del tensors[head_name]
    config.tie_word_embeddings = True
    return (
        f"tie_word_embeddings: False -> True (output.weight {q_head} and token_embd.weight {q_emb} "
        f"differ by {rel:.4f} relative: one matrix quantized twice; kept the "
        f"{q_head if use_head else q_emb} copy)"
    )
