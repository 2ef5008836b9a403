"""Checkpoint tensors -> model parameters, through each parameter's own `weight_loader`.

A model says how checkpoint names map to its parameters: `map_weight_name(name)` (None = skip; a parameter name;
or a tuple (name, shard_id[, expert_id]) for a slice of a fused or stacked parameter) and
`packed_modules_mapping` ({"q_proj": ("qkv_proj", "q"), ...}: a checkpoint sub-module that is one shard of a fused
one). The parameter's layer knows which part of the tensor it holds (ember/layers/linear.py, ember/layers/moe.py):
the owning module's `weight_loader(param, tensor, *ids)` method is called (or a `weight_loader` attribute of the
parameter itself; attributes do not survive the move off the meta device, so layers define the method).
Every parameter must end up filled: a missing tensor, or one of the wrong shape, is an error naming it.
"""
from __future__ import annotations

import logging

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


def load_weights(model: torch.nn.Module, weights) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights appear under both names
    packed = getattr(model, "packed_modules_mapping", {})
    optional = tuple(getattr(model, "optional_weights", ()))  # parameter-name prefixes a checkpoint may lack
    filled: dict[int, int] = {}  # id(parameter) -> elements written
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
    missing = [name for name, p in params.items()
               if filled.get(id(p), 0) < p.numel() and not name.startswith(optional)]
    if missing:
        raise ValueError(f"the checkpoint is missing {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
