"""Loads a model onto a device, owns its KV cache, and turns a scheduled batch into logits."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ember.engine.kv_pool import KVCache
from ember.layers.attention import AttentionMetadata
from ember.layers.rotary import RotaryEmbedding
from ember.models import model_class_for, text_config_of
from ember.models.llama import head_dim_of

logger = logging.getLogger("ember.engine")


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: dict[str, AttentionMetadata]  # per KV group
    kv_cache: KVCache
    logit_index: torch.Tensor  # [B] index (into T) of each request's last token


def load_model(model_dir, hf_config, dtype: torch.dtype, device: str):
    from ember.loader import iter_weights
    cls = model_class_for(hf_config)
    config = text_config_of(hf_config)
    t0 = time.monotonic()
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device)
    model.load_weights(iter_weights(model_dir))
    model = model.to(dtype)
    for module in model.modules():  # RoPE tables: computed for real, kept in float32
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    model.eval()
    logger.info("loaded %s (%s) in %.1fs", type(model).__name__, dtype, time.monotonic() - t0)
    return model, config


class ModelRunner:
    def __init__(self, model_dir, hf_config, server_args):
        self.device = server_args.resolved_device()
        self.dtype = server_args.resolved_dtype()
        if self.device == "cpu" and server_args.num_threads:
            torch.set_num_threads(server_args.num_threads)
        self.model, self.config = load_model(model_dir, hf_config, self.dtype, self.device)
        if server_args.quantization:
            if self.device != "cpu":
                raise ValueError(f"--quantization {server_args.quantization} is implemented for CPU only")
            from ember.layers.quantization import quantize_model
            quantize_model(self.model, server_args.quantization)
            logger.info("weights quantized to %s", server_args.quantization)
        self.page_size = server_args.page_size
        self.window = self.model.sliding_window()
        self.kv_cache = self._make_kv_cache(server_args)
        from ember.layers.fused_decode import maybe_fused_decoder
        self.fused_decoder = maybe_fused_decoder(self.model, self.kv_cache, not server_args.disable_fused_decode)

    def _make_kv_cache(self, args) -> KVCache:
        groups = self.model.kv_groups()
        cfg = self.config
        hkv, D = cfg.num_key_value_heads, head_dim_of(cfg)
        per_token = {g: KVCache.bytes_per_token(len(layers), hkv, D, self.dtype) for g, layers in groups.items()}
        if self.device == "cpu":
            budget = args.cpu_kv_cache_gb * 2**30
        else:
            free, total = torch.cuda.mem_get_info()
            budget = max(args.mem_fraction_static * total - (total - free), 2**28)
        P = self.page_size
        swa_tokens = 0
        if "swa" in groups:  # the window (plus one prefill chunk) per running request is all SWA layers need
            swa_tokens = args.max_running_requests * (self.window + args.chunked_prefill_size + 2 * P)
            swa_tokens = min(swa_tokens, int(budget // sum(per_token.values())))
            if args.max_total_tokens:
                swa_tokens = min(swa_tokens, args.max_total_tokens)
        full_tokens = int((budget - swa_tokens * per_token.get("swa", 0)) // per_token["full"])
        # never more than every running request at full context could use (small models, big GPUs)
        full_tokens = min(full_tokens, args.max_running_requests * self.context_limit(args))
        if args.max_total_tokens:
            full_tokens = min(full_tokens, args.max_total_tokens)
        pages = {"full": full_tokens // P + 1}
        if "swa" in groups:
            pages["swa"] = swa_tokens // P + 1
        logger.info("KV cache: %s pages of %d tokens (%s)", pages, P,
                    ", ".join(f"{g}: {len(l)} layers" for g, l in groups.items()))
        return KVCache(groups, pages, P, hkv, D, self.dtype, self.device)

    def context_limit(self, args) -> int:
        return args.context_length or self.config.max_position_embeddings

    # ------------------------------------------------------------------ batch -> tensors
    def build_batch(self, reqs, extend_lens) -> ForwardBatch:
        if max(extend_lens) == 1 and self.kv_cache.groups == ["full"]:
            return self._decode_batch(reqs)
        return self._general_batch(reqs, extend_lens)

    def _decode_batch(self, reqs) -> ForwardBatch:
        """What _general_batch builds when every request brings one token and all layers attend fully (the
        common step), with a few torch ops instead of ~30: at batch 1 their dispatch cost was ~0.5 ms."""
        P, B = self.page_size, len(reqs)
        pos = [r.kv_len for r in reqs]
        tables = [r.page_tables["full"] for r in reqs]
        width = max(len(t) for t in tables)
        pt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)  # [B, width]
        max_k = max(pos) + 1
        kv_slots = (pt.unsqueeze(2) * P + torch.arange(P)).reshape(B, -1)[:, :max_k]
        k_len = torch.tensor([p + 1 for p in pos])
        mask = None
        if min(pos) + 1 < max_k:  # unequal lengths: padding keys read slot 0 and are masked out
            valid = torch.arange(max_k).unsqueeze(0) < k_len.unsqueeze(1)
            kv_slots = torch.where(valid, kv_slots, torch.zeros_like(kv_slots))
            mask = valid.view(B, 1, 1, max_k).to(self.device)
        write_slots = torch.tensor([t[p // P] * P + p % P for t, p in zip(tables, pos)])
        rows = torch.arange(B, device=self.device)
        meta = AttentionMetadata(write_slots=write_slots.to(self.device), kv_slots=kv_slots.contiguous().to(self.device),
                                 mask=mask, q_pad_index=rows, kv_lens=k_len.to(self.device), batch_size=B, max_q=1)
        input_ids = torch.tensor([r.token_ids[p] for r, p in zip(reqs, pos)])
        return ForwardBatch(input_ids.to(self.device), torch.tensor(pos).to(self.device), {"full": meta}, self.kv_cache,
                            rows)

    def _general_batch(self, reqs, extend_lens) -> ForwardBatch:
        P = self.page_size
        B = len(reqs)
        q_start = torch.tensor([r.kv_len for r in reqs])
        q_len = torch.tensor(extend_lens)
        kv_end = q_start + q_len
        max_q = int(q_len.max())
        input_ids = torch.tensor([t for r, n in zip(reqs, extend_lens) for t in r.token_ids[r.kv_len:r.kv_len + n]])
        positions = torch.cat([torch.arange(r.kv_len, r.kv_len + n) for r, n in zip(reqs, extend_lens)])
        seq_of_token = torch.repeat_interleave(torch.arange(B), q_len)
        offset_in_seq = positions - q_start[seq_of_token]
        q_pad_index = seq_of_token * max_q + offset_in_seq
        ar_q = torch.arange(max_q).unsqueeze(0)
        q_pos = q_start.unsqueeze(1) + ar_q  # [B, max_q]
        q_valid = ar_q < q_len.unsqueeze(1)

        attn = {}
        for g in self.kv_cache.groups:
            window = self.window if g == "swa" else None
            k_start = (q_start - window + 1).clamp(min=0) if window else torch.zeros(B, dtype=torch.long)
            k_len = kv_end - k_start
            max_k = int(k_len.max())
            ar_k = torch.arange(max_k).unsqueeze(0)
            k_pos = k_start.unsqueeze(1) + ar_k  # [B, max_k]
            k_valid = ar_k < k_len.unsqueeze(1)
            tables = [r.page_tables[g] for r in reqs]
            width = max(len(t) for t in tables)
            pt = torch.zeros(B, width, dtype=torch.long)
            for i, t in enumerate(tables):
                pt[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            k_page = (k_pos // P).clamp(max=width - 1)
            kv_slots = torch.gather(pt, 1, k_page) * P + k_pos % P
            kv_slots = torch.where(k_valid, kv_slots, torch.zeros_like(kv_slots))
            write_slots = pt[seq_of_token, positions // P] * P + positions % P
            mask = k_valid.unsqueeze(1) & (k_pos.unsqueeze(1) <= q_pos.unsqueeze(2))
            if window:
                mask &= (q_pos.unsqueeze(2) - k_pos.unsqueeze(1)) < window
            mask[:, :, 0] |= ~q_valid  # padding query rows attend to something (ignored later)
            if max_q == 1 and bool(k_valid.all()):
                mask = None  # decode without padding: every gathered key is visible, skip the mask
            attn[g] = AttentionMetadata(
                write_slots=write_slots.to(self.device), kv_slots=kv_slots.to(self.device),
                mask=None if mask is None else mask.unsqueeze(1).to(self.device), q_pad_index=q_pad_index.to(self.device),
                kv_lens=k_len.to(self.device), batch_size=B, max_q=max_q)
        logit_index = torch.cumsum(q_len, 0) - 1
        return ForwardBatch(input_ids.to(self.device), positions.to(self.device), attn, self.kv_cache,
                            logit_index.to(self.device))

    def _logits(self, batch: ForwardBatch) -> torch.Tensor:
        """The model on one batch: logits at batch.logit_index (decode batches fused where that applies)."""
        if self.fused_decoder is not None and self.fused_decoder.applies_to(batch):
            with torch.inference_mode():
                return self.model.compute_logits(self.fused_decoder(batch).index_select(0, batch.logit_index))
        return self.model(batch)

    def forward(self, reqs, extend_lens, all_positions: bool = False, full_rows: list[bool] | None = None):
        """Logits (float32) at each request's last scheduled token: [B, vocab].
        all_positions: logits at every token instead, [T, vocab].
        full_rows: per request, whether it also wants logits at all of its scheduled tokens (prompt logprobs);
        then returns (last [B, vocab], {i: [n_i, vocab]})."""
        batch = self.build_batch(reqs, extend_lens)
        if all_positions:
            batch.logit_index = torch.arange(batch.input_ids.shape[0], device=self.device)
            return self._logits(batch)
        if not full_rows or not any(full_rows):
            return self._logits(batch)
        ends = torch.cumsum(torch.tensor(extend_lens), 0)
        index, spans = [], {}
        for i, (n, end, full) in enumerate(zip(extend_lens, ends.tolist(), full_rows)):
            start = len(index)
            index.extend(range(end - n, end) if full else [end - 1])
            spans[i] = (start, len(index))
        batch.logit_index = torch.tensor(index, device=self.device)
        logits = self._logits(batch)
        last = logits[torch.tensor([b - 1 for _, b in spans.values()], device=self.device)]
        return last, {i: logits[a:b] for i, (a, b) in spans.items() if full_rows[i]}
