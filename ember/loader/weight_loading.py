"""Checkpoint tensors -> model parameters, through each parameter's own `weight_loader`.

A model says how checkpoint names map to its parameters: `map_weight_name(name)` (None = skip; a parameter name;
or a tuple (name, shard_id[, expert_id]) for a slice of a fused or stacked parameter) and
`packed_modules_mapping` ({"q_proj": ("qkv_proj", "q"), ...}: a checkpoint sub-module that is one shard of a fused
one). The parameter's layer knows which part of the tensor it holds (ember/layers/linear.py, ember/layers/moe.py):
the owning module's `weight_loader(param, tensor, *ids)` method is called (or a `weight_loader` attribute of the
parameter itself; attributes do not survive the move off the meta device, so layers define the method).
Every parameter must end up filled: a missing tensor, or one of the wrong shape, is an error naming it.

`on_loaded(module_name, module)`, when given, is called as soon as every parameter of a module is filled (once per
module; a tied parameter completes every module holding it). The runner quantizes there, so the float32 weights of a
layer are freed as soon as its quantized form exists: no float32 copy of the whole model is ever held.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import sys

import torch

from ember.layers.linear import default_weight_loader

logger = logging.getLogger("ember.loader")


def _resolve(name: str, params: dict, packed: dict) -> tuple[str, tuple]:
    """A checkpoint parameter name -> (our parameter name, shard ids) through packed_modules_mapping."""
    module, _, leaf = name.rpartition(".")
    parent, _, sub = module.rpartition(".")
    if name not in params and sub in packed:
        fused, shard = packed[sub]
        return f"{parent}.{fused}.{leaf}" if parent else f"{fused}.{leaf}", (shard,)
    return name, ()


def _owners(model: torch.nn.Module) -> tuple[dict[int, list[str]], dict[str, list[str]]]:
    """({id(parameter): names of the modules holding it}, {module name: its own parameters' full names})."""
    owners: dict[int, list[str]] = {}
    module_params: dict[str, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)
            module_params.setdefault(mname, []).append(f"{mname}.{leaf}" if mname else leaf)
    return owners, module_params


def load_weights(model: torch.nn.Module, weights, on_loaded=None) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights appear under both names
    packed = getattr(model, "packed_modules_mapping", {})
    optional = tuple(getattr(model, "optional_weights", ()))  # parameter-name prefixes a checkpoint may lack
    filled: dict[int, int] = {}  # id(parameter) -> elements written
    owners, module_params = _owners(model) if on_loaded else ({}, {})
    for hf_name, tensor in weights:
        target = model.map_weight_name(hf_name)
        if target is None:
            continue
        if isinstance(target, tuple):
            target, ids = target[0], tuple(target[1:])
        else:
            target, ids = _resolve(target, params, packed)
        param = params.get(target)
        if param is None:
            logger.debug("ignoring checkpoint tensor %s", hf_name)
            continue
        owner = model.get_submodule(target.rpartition(".")[0]) if "." in target else model
        loader = getattr(param, "weight_loader", None) or getattr(owner, "weight_loader", None)
        if loader is None and ids:
            raise ValueError(f"checkpoint tensor {hf_name!r} maps to shard {ids} of {target}, "
                             f"whose layer has no weight_loader")
        try:
            with torch.no_grad():
                n = loader(param, tensor, *ids) if loader else default_weight_loader(param, tensor)
        except (ValueError, RuntimeError, IndexError) as e:
            raise ValueError(f"cannot load checkpoint tensor {hf_name!r} into {target}: {e}") from e
        filled[id(param)] = filled.get(id(param), 0) + n
        del tensor, owner  # (the read copy and the layer: free them once the layer is quantized)
        done = on_loaded is not None and filled[id(param)] >= param.numel()
        if done:
            _complete_modules(model, owners.pop(id(param), []), module_params, params, filled, on_loaded)
        del param
        if done:
            release_freed_memory()  # the layer's float32 weights, just replaced
    missing = [name for name, p in params.items()
               if filled.get(id(p), 0) < p.numel() and not name.startswith(optional)]
    if missing:
        raise ValueError(f"the checkpoint is missing {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def _complete_modules(model, names, module_params, params, filled, on_loaded) -> None:
    """Call on_loaded for each module among `names` whose parameters are now all filled, then forget its parameters
    here (the loader's references would keep replaced float32 weights alive)."""
    for mname in names:
        pnames = module_params.get(mname, [])
        if not all(n in params and filled.get(id(params[n]), 0) >= params[n].numel() for n in pnames):
            continue
        del module_params[mname]
        on_loaded(mname, model.get_submodule(mname) if mname else model)
        for n in pnames:
            params.pop(n, None)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@contextlib.contextmanager
def freed_memory_returned():
    """While loading a model layer by layer: glibc serves blocks over 1 MB with mmap, so freeing one (a layer's
    float32 weights, a quantizer's temporaries) hands its pages straight back; with its default, growing threshold
    they stay in a fragmented heap (a tenth of the model's float32 size more at peak, measured on SmolLM2). After,
    the threshold is glibc's own ceiling (32 MB), where its default would have settled for serving."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        release_freed_memory()


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed while loading (float32 weights replaced by their quantized forms) back to the OS:
    glibc keeps freed chunks below its mmap threshold in the heap, where they would still count as resident."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
