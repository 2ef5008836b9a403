"""The memory plan: what the weights take, what one token of KV cache takes in each layer group, and how many tokens
the KV pools hold.

It needs only the config: the model class is built on the meta device (shapes, no storage, no weights read), so
`ember serve --model-path DIR --dry-run` prints the plan of a 200B-parameter checkpoint on a laptop. At start the
runner computes the same numbers from the loaded model, sizes the pools with them (`kv_tokens`), logs them, and the
engine serves them in /get_server_info (engine_stats.memory_plan).

KV bytes per token of a group = the sum over its layers of kv_heads x (key dim + value dim) x element size (the
model's `kv_layer_shape`: MLA keeps one latent + rope key and no value). A sliding-window group holds only the
window (+ one prefill chunk) per running request, so its pool is sized by requests, not by context.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from ember.layers.attention import PagedAttention
from ember.models.llama import head_dim_of

logger = logging.getLogger("ember.engine")

GiB = 2**30


@dataclass
class MemoryPlan:
    architecture: str
    dtype: str
    device: str
    num_params: int
    weight_bytes: int  # parameters and persistent buffers (quantized weights), as held on the device
    kv_layers: dict[str, int]  # group -> number of layers
    kv_bytes_per_token: dict[str, int]  # group -> bytes one token takes in all of the group's layers
    sliding_window: int | None
    kv_budget_bytes: int  # what the KV pools may take
    kv_tokens: dict[str, int]  # group -> tokens its pool holds
    page_size: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"memory plan: {self.architecture}, {self.dtype} on {self.device}",
                 f"  weights: {self.num_params / 1e9:.3f} B parameters, {self.weight_bytes / GiB:.2f} GiB "
                 f"({self.weight_bytes} bytes)"]
        for g, per_token in self.kv_bytes_per_token.items():
            window = f", window {self.sliding_window}" if g == "swa" else ""
            lines.append(f"  KV {g}: {self.kv_layers[g]} layers{window}, {per_token} bytes/token "
                         f"({per_token / 1024:.1f} KiB), pool {self.kv_tokens.get(g, 0)} tokens")
        lines.append(f"  KV budget: {self.kv_budget_bytes / GiB:.2f} GiB; tokens that fit: "
                     f"{self.kv_tokens.get('full', 0)} (page size {self.page_size})")
        return "\n".join(lines)


def build_meta_model(hf_config):
    """The serving model on the meta device, float32, as load_model fills it: (model, text config)."""
    from ember.models import model_class_for, text_config_of
    cls, config = model_class_for(hf_config), text_config_of(hf_config)
    with torch.device("meta"):  # (vision-language models are built from the whole config)
        model = cls(hf_config if getattr(cls, "takes_full_config", False) else config)
    return model, config


def meta_model(hf_config, dtype: torch.dtype):
    """The serving model class on the meta device, cast as load_model casts it: (model, text config)."""
    model, config = build_meta_model(hf_config)
    return model.to(dtype), config


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(number of parameters, bytes) of the parameters and persistent buffers, each tensor once (tied embeddings)."""
    seen, count, size = set(), 0, 0
    for module in model.modules():
        size += getattr(module, "packed_bytes", 0)  # weights held outside tensors (fbgemm's packed int8)
        tensors = list(module._parameters.values())
        tensors += [b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            size += t.numel() * t.element_size()
            count += t.numel() if isinstance(t, torch.nn.Parameter) else 0
    return count, size


def kv_layer_shapes(model, config) -> dict[int, tuple[int, int, int]]:
    """(kv heads, key dim, value dim) per layer on this rank: the model's `kv_layer_shape` (MLA, per-layer heads)
    or what each layer's PagedAttention holds."""
    layers = [i for group in model.kv_groups().values() for i in group]
    if hasattr(model, "kv_layer_shape"):
        return {i: tuple(model.kv_layer_shape(i)) for i in layers}
    D = head_dim_of(config)
    # this rank's KV heads (tensor parallel: a share of them, or one replicated head), as its attention holds them
    held = {m.layer_id: (m.num_kv_heads, m.head_dim, m.head_dim) for m in model.modules()
            if isinstance(m, PagedAttention)}
    return {i: held.get(i, (config.num_key_value_heads, D, D)) for i in layers}


def kv_bytes_per_token(model, config, dtype: torch.dtype) -> dict[str, int]:
    from ember.engine.kv_pool import KVCache
    shapes = kv_layer_shapes(model, config)
    return {g: KVCache.bytes_per_token([shapes[i] for i in layers], dtype) for g, layers in model.kv_groups().items()}


def kv_budget(args, device: str, unloaded_weight_bytes: int = 0) -> int:
    """Bytes the KV pools may take: --cpu-kv-cache-gb on CPU; on a GPU --mem-fraction-static of its memory less what
    is in use (the loaded weights among it) and `unloaded_weight_bytes` still to come (the dry run)."""
    if device == "cpu":
        return int(args.cpu_kv_cache_gb * GiB)
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here to size the KV cache for "
                         f"(plan with --device cpu --cpu-kv-cache-gb N to see the numbers for N GiB of KV cache)")
    free, total = torch.cuda.mem_get_info()
    return int(max(args.mem_fraction_static * total - (total - free) - unloaded_weight_bytes, 2**28))


def kv_tokens(per_token: dict[str, int], budget: float, args, window: int | None, context_limit: int) -> dict[str, int]:
    """Tokens each group's pool holds. Sliding-window layers need the window (plus one prefill chunk) per running
    request; the full layers get the rest of the budget, capped by what every running request at full context could
    use and by --max-total-tokens."""
    P = args.page_size
    swa_tokens = 0
    if "swa" in per_token:
        swa_tokens = args.max_running_requests * (window + args.chunked_prefill_size + 2 * P)
        swa_tokens = min(swa_tokens, int(budget // sum(per_token.values())))
        if args.max_total_tokens:
            swa_tokens = min(swa_tokens, args.max_total_tokens)
    full_tokens = int((budget - swa_tokens * per_token.get("swa", 0)) // per_token["full"])
    full_tokens = max(0, min(full_tokens, args.max_running_requests * context_limit))
    if args.max_total_tokens:
        full_tokens = min(full_tokens, args.max_total_tokens)
    tokens = {"full": full_tokens}
    if "swa" in per_token:
        tokens["swa"] = swa_tokens
    return tokens


def plan_for_model(model, config, args, dtype: torch.dtype, device: str, loaded: bool) -> MemoryPlan:
    """The plan of a model instance: loaded (the runner, after its weights are on the device) or on meta (dry run)."""
    num_params, size = weight_bytes(model)
    per_token = kv_bytes_per_token(model, config, dtype)
    groups = model.kv_groups()
    window = model.sliding_window() if "swa" in groups else None
    budget = kv_budget(args, device, 0 if loaded else size)
    context_limit = args.context_length or config.max_position_embeddings
    return MemoryPlan(architecture=type(model).__name__, dtype=str(dtype).removeprefix("torch."), device=device,
                      num_params=num_params, weight_bytes=size, kv_layers={g: len(l) for g, l in groups.items()},
                      kv_bytes_per_token=per_token, sliding_window=window, kv_budget_bytes=budget,
                      kv_tokens=kv_tokens(per_token, budget, args, window, context_limit), page_size=args.page_size)


def plan_from_config(model_dir, args) -> MemoryPlan:
    """The plan from config.json alone (no weights read): `ember serve --dry-run`."""
    from transformers import AutoConfig
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    dtype, device = args.resolved_dtype(), args.resolved_device()
    model, config = meta_model(hf_config, dtype)
    return plan_for_model(model, config, args, dtype, device, loaded=False)
