"""Verifying a draft tree (topk > 1): sampler rows per node, grammar masks per node, the accepted path's KV.

Acceptance is the chain's rule applied along the tree: the target's own token is sampled at every node (the
engine's sampler, the request as it would be after that node's path: penalties, grammar state, the seeded noise of
that output position), and from the root we follow the child holding that token. Every draft is a deterministic
function of its context (top-k of a draft model), so the emitted tokens are exactly a sample of the target, token
by token, as in verify.py's argument for chains: greedy is exact and sampling lossless (seeded requests even draw
the tokens of speculation off).
"""
from __future__ import annotations

from ember.speculative.tree import DraftTree
from ember.speculative.verify import DraftView


def node_views(req, tree: DraftTree) -> list[DraftView]:
    return [DraftView(req, [tree.tokens[x] for x in tree.path(j)]) for j in range(len(tree))]


def tree_grammar_rows(grammar_backend, req, tree: DraftTree):
    """Bitmask rows for a constrained request at every node (the matcher walked down each branch and rolled back).
    Rows under a draft the grammar refuses stay all-allowed: that draft can never be accepted, so they are unused."""
    import xgrammar as xgr
    m = req.grammar
    mask = xgr.allocate_token_bitmask(len(tree), grammar_backend.vocab_size)

    def visit(j: int) -> None:
        if m.is_terminated():
            return
        m.fill_next_token_bitmask(mask, j)
        for tok, child in tree.children[j].items():
            if m.accept_token(tok):
                visit(child)
                m.rollback(1)

    visit(0)
    return mask


def path_kv_moves(req, start: int, nodes: list[int], page_size: int) -> dict:
    """Node j's KV was written at slot position start + j; the kept path must sit at start, start + 1, ...: per KV
    group (full, sliding-window) the (destination, source) pool slots, for ModelRunner.move_kv. Sources never
    precede their destinations."""
    moves = [(start + i, start + j) for i, j in enumerate(nodes) if i != j]
    if not moves:
        return {}
    P = page_size
    return {g: ([table[p // P] * P + p % P for p, _ in moves], [table[p // P] * P + p % P for _, p in moves])
            for g, table in req.page_tables.items()}
