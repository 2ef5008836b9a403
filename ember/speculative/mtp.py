"""EAGLE / NEXTN drafts from the target's own multi-token-prediction layers (Step-3.5's three, GLM's one nextn).

Draft step k (1..K) runs MTP layer k-1 with --enable-multi-layer-eagle (the last layer for steps beyond the
layers), else layer 0 for every step. As DeepSeek's MTP modules: step k at position i reads the embedding of
token i + k and the hidden state of step k-1 at the same position i (step 1: the target's last pre-norm hidden
state at i), and predicts token i + k + 1; each step attends over its own KV rows. Every step therefore has its
own KV pool (a reused layer must not overwrite another step's rows), and all steps share one page table per
request. A drafting round runs every step over positions [valid, L) at once (an extend): the positions whose MTP
rows a previous round could not confirm, then the newest one, where step k's last row gives draft k.

Rows of MTP KV are valid while every token they read is a verified one: after a round at L with drafts d,
position i stays valid iff i + K <= L + (drafts the target kept), so `valid` only moves forward.
Positions served from the prefix cache have no MTP rows (the target never ran them here): the MTP layer then
reads whatever those rows hold, which only costs acceptance, never correctness.
"""
from __future__ import annotations

import logging

import torch

from ember.engine.kv_pool import KVCache, PageAllocator
from ember.engine.token_window import TokenWindow

logger = logging.getLogger("ember.speculative")


def mtp_layers_of(model) -> list:
    if hasattr(model, "mtp_layers"):  # Step-3.5
        return list(model.mtp_layers)
    return list(getattr(model.model, "mtp", []) or [])  # GLM-4.7-Flash (DeepSeek-style nextn)


def restore_mtp_clamps(model, model_dir) -> None:
    """Step-3.5's SwiGLU clamps of the MTP layers: the hub's config.json pads swiglu_limits(_shared) with one entry
    per MTP layer, which transformers' config trims away (the layers were built without them); read them back."""
    import json
    from pathlib import Path
    if not hasattr(model, "mtp_layers") or not len(model.mtp_layers):
        return
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    n = model.config.num_hidden_layers
    routed, shared = raw.get("swiglu_limits") or [], raw.get("swiglu_limits_shared") or []
    for i, layer in enumerate(model.mtp_layers):
        r = float(routed[n + i]) if len(routed) > n + i and routed[n + i] else None
        s = float(shared[n + i]) if len(shared) > n + i and shared[n + i] else None
        if getattr(layer, "sparse", False):
            layer.moe.experts.swiglu_limit = r
            layer.share_expert.limit = s
        elif hasattr(layer, "mlp"):
            layer.mlp.limit = s  # a dense layer uses the shared clamp (as the main layers)


def _attention_of(layer):
    return next(m for m in layer.modules() if hasattr(m, "layer_id") and hasattr(m, "group"))


class _Shim:
    """Just what the batch builder reads."""
    __slots__ = ("token_ids", "kv_len", "page_tables")

    def __init__(self, token_ids, kv_len, page_tables):
        self.token_ids, self.kv_len, self.page_tables = token_ids, kv_len, page_tables


class _BatchBuilder:
    """ModelRunner._general_batch over one MTP step's pool."""

    def __init__(self, runner, kv_cache):
        self.page_size, self.window, self.device, self.kv_cache = runner.page_size, runner.window, runner.device, kv_cache
        self.attn_backend = runner.attn_backend

    def build(self, reqs, lens):
        from ember.engine.model_runner import ModelRunner
        return ModelRunner._general_batch(self, reqs, lens)


class _State:
    __slots__ = ("pages", "h0", "hidden", "valid", "run_at", "run_drafts")

    def __init__(self, start: int, rows: torch.Tensor):
        self.pages: list[int] = []
        self.h0, self.hidden, self.valid = start, rows, start
        self.run_at, self.run_drafts = None, []

    @property
    def h_end(self) -> int:
        return self.h0 + self.hidden.shape[0]


class MTPDrafter:
    needs_hidden = True

    def __init__(self, runner, model_dir, vocab_size: int, cfg):
        """On every rank of a tensor-parallel engine (its MTP layers are sharded like the model's): each rank's replica
        makes the same calls on the same inputs (ember/distributed/driver.py DrafterCall), so all pick the same drafts."""
        self.runner = runner
        self.model = model = runner.model
        layers = mtp_layers_of(model)
        if not layers:
            raise ValueError(f"--speculative-algorithm {cfg.algorithm} drafts with the model's own MTP (nextn) layers, "
                             f"and {type(model).__name__} has none; use STANDALONE or NGRAM")
        restore_mtp_clamps(model, model_dir)
        self.K = cfg.num_steps  # (a chain: num_draft_tokens - 1)
        self.topk, self.vocab = cfg.topk, vocab_size
        self.step_layers = [layers[min(k, len(layers) - 1)] if cfg.multi_layer else layers[0] for k in range(self.K)]
        kv = runner.kv_cache
        pages = kv.allocators["full"].num_pages
        self.page_size = kv.page_size
        self.allocator = PageAllocator(pages)
        self.builders = []
        for layer in self.step_layers:
            attn = _attention_of(layer)
            lid, group = attn.layer_id, attn.group
            shape = (model.kv_layer_shape(lid) if hasattr(model, "kv_layer_shape")
                     else (attn.num_kv_heads, attn.head_dim, attn.head_dim))
            cache = KVCache({group: [lid]}, {group: pages}, kv.page_size, {lid: tuple(shape)}, runner.dtype, runner.device)
            self.builders.append(_BatchBuilder(runner, cache))
        self.states: dict[str, _State] = {}
        logger.info("MTP drafts: %d steps over %d MTP layer(s)%s", self.K, len(layers),
                    " chained" if cfg.multi_layer else " (layer 0 reused)")

    def _logits(self, layer, y):
        if hasattr(layer, "shared_head"):  # GLM: its own norm, the main lm_head
            return self.model.compute_logits(layer.shared_head.norm(y))
        head = layer.transformer.shared_head  # Step-3.5: its own norm and output head
        return head.output(head.norm(y)).float()

    def cover(self, st, slots: int) -> bool:
        """Give a request's MTP state pages for `slots` slots; False (nothing taken) if the pool is short."""
        need = -(-slots // self.page_size) - len(st.pages)
        if need > 0:
            got = self.allocator.alloc(need)
            if got is None:
                return False
            st.pages.extend(got)
        return True

    def propose(self, reqs, caps: list[int]) -> list[list[int]]:
        out = [[] for _ in reqs]
        live, starts, prevs, exts = [], [], [], []
        for i, r in enumerate(reqs):
            st = self.states.get(r.rid)
            L = r.kv_len
            if st is None or st.h_end != L or st.valid >= L:
                continue
            if not self.cover(st, L):
                continue
            live.append(i)
            starts.append(st.valid)
            prevs.append(st.hidden[st.valid - st.h0:])
            exts.append(r.token_ids[st.valid:])  # positions valid .. len - 1, and the drafts appended
        if not live:
            return out
        lens = [reqs[i].kv_len - s for i, s in zip(live, starts)]
        last = torch.cumsum(torch.tensor(lens), 0) - 1
        prev = torch.cat(prevs)
        with torch.inference_mode():
            for k, (layer, builder) in enumerate(zip(self.step_layers, self.builders)):
                if k >= max(caps[i] for i in live):
                    break
                # step k at position p reads token p + k + 1
                shims = [_Shim(TokenWindow(s - k - 1, e), s,
                               {g: self.states[reqs[i].rid].pages for g in builder.kv_cache.groups})
                         for i, e, s in zip(live, exts, starts)]
                batch = builder.build(shims, lens)
                embed = self.model.model.embed_tokens(batch.input_ids)
                x = layer.eh_proj(torch.cat([layer.enorm(embed), layer.hnorm(prev.to(embed.dtype))], dim=-1))
                prev = super(type(layer), layer).forward(batch.positions, x, batch)
                toks = self._logits(layer, prev.index_select(0, last.to(prev.device))).argmax(dim=-1).tolist()
                for e, t in zip(exts, toks):
                    e.append(t)
        for j, i in enumerate(live):
            st = self.states[reqs[i].rid]
            st.run_at = reqs[i].kv_len
            st.run_drafts = exts[j][len(reqs[i].token_ids) - starts[j]:]
            out[i] = st.run_drafts[:caps[i]]
        return out

    def propose_tree(self, reqs, ncaps: list[int], dcaps: list[int]) -> list:
        from ember.speculative.mtp_tree import propose_tree
        return propose_tree(self, reqs, ncaps, dcaps)

    def update(self, req, start: int, rows) -> None:
        """After a target step: the hidden states of its verified new positions [start, kv_len), which are `rows` (a
        slice or a list of indices) of the step's runner.last_hidden."""
        if rows is None:
            return
        hidden = self.runner.last_hidden
        rows = hidden[rows] if isinstance(rows, slice) else hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        st = self.states.get(req.rid)
        if st is None or start == 0 or st.h_end != start:  # new, recomputed after preemption, or out of step
            if st is not None:
                self.allocator.free(st.pages)
            self.states[req.rid] = _State(start, rows.detach())
            return
        st.hidden = torch.cat([st.hidden, rows.detach()])
        if st.run_at is not None:
            L, kept = st.run_at, 0
            real = req.token_ids[L + 1:]
            while kept < min(len(real), len(st.run_drafts)) and real[kept] == st.run_drafts[kept]:
                kept += 1
            st.valid = max(st.valid, min(L, L + kept - self.K + 1))
            st.run_at, st.run_drafts = None, []
        st.hidden, st.h0 = st.hidden[st.valid - st.h0:], st.valid  # rows before `valid` are never read again

    def sync(self, live_rids) -> None:
        for rid in [r for r in self.states if r not in live_rids]:
            self.allocator.free(self.states.pop(rid).pages)
