"""STANDALONE drafts: a small model with the same tokenizer proposes greedily, one token per draft step.

The draft model has its own runner and KV pool; each request keeps a page table there and `kv_len`, the prefix
whose draft KV is valid. A step first catches the draft up on the tokens it has not seen (the previous verify's
accepted tokens and the target's own token: one extend), then decodes the remaining drafts one at a time. Draft
KV rows of rejected tokens are overwritten on the next catch-up (kv_len is cut back to the verified prefix).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

logger = logging.getLogger("ember.speculative")


class _DraftReq:
    """What the draft runner's batch builder reads: token ids, the KV prefix, page tables."""
    __slots__ = ("token_ids", "kv_len", "page_tables", "spec_tree")

    def __init__(self, token_ids, kv_len, page_tables):
        self.token_ids, self.kv_len, self.page_tables = token_ids, kv_len, page_tables
        self.spec_tree = None


class _State:
    __slots__ = ("kv_len", "page_tables", "written")

    def __init__(self, groups):
        self.kv_len, self.written = 0, 0
        self.page_tables = {g: [] for g in groups}


class DraftModelDrafter:
    needs_hidden = False

    def __init__(self, core, cfg):
        from transformers import AutoConfig

        from ember.engine.model_runner import ModelRunner
        from ember.loader import resolve_model_dir
        args = core.args
        draft_dir = resolve_model_dir(cfg.draft_model_path)
        hf = AutoConfig.from_pretrained(draft_dir, trust_remote_code=args.trust_remote_code)
        kv = core.runner.kv_cache
        tokens = kv.allocators["full"].total * kv.page_size  # as many tokens as the target's pool
        # one whole copy on this process (rank 0 of a tensor-parallel engine): it drafts between the target's steps,
        # which are the only calls the other ranks take part in
        dargs = dataclasses.replace(args, model_path=str(draft_dir), max_total_tokens=tokens,
                                    context_length=core.context_length, tp_size=1, ep_size=1)
        self.runner = ModelRunner(draft_dir, hf, dargs)
        self.vocab = min(core.vocab_size, self.runner.config.vocab_size)  # drafts the target can verify
        self.steps = cfg.max_drafts
        self.topk = cfg.topk
        self.min_confidence = cfg.draft_min_confidence
        self.hot = None  # --speculative-token-map: the ids the draft's lm_head was cut to (logit j is token hot[j])
        if cfg.token_map:
            self.hot = load_token_map(cfg.token_map, self.vocab).to(self.runner.device)
            model = self.runner.model
            model.lm_head = cut_lm_head(model.lm_head, self.hot)
            logger.info("draft lm_head cut to the %d token ids of %s", len(self.hot), cfg.token_map)
        self.page_size = self.runner.kv_cache.page_size
        self.allocators = self.runner.kv_cache.allocators
        self.states: dict[str, _State] = {}
        logger.info("draft model %s loaded", cfg.draft_model_path)

    def _vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the ids the target can verify ([n, vocab]; -inf outside a token map), for the
        trees, whose candidates are token ids."""
        if self.hot is None:
            return logits[:, :self.vocab]
        full = logits.new_full((logits.shape[0], self.vocab), float("-inf"))
        full[:, self.hot] = logits
        return full

    def _alloc(self, st: _State, upto: int) -> bool:
        need = {g: -(-upto // self.page_size) - len(t) for g, t in st.page_tables.items()}
        if any(n > self.allocators[g].num_free for g, n in need.items()):
            return False
        for g, n in need.items():
            if n > 0:
                st.page_tables[g].extend(self.allocators[g].alloc(n))
        return True

    def _free(self, st: _State) -> None:
        for g, t in st.page_tables.items():
            self.allocators[g].free(t)
            st.page_tables[g] = []

    def propose(self, reqs, caps: list[int]) -> list[list[int]]:
        out = [[] for _ in reqs]
        live, ext, shims = [], [], []
        for i, (r, cap) in enumerate(zip(reqs, caps)):
            st = self.states.get(r.rid)
            if st is None:
                st = self.states[r.rid] = _State(self.allocators)
            # the verified prefix only (a preempted target recomputes; the draft's rows stay valid)
            st.kv_len = min(st.kv_len, st.written, len(r.token_ids) - 1)
            if not self._alloc(st, len(r.token_ids) + cap - 1):
                continue
            live.append(i)
            ext.append(list(r.token_ids))
            shims.append(_DraftReq(ext[-1], st.kv_len, st.page_tables))
        if not live:
            return out
        lens = [len(e) - s.kv_len for e, s in zip(ext, shims)]
        room, caps = caps, list(caps)
        runner_up = {}  # request index -> the draft's second choice beside its last (cut) draft
        k = max(caps[i] for i in live)
        with torch.inference_mode():
            for step in range(k):
                active = [j for j, i in enumerate(live) if step < caps[i]]
                if not active:
                    break
                logits = self.runner.forward([shims[j] for j in active], [lens[j] for j in active])
                if self.hot is None:
                    logits = logits[:, :self.vocab]
                best = logits.argmax(dim=-1)  # (with a token map: column j is token hot[j])
                toks = (best if self.hot is None else self.hot[best]).tolist()
                # the top token's probability, only where a cut is asked for (a softmax over the vocabulary per step)
                conf = logits.float().softmax(-1).amax(-1).tolist() if self.min_confidence > 0 else [1.0] * len(toks)
                for a, (j, t, p) in enumerate(zip(active, toks, conf)):
                    shims[j].kv_len += lens[j]
                    lens[j] = 1
                    ext[j].append(t)
                    out[live[j]].append(t)
                    if p < self.min_confidence:  # likely rejected: the drafts after it even more so
                        caps[live[j]] = step + 1
                        if step + 2 <= room[live[j]]:  # room for one more node: the runner-up, verified beside it
                            second = logits[a].topk(2).indices[1]
                            runner_up[live[j]] = int(second if self.hot is None else self.hot[second])
        for j, i in enumerate(live):
            st = self.states[reqs[i].rid]
            st.written = shims[j].kv_len  # rows < written hold ext[:written]; kept ones are cut in update
            st.kv_len = shims[j].kv_len
        for i, t in runner_up.items():
            out[i] = with_runner_up(reqs[i].token_ids[-1], out[i], t)
        return out

    def propose_tree(self, reqs, ncaps: list[int], dcaps: list[int]) -> list:
        """Tree drafts (tree.py): the catch-up extend gives the root's top-k children; each later step runs the k
        frontier nodes of every request as k more tokens after the root, under the tree mask (a node sees the
        verified prefix, its ancestors and itself), at RoPE position root + depth."""
        from ember.speculative.tree import Candidates, TreeSpec
        out = [None] * len(reqs)
        k = self.topk
        live, shims, cands = [], [], []
        for i, r in enumerate(reqs):
            st = self.states.get(r.rid)
            if st is None:
                st = self.states[r.rid] = _State(self.allocators)
            st.kv_len = min(st.kv_len, st.written, len(r.token_ids) - 1)
            if not self._alloc(st, len(r.token_ids) + (dcaps[i] - 1) * k):
                continue
            live.append(i)
            shims.append(_DraftReq(list(r.token_ids), st.kv_len, st.page_tables))
            cands.append(Candidates())
        if not live:
            return out
        with torch.inference_mode():
            logits = self.runner.forward(shims, [len(s.token_ids) - s.kv_len for s in shims])
            lp = self._vocab_logits(logits).float().log_softmax(-1)
            for j, c in enumerate(cands):
                c.expand(lp[j:j + 1], k)
                st = self.states[reqs[live[j]].rid]
                st.kv_len = st.written = len(shims[j].token_ids)  # the verified prefix and the root: rows kept
            # per request: the tree nodes run so far (candidate ids in slot order after the root)
            slot_of = [{} for _ in live]
            for step in range(1, max(dcaps[i] for i in live)):
                active = [j for j, i in enumerate(live) if step < dcaps[i]]
                for j in active:
                    s, c, root = shims[j], cands[j], len(reqs[live[j]].token_ids) - 1
                    s.kv_len = len(s.token_ids)
                    for f in c.frontier:
                        slot_of[j][f] = len(slot_of[j])
                        s.token_ids.append(c.tokens[f])
                    nodes = sorted(slot_of[j], key=slot_of[j].get)
                    vis = torch.eye(len(nodes), dtype=torch.bool)
                    for a, f in enumerate(nodes):
                        p = c.parents[f]
                        if p >= 0:
                            vis[a] |= vis[slot_of[j][p]]  # parents run before their children
                    s.spec_tree = TreeSpec(root + 1, [root + len(c.path_tokens(f)) for f in nodes], vis)
                logits = self.runner.forward([shims[j] for j in active], [k] * len(active), all_positions=True)
                lp = self._vocab_logits(logits).float().log_softmax(-1)
                for a, j in enumerate(active):
                    cands[j].expand(lp[a * k:(a + 1) * k], k)
        for j, i in enumerate(live):
            out[i] = cands[j].tree(reqs[i].token_ids[-1], ncaps[i] + 1, dcaps[i])
        return out

    def update(self, req, start, rows=None) -> None:
        """After each target step: rows at positions whose token the target kept stay valid: cut kv_len back to the verified prefix."""
        st = self.states.get(req.rid)
        if st is not None:
            st.kv_len = min(st.written, req.kv_len)

    def sync(self, live_rids) -> None:
        for rid in [r for r in self.states if r not in live_rids]:
            self._free(self.states.pop(rid))


def with_runner_up(root: int, chain: list[int], second: int):
    """A chain cut by the confidence cut as a tree: its last draft gets a sibling, the draft's second choice there
    (where the draft was unsure, its runner-up is often the target's token: half the time on spec_bench's chat
    prompts). One more verify row, no more draft steps, and the draft's KV stays valid whichever sibling wins: the
    draft model never ran on the last draft."""
    from ember.speculative.tree import DraftTree
    n = len(chain)
    return DraftTree([root, *chain, second], [-1, *range(n), n - 1])


def load_token_map(path: str, vocab: int) -> torch.Tensor:
    """The token ids of a --speculative-token-map file (a JSON list, or a torch .pt tensor / list as SGLang's), sorted."""
    import json
    try:
        if path.endswith(".json"):
            with open(path) as f:
                ids = json.load(f)
        else:
            ids = torch.load(path, map_location="cpu", weights_only=True)
        ids = torch.as_tensor(ids).to(torch.long).flatten().unique()  # (unique sorts)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"--speculative-token-map {path!r}: not a list of token ids ({type(e).__name__}: {e})") from e
    if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= vocab:
        raise ValueError(f"--speculative-token-map {path!r}: needs token ids in [0, {vocab})")
    return ids


def cut_lm_head(head, ids: torch.Tensor):
    """The output projection restricted to rows `ids` (its logit j is token ids[j]): fewer weights to read per step."""
    from torch import nn
    if hasattr(head, "select_rows"):  # w4a8's group-quantized linear: the same codes, re-tiled
        return head.select_rows(ids)
    if isinstance(head, nn.Linear):  # (the draft model runs whole: tp 1)
        cut = nn.Linear(head.in_features, len(ids), bias=head.bias is not None, device=head.weight.device,
                        dtype=head.weight.dtype)
        with torch.no_grad():
            cut.weight.copy_(head.weight[ids])
            if head.bias is not None:
                cut.bias.copy_(head.bias[ids])
        return cut.requires_grad_(False)
    return _Selected(head, ids)


class _Selected(torch.nn.Module):
    """Any other head (other quantizations): the full logits, then the map's columns (no faster, still correct)."""

    def __init__(self, head, ids):
        super().__init__()
        self.head, self.ids = head, ids

    def forward(self, x):
        return self.head(x).index_select(-1, self.ids.to(x.device))
