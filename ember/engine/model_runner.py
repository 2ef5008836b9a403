"""Loads a model onto a device, owns its KV cache, and turns a scheduled batch into logits."""
from __future__ import annotations

import logging
import time

import torch

from ember.distributed import tp_min_int, tp_size
from ember.engine.forward_batch import ForwardBatch
from ember.engine.kv_pool import KVCache
from ember.engine.logit_rows import logit_rows, split_rows
from ember.engine.cpu_default_path import choose_weights_path
from ember.engine.memory_plan import build_meta_model, kv_layer_shapes, meta_model, plan_for_model, weight_bytes
from ember.attention import create_backend
from ember.attention.base import AttentionBackend, GroupBatch
from ember.attention.torch_sdpa import TorchSDPABackend
from ember.layers.rotary import RotaryEmbedding
from ember.loader.weight_loading import freed_memory_returned
from ember.host_to_device import device_tensor, to_device

logger = logging.getLogger("ember.engine")


def load_model(model_dir, hf_config, dtype: torch.dtype, device: str, quantization: str | None = None):
    """The model with its weights on `device`. With `quantization` (CPU), each linear layer is quantized as soon as
    its weights are read and its float32 weights freed, so no float32 copy of the whole model is ever held."""
    from ember.loader import iter_weights
    t0 = time.monotonic()
    model, config = build_meta_model(hf_config)
    model = model.to_empty(device=device)  # (pages are only touched, so only resident, as weights are written)
    if quantization:
        from ember.layers.model_quantization import cast_unquantized, quantize_model, quantizing_loader
        with freed_memory_returned():
            model.load_weights(iter_weights(model_dir), on_loaded=quantizing_loader(model, quantization, dtype))
            cast_unquantized(model, dtype)
            quantize_model(model, quantization)  # what the loader did not reach: MoE experts, partly-filled layers
    else:
        model.load_weights(iter_weights(model_dir))
        model = model.to(dtype)
    for module in model.modules():  # RoPE tables: computed for real, kept in float32
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    model.eval()
    logger.info("loaded %s (%s%s) in %.1fs", type(model).__name__, dtype, f", {quantization}" if quantization else "",
                time.monotonic() - t0)
    return model, config


class ModelRunner:
    attn_backend: AttentionBackend = TorchSDPABackend()  # (__init__ sets the server's; stateless, so shared)
    graph_runner = None  # CUDA graphs of decode steps (ember/engine/cuda_graph_runner.py), when they apply
    future_ids = None  # overlap scheduling: the step in flight's sampled ids [rows], for placeholders -(row + 1)

    def __init__(self, model_dir, hf_config, server_args):
        self.model_dir = model_dir  # (this node's copy: ranks on other nodes have their own path)
        self.device = server_args.resolved_device()
        self.dtype = server_args.resolved_dtype()
        if self.device == "cpu" and server_args.num_threads:
            torch.set_num_threads(server_args.num_threads)
        self.weights_path = choose_weights_path(server_args.quantization, server_args.dtype, self.device, tp_size(),
                                                model_dir)
        quantization = self.weights_path.quantization
        if quantization and self.device != "cpu":
            raise ValueError(f"--quantization {server_args.quantization} is implemented for CPU only")
        # weights as the checkpoint gives them, KV bytes per token per group and the tokens each pool holds: the
        # numbers --dry-run prints, planned before loading (on CPU quantization does not change the KV budget)
        self.memory_plan = plan_for_model(*meta_model(hf_config, self.dtype), server_args, self.dtype, self.device,
                                          loaded=False)
        self.model, self.config = load_model(model_dir, hf_config, self.dtype, self.device, quantization)
        logger.info("weights: %s (%s), %.2f GiB held", quantization or "as loaded", self.weights_path.reason,
                    weight_bytes(self.model)[1] / 2**30)
        logger.info("%s", self.memory_plan.describe())
        self.page_size = server_args.page_size
        self.window = self.model.sliding_window()
        self.kv_cache = self._make_kv_cache(server_args)
        self.attn_backend = create_backend(server_args.attention_backend, self.device)
        logger.info("attention backend: %s", self.attn_backend.name)
        # Triton kernels chosen on a GPU: RoPE, RMSNorm and SiLU x up too (ember/layers/triton_layers.py)
        if self.attn_backend.name == "triton" and str(self.device).startswith("cuda"):
            from ember.layers.triton_layers import use_triton_layers
            logger.info("Triton layers: %s", use_triton_layers(self.model))
        from ember.layers.moe_runner import set_moe_runner
        self.moe_runner = set_moe_runner(self.model, server_args.moe_runner_backend, self.device, quantization)
        from ember.layers.fused_decode import maybe_fused_decoder
        self.fused_decoder = maybe_fused_decoder(  # (no collectives in the fused step; it does its own attention)
            self.model, self.kv_cache, not server_args.disable_fused_decode and tp_size() == 1
            and self.attn_backend.name == "torch")
        from ember.engine.cuda_graph_runner import maybe_graph_runner
        self.graph_runner = maybe_graph_runner(self, server_args, self.context_limit(server_args))

    def _make_kv_cache(self, args) -> KVCache:
        groups = self.model.kv_groups()
        shapes = kv_layer_shapes(self.model, self.config)
        P = self.page_size
        pages = {g: n // P + 1 for g, n in self.memory_plan.kv_tokens.items()}
        pages = {g: tp_min_int(n) for g, n in pages.items()}  # one scheduler hands out pages every rank has
        logger.info("KV cache: %s pages of %d tokens (%s)", pages, P,
                    ", ".join(f"{g}: {len(l)} layers" for g, l in groups.items()))
        return KVCache(groups, pages, P, shapes, self.dtype, self.device)

    def context_limit(self, args) -> int:
        return args.context_length or self.config.max_position_embeddings

    # ------------------------------------------------------------------ batch -> tensors
    def build_batch(self, reqs, extend_lens) -> ForwardBatch:
        if max(extend_lens) == 1:
            batch = self._decode_batch(reqs)
        else:
            batch = self._general_batch(reqs, extend_lens)
        if self.future_ids is not None:  # tokens not yet read back (ember/engine/overlap.py): taken on the device
            ids = batch.input_ids
            batch.input_ids = torch.where(ids < 0, self.future_ids.index_select(0, (-ids - 1).clamp(min=0)), ids)
        if any(getattr(r, "mm", None) is not None for r in reqs):  # images/video: embeddings, M-RoPE positions
            from ember.multimodal.engine_glue import attach_multimodal
            attach_multimodal(self.model, batch, reqs, extend_lens)
        return batch

    def _attention_metadata(self, reqs, extend_lens, trees=None) -> dict:
        """The attention backend's metadata per KV group, prepared once for every layer of the step."""
        q_start, q_len = [r.kv_len for r in reqs], list(extend_lens)
        return {g: self.attn_backend.prepare(GroupBatch(q_start, q_len, [r.page_tables[g] for r in reqs],
                                                        self.page_size, self.window if g == "swa" else None,
                                                        self.device, trees))
                for g in self.kv_cache.groups}

    def _decode_batch(self, reqs) -> ForwardBatch:
        """What _general_batch builds when every request brings one token (the common step), with fewer torch ops:
        at batch 1 their dispatch cost was ~0.5 ms (the torch backend has such a shortcut for its metadata too)."""
        pos = [r.kv_len for r in reqs]
        attn = ModelRunner._attention_metadata(self, reqs, [1] * len(reqs))
        input_ids = torch.tensor([r.token_ids[p] for r, p in zip(reqs, pos)])
        return ForwardBatch(to_device(input_ids, self.device), device_tensor(pos, self.device), attn, self.kv_cache,
                            torch.arange(len(reqs), device=self.device), attn_backend=self.attn_backend)

    def _general_batch(self, reqs, extend_lens) -> ForwardBatch:
        input_ids = torch.tensor([t for r, n in zip(reqs, extend_lens) for t in r.token_ids[r.kv_len:r.kv_len + n]])
        positions = torch.cat([torch.arange(r.kv_len, r.kv_len + n) for r, n in zip(reqs, extend_lens)])
        # speculative tree drafts: a request's slots from spec_tree.base on hold tree nodes, each at its own RoPE
        # position (its depth); the backend masks each node to its ancestors (ember/speculative/tree.py)
        trees = [getattr(r, "spec_tree", None) for r in reqs]
        if any(t is not None for t in trees):
            from ember.speculative.tree import to_logical
            positions = torch.cat([to_logical(t, torch.arange(r.kv_len, r.kv_len + n))
                                   for r, n, t in zip(reqs, extend_lens, trees)])
        else:
            trees = None
        attn = ModelRunner._attention_metadata(self, reqs, extend_lens, trees)
        logit_index = torch.cumsum(torch.tensor(extend_lens), 0) - 1
        return ForwardBatch(to_device(input_ids, self.device), to_device(positions, self.device), attn, self.kv_cache,
                            to_device(logit_index, self.device), attn_backend=self.attn_backend, trees=trees)

    def move_kv(self, moves: dict) -> None:
        """Copy KV rows between pool slots in every layer: per KV group (destination slots, source slots), all
        sources read before any is written (a speculative tree's kept path moved into place)."""
        slots = {g: tuple(torch.tensor(s, device=self.device) for s in pair) for g, pair in moves.items()}
        for layer, g in self.kv_cache.layer_group.items():
            if g in slots:
                dst, src = slots[g]
                for cache in self.kv_cache.layer(layer):
                    cache.index_copy_(0, dst, cache.index_select(0, src))

    def _logits(self, batch: ForwardBatch) -> torch.Tensor:
        """The model on one batch: logits at batch.logit_index (by the fused decode step where forward chose it)."""
        if batch.fused:
            with torch.inference_mode():
                return self.model.compute_logits(self.fused_decoder(batch).index_select(0, batch.logit_index))
        return self.model(batch)

    def _split_forward(self, reqs, extend_lens, full_rows, fusable):
        """A step mixing requests the fused step takes (decode, speculative verify) with prefill chunks, when decode
        steps run fused: the former go through the fused step as in a batch of their own, the rest through the
        torch path, so a request's tokens do not depend on whether another request was prefilling beside it (the
        two paths round differently). As SGLang, which by default does not mix prefill into decode batches either."""
        parts = [[i for i, f in enumerate(fusable) if f], [i for i, f in enumerate(fusable) if not f]]
        outs = [self.forward([reqs[i] for i in idx], [extend_lens[i] for i in idx],
                             full_rows=None if full_rows is None else [full_rows[i] for i in idx]) for idx in parts]
        wants_rows = full_rows is not None and any(full_rows)
        lasts = [o[0] if isinstance(o, tuple) else o for o in outs]  # (a part asking no full rows: a tensor)
        last = lasts[0].new_empty(len(reqs), lasts[0].shape[1])
        rows = {}
        for idx, part_last, out in zip(parts, lasts, outs):
            last[torch.tensor(idx, device=last.device)] = part_last
            if isinstance(out, tuple):
                rows.update({idx[j]: t for j, t in out[1].items()})
        return (last, rows) if wants_rows else last

    def forward(self, reqs, extend_lens, all_positions: bool = False, full_rows: list[bool] | None = None):
        """Logits (float32) at each request's last scheduled token: [B, vocab].
        all_positions: logits at every token instead, [T, vocab].
        full_rows: per request, whether it also wants logits at all of its scheduled tokens (prompt logprobs);
        then returns (last [B, vocab], {i: [n_i, vocab]})."""
        if (self.graph_runner is not None and not all_positions and not (full_rows and any(full_rows))
                and self.graph_runner.can_run(reqs, extend_lens)):  # a decode step: a CUDA graph replayed
            return self.graph_runner.run(reqs)
        fusable = [self.fused_decoder is not None and self.fused_decoder.takes(r, n) for r, n in zip(reqs, extend_lens)]
        if not all_positions and any(fusable) and not all(fusable):
            return self._split_forward(reqs, extend_lens, full_rows, fusable)
        batch = self.build_batch(reqs, extend_lens)
        batch.fused = all(fusable) and self.fused_decoder.applies_to(batch)
        if all_positions:
            batch.logit_index = torch.arange(batch.input_ids.shape[0], device=self.device)
            return self._logits(batch)
        if not full_rows or not any(full_rows):
            return self._logits(batch)
        index, spans = logit_rows(extend_lens, full_rows)
        batch.logit_index = device_tensor(index, self.device)
        return split_rows(self._logits(batch), spans, full_rows)

    def forward_hidden(self, reqs, extend_lens, full_rows: list[bool]):
        """For drafting on the model's MTP layers: (last logits [B, V], {i: rows [n_i, V]}, the target's last
        pre-norm hidden state at every token [T, H]). The hidden states stay in `last_hidden` until the next call:
        the drafter's update reads the rows it keeps there (on every rank of a tensor-parallel engine)."""
        from ember.speculative.target_hidden import forward_with_hidden
        out = forward_with_hidden(self, reqs, extend_lens, full_rows)
        self.last_hidden = out[2]
        return out
