"""NGRAM drafts: continue the request's own text where its latest suffix occurred before (prompt + output).

The longest suffix of between --speculative-ngram-min-match-window-size and -max- tokens that occurred earlier
wins (the most recent occurrence among equally long ones); the tokens that followed it are the draft. Code
edits, quotes and lists repeat the prompt, so drafts there are long and mostly right; costs no model. With
--speculative-ngram-max-bfs-breadth > 1 the continuations of all matches form a tree (verified as tree drafts).
"""
from __future__ import annotations

import numpy as np


def _matches(tokens: list[int], max_window: int):
    """(earlier positions j holding the last token, the length of the suffix match ending at each)."""
    arr = np.asarray(tokens, dtype=np.int64)
    last = len(tokens) - 1
    cand = np.flatnonzero(arr[:last] == arr[last])
    length = np.ones(cand.size, dtype=np.int64)
    alive = np.ones(cand.size, dtype=bool)
    for back in range(1, max_window):  # extend every candidate match backwards, all at once
        idx = cand - back
        ok = alive & (idx >= 0)
        ok[ok] = arr[idx[ok]] == arr[last - back]
        length += ok
        alive = ok
        if not alive.any():
            break
    return cand, length


def ngram_draft(tokens: list[int], max_len: int, min_window: int, max_window: int) -> list[int]:
    if len(tokens) < 2 or max_len <= 0:
        return []
    cand, length = _matches(tokens, max_window)
    if cand.size == 0:
        return []
    best = int(length.max())
    if best < min_window:
        return []
    j = int(cand[np.flatnonzero(length == best)[-1]])  # the most recent of the longest matches
    return tokens[j + 1:j + 1 + max_len]


def ngram_tree(tokens: list[int], max_nodes: int, max_depth: int, min_window: int, max_window: int, breadth: int):
    """The continuations of every match (longest first, then most recent) merged into a trie below the last token:
    at most `breadth` children per node, `max_nodes` drafts, `max_depth` deep. A DraftTree, or None."""
    from ember.speculative.tree import DraftTree
    if len(tokens) < 2 or max_nodes <= 0 or max_depth <= 0:
        return None
    cand, length = _matches(tokens, max_window)
    keep = length >= min_window
    cand, length = cand[keep], length[keep]
    nodes, parents, children = [tokens[-1]], [-1], [{}]
    for c in np.lexsort((-cand, -length)):
        j, node = int(cand[c]), 0
        for t in tokens[j + 1:j + 1 + max_depth]:
            if t not in children[node]:
                if len(children[node]) >= breadth or len(nodes) > max_nodes:
                    break
                children[node][t] = len(nodes)
                nodes.append(t)
                parents.append(node)
                children.append({})
            node = children[node][t]
        if len(nodes) > max_nodes:
            break
    return DraftTree(nodes, parents) if len(nodes) > 1 else None


class NgramDrafter:
    needs_hidden = False

    def __init__(self, cfg):
        self.min_window, self.max_window, self.breadth = cfg.ngram_min_window, cfg.ngram_max_window, cfg.topk

    def propose(self, reqs, caps: list[int]) -> list[list[int]]:
        return [ngram_draft(r.token_ids, cap, self.min_window, self.max_window) for r, cap in zip(reqs, caps)]

    def propose_tree(self, reqs, ncaps: list[int], dcaps: list[int]) -> list:
        return [ngram_tree(r.token_ids, n, d, self.min_window, self.max_window, self.breadth)
                for r, n, d in zip(reqs, ncaps, dcaps)]

    def update(self, req, start, rows=None) -> None:
        pass

    def sync(self, live_rids) -> None:
        pass
