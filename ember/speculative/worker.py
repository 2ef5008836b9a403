"""One engine step with speculation: draft, verify every draft in one target forward, accept, roll back.

Hooked into EngineCore.step after the scheduler built the batch. Requests that decode (one token to run) get up
to `num_draft_tokens - 1` drafts: their pages for the drafted positions are allocated here (never by preempting:
when the pool is short the request just decodes plainly), the drafts ride in token_ids for the forward only
(like a prefill chunk: the general batch path runs several new tokens per request over the paged KV), and
after acceptance the request keeps exactly the pages of its verified tokens. The KV rows written for rejected
drafts lie beyond kv_len, so nothing reads them before they are overwritten, and the prefix cache only ever
receives token_ids[:kv_len] (verified). Other requests in the batch (prefill chunks) run as in the plain step.
With --speculative-eagle-topk > 1 the drafts are a tree (tree.py): its nodes ride in token_ids in node order under a
tree attention mask, and after acceptance the kept path's KV is moved to consecutive slots (tree_verify.py).
"""
from __future__ import annotations

import logging

import torch

from ember.speculative.config import SpecConfig
from ember.speculative.tree import DraftTree
from ember.speculative.tree_verify import node_views, path_kv_moves, tree_grammar_rows
from ember.speculative.verify import DraftView, accept_length, grammar_rows

logger = logging.getLogger("ember.speculative")


def make_drafter(core, cfg: SpecConfig):
    if cfg.algorithm == "NGRAM":
        from ember.speculative.ngram import NgramDrafter
        return NgramDrafter(cfg)
    if cfg.algorithm == "STANDALONE":
        from ember.speculative.draft_model import DraftModelDrafter
        return DraftModelDrafter(core, cfg)
    if hasattr(core.runner, "replicated_drafter"):  # tensor parallel: a replica on every rank (its layers are sharded)
        return core.runner.replicated_drafter(core.vocab_size, cfg)
    from ember.speculative.mtp import MTPDrafter
    return MTPDrafter(core.runner, core.model_dir, core.vocab_size, cfg)


class SpecWorker:
    def __init__(self, core, cfg: SpecConfig):
        self.cfg = cfg
        # topk > 1: every draft is a DraftTree (tree.py) verified under a tree attention mask; otherwise chains (lists),
        # but a STANDALONE chain cut by the confidence cut is a DraftTree too (its last draft and the runner-up)
        self.tree = cfg.topk > 1
        self.drafter = make_drafter(core, cfg)
        self.verify_ct = 0  # verify forwards (per request)
        self.verified_tokens = 0  # tokens those verifies produced (accepted drafts + the target's own token)
        self.drafted = 0
        logger.info("speculative decoding: %s, %d steps, topk %d, %d draft tokens", cfg.algorithm, cfg.num_steps,
                    cfg.topk, cfg.num_draft_tokens)

    def stats(self) -> dict:
        return {"algorithm": self.cfg.algorithm, "num_draft_tokens": self.cfg.num_draft_tokens,
                "verify_ct": self.verify_ct, "draft_tokens": self.drafted, "accepted_tokens": self.verified_tokens,
                "avg_accept_length": self.verified_tokens / self.verify_ct if self.verify_ct else 0.0}

    # ---------------------------------------------------------------- drafting
    def _draft(self, core, reqs, lens) -> list:
        off_at = self.cfg.disable_by_batch_size
        if off_at is not None and sum(n == 1 and r.extend_len == 1 for r, n in zip(reqs, lens)) >= off_at:
            return [[] for _ in reqs]  # a plain step (the drafter catches up on these tokens when it drafts again)
        if self.tree:
            return self._draft_trees(core, reqs, lens)
        drafts = [[] for _ in reqs]
        idx, caps = [], []
        for i, (r, n) in enumerate(zip(reqs, lens)):
            if n != 1 or r.extend_len != 1 or r.forced_ids or r.return_prompt_logprobs:
                continue
            # no draft past max_tokens (the verify emits accepted + 1) or the context
            cap = min(self.cfg.max_drafts, r.sampling.max_new_tokens - r.num_output - 1,
                      core.context_length - len(r.token_ids))
            if cap > 0:
                idx.append(i)
                caps.append(cap)
        if not idx:
            return drafts
        proposals = self.drafter.propose([reqs[i] for i in idx], caps)
        for i, cap, d in zip(idx, caps, proposals):
            if not isinstance(d, DraftTree):  # (a chain whose last draft has a sibling: a DraftTree of cap nodes)
                d = list(d[:cap])
            toks = _tokens(d)
            if toks and len(toks) <= cap and all(0 <= t < core.vocab_size for t in toks) and \
                    core.scheduler._try_alloc(reqs[i], reqs[i].kv_len + 1 + len(toks)):
                drafts[i] = d
        return drafts

    def _draft_trees(self, core, reqs, lens) -> list:
        """A DraftTree (or [] for none) per request: at most max_drafts nodes past the root within the context, and
        no deeper than num_steps nor past max_tokens (one verify emits up to depth + 1 tokens)."""
        trees = [[] for _ in reqs]
        idx, ncaps, dcaps = [], [], []
        for i, (r, n) in enumerate(zip(reqs, lens)):
            if n != 1 or r.extend_len != 1 or r.forced_ids or r.return_prompt_logprobs:
                continue
            ncap = min(self.cfg.max_drafts, core.context_length - len(r.token_ids))
            dcap = min(self.cfg.num_steps, r.sampling.max_new_tokens - r.num_output - 1)
            if ncap > 0 and dcap > 0:
                idx.append(i)
                ncaps.append(ncap)
                dcaps.append(dcap)
        if not idx:
            return trees
        proposals = self.drafter.propose_tree([reqs[i] for i in idx], ncaps, dcaps)
        for i, t in zip(idx, proposals):
            if t is not None and len(t) > 1 and all(0 <= x < core.vocab_size for x in t.drafts) and \
                    core.scheduler._try_alloc(reqs[i], reqs[i].kv_len + len(t)):
                trees[i] = t
        return trees

    # ---------------------------------------------------------------- the target forward
    def _forward(self, core, reqs, lens, full_rows):
        """(last logits [B, V], {i: rows [n_i, V]}, hidden [T, H] pre-norm or None)."""
        runner = core.runner
        if not self.drafter.needs_hidden:
            if any(full_rows):
                last, full = runner.forward(reqs, lens, full_rows=full_rows)
                return last, full, None
            return runner.forward(reqs, lens), {}, None
        return runner.forward_hidden(reqs, lens, full_rows)

    # ---------------------------------------------------------------- the step
    def step(self, core, batch) -> list:
        reqs, lens = batch.reqs, list(batch.extend_lens)
        drafts = self._draft(core, reqs, lens)
        starts = [r.kv_len for r in reqs]
        decoding = [r.extend_len == 1 and r.num_output > 0 for r in reqs]  # (a step without drafts still counts)
        wants_prompt = [r.return_prompt_logprobs and r.kv_len < len(r.prompt_ids) for r in reqs]
        for r, d, i in zip(reqs, drafts, range(len(reqs))):
            if d:
                r.token_ids.extend(_tokens(d))
                lens[i] += len(_tokens(d))
                if isinstance(d, DraftTree):  # node j at slot kv_len + j, RoPE position kv_len + depth, sees its ancestors
                    r.spec_tree = d.spec(r.kv_len)
        try:
            last, full, hidden = self._forward(core, reqs, lens, [bool(d) or w for d, w in zip(drafts, wants_prompt)])
        finally:
            for r, d in zip(reqs, drafts):
                if d:
                    del r.token_ids[-len(_tokens(d)):]
                    if isinstance(d, DraftTree):
                        del r.spec_tree
        outs = []
        for i, (req, n) in enumerate(zip(reqs, lens)):
            if wants_prompt[i]:
                core._record_prompt_logprobs(req, full[i])
            if not drafts[i]:
                req.kv_len += n
                if n > 1:
                    core.scheduler.cache_prefix(req)
        ready = [i for i, r in enumerate(reqs) if not drafts[i] and r.extend_len == 0]
        for i in [i for i in ready if reqs[i].sampling.max_new_tokens == 0]:
            reqs[i].finished, reqs[i].finish_reason = True, "length"
            core.scheduler.finish(reqs[i])
            outs.append(self._report(core, reqs[i]))
        ready = [i for i in ready if not reqs[i].finished]
        verify = [i for i, d in enumerate(drafts) if d]
        # one sampler call over every row: a ready request's last row, each verified position of the others
        rows, views, spans = [], [], {}
        for i in ready:
            spans[i] = (len(views), 1)
            rows.append(last[i:i + 1])
            views.append(DraftView(reqs[i], []))
        for i in verify:
            d = drafts[i]
            rows.append(full[i])
            if isinstance(d, DraftTree):
                spans[i] = (len(views), len(d))
                views.extend(node_views(reqs[i], d))
            else:
                spans[i] = (len(views), len(d) + 1)
                views.extend(DraftView(reqs[i], d[:j]) for j in range(len(d) + 1))
        if views:
            mask = self._grammar_mask(core, reqs, ready, verify, drafts, spans, len(views))
            sampled, logprobs = core.sampler.sample(torch.cat(rows), views, mask)
            for i in ready:
                req, (r0, _) = reqs[i], spans[i]
                core._append_token(req, sampled[r0], logprobs[r0] if logprobs else None)
                if decoding[i]:
                    self._count(req, 1, 0)
                self._after(core, req, starts[i], hidden, lens, i)
                outs.append(self._report(core, req))
            for i in verify:
                if isinstance(drafts[i], DraftTree):
                    nodes = self._accept_tree(core, reqs[i], drafts[i], spans[i][0], sampled, logprobs)
                else:
                    nodes = None
                    self._accept(core, reqs[i], drafts[i], spans[i][0], sampled, logprobs)
                self._after(core, reqs[i], starts[i], hidden, lens, i, nodes)
                outs.append(self._report(core, reqs[i]))
        for i, req in enumerate(reqs):  # prefill chunks still going: the drafter sees their hidden states
            if i not in spans and not req.finished:
                self._after(core, req, starts[i], hidden, lens, i)
        self.drafter.sync({r.rid for r in core.scheduler.running} | {r.rid for r in core.scheduler.waiting})
        return outs

    def _grammar_mask(self, core, reqs, ready, verify, drafts, spans, num_rows):
        if not any(reqs[i].grammar is not None for i in ready + verify):
            return None
        import xgrammar as xgr
        mask = xgr.allocate_token_bitmask(num_rows, core.vocab_size)
        rows = []
        for i in ready:
            if reqs[i].grammar is not None:
                reqs[i].grammar.fill_next_token_bitmask(mask, spans[i][0])
                rows.append(spans[i][0])
        for i in verify:
            if reqs[i].grammar is not None:
                r0, k = spans[i]
                rows_of = tree_grammar_rows if isinstance(drafts[i], DraftTree) else grammar_rows
                mask[r0:r0 + k] = rows_of(core.grammar, reqs[i], drafts[i])
                rows.extend(range(r0, r0 + k))
        return mask, rows

    def _accept(self, core, req, d, r0, sampled, logprobs) -> None:
        t = sampled[r0:r0 + len(d) + 1]
        a = accept_length(t, d)
        L = req.kv_len  # positions L (the last real token) .. L + len(d) were written by the verify
        m = 0
        for j in range(a + 1):
            core._append_token(req, t[j], logprobs[r0 + j] if logprobs else None)
            m += 1
            if req.finished or req.forced_ids:  # a stop / max_tokens / the thinking budget cut the rest
                break
        # the m kept tokens sit at positions L+1 .. L+m; all but the last have verified KV rows (the last one, as after
        # any step, is the next input: when the rest was cut its row exists too, but it is simply recomputed)
        req.kv_len = L + m
        self._trim_pages(core, req)
        self._count(req, m, len(d))

    def _accept_tree(self, core, req, tree, r0, sampled, logprobs) -> list[int]:
        """Walk the tree along the target's tokens; the kept nodes' KV moves to consecutive slots. Returns the nodes
        whose KV rows are now positions kv_len_before .. kv_len - 1 (root first)."""
        t = sampled[r0:r0 + len(tree)]
        path = tree.walk(t)
        L = req.kv_len
        m = 0
        for node in path:
            core._append_token(req, t[node], logprobs[r0 + node] if logprobs else None)
            m += 1
            if req.finished or req.forced_ids:  # a stop / max_tokens / the thinking budget cut the rest
                break
        core.runner.move_kv(path_kv_moves(req, L, path[:m], core.runner.page_size))
        req.kv_len = L + m
        self._trim_pages(core, req)
        self._count(req, m, len(tree) - 1)
        return path[:m]

    def _count(self, req, produced: int, drafted: int) -> None:
        """Per request and engine-wide: decode steps (each a verify, drafts or not, as in SGLang) and their tokens."""
        req.spec_verify_ct = getattr(req, "spec_verify_ct", 0) + 1
        req.spec_verified_tokens = getattr(req, "spec_verified_tokens", 0) + produced
        self.verify_ct += 1
        self.verified_tokens += produced
        self.drafted += drafted

    @staticmethod
    def _trim_pages(core, req) -> None:
        """Give back the pages allocated for rejected drafts: the request keeps pages for positions < kv_len, as
        after a plain step."""
        need = core.scheduler.pages_needed(req.kv_len)
        for g, table in req.page_tables.items():
            if len(table) > need:
                core.scheduler.allocators[g].free(table[need:])
                del table[need:]

    def _after(self, core, req, start, hidden, lens, i, nodes=None) -> None:
        rows = None  # which rows of the target's hidden states (runner.last_hidden) the drafter keeps
        if self.drafter.needs_hidden and hidden is not None:
            off = sum(lens[:i])
            if nodes is not None:  # a verified tree: the rows of the kept path
                rows = [off + j for j in nodes]
            else:
                rows = slice(off, off + req.kv_len - start)  # the target's hidden states of the verified new positions
        self.drafter.update(req, start, rows)
        if req.finished:
            core.scheduler.finish(req)

    @staticmethod
    def _report(core, req):
        out = core._report(req)
        out.spec_verify_ct = getattr(req, "spec_verify_ct", 0)
        out.spec_verified_tokens = getattr(req, "spec_verified_tokens", 0)
        return out


def _tokens(d) -> list[int]:
    """A draft's tokens in the order they ride in the verify: a chain's, or a tree's nodes after the root."""
    return d.drafts if isinstance(d, DraftTree) else d
