"""Tree drafts (--speculative-eagle-topk > 1), as SGLang's EAGLE builds them, and the tree attention mask.

Drafting: step 1 takes the top-k children of the root (the last verified token); every later step expands the k
best candidates so far (by cumulative draft log-prob) into k children each, and every child becomes a candidate.
The tree is the root plus the `num_draft_tokens - 1` best candidates of all steps (SGLang's select_top_k_tokens /
organize_draft_results). A child's score never exceeds its parent's, and parents are generated first, so the best
candidates (ties to the earlier) always include each one's parent.

Verifying: node j of a request's tree sits at KV slot L + j (L = the root's position), at RoPE position L + depth,
and attends to the cached prefix, its ancestors and itself (`TreeSpec`: positions by ModelRunner._general_batch, the mask by the torch attention backend).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TreeSpec:
    """Attention layout of a request whose KV slots from `base` on hold tree nodes (attribute `spec_tree` of a
    request given to the batch builder): slot base + i is at RoPE position pos[i] and, as a query, sees the slots
    before `base` (causally, by position) and the tree slots j with vis[i, j]. Queries before `base` see no tree slot."""
    base: int
    pos: list[int]
    vis: torch.Tensor  # [m, m] bool, m = len(pos)


def to_logical(spec: TreeSpec | None, slots: torch.Tensor) -> torch.Tensor:
    """RoPE / causal positions of KV slots."""
    if spec is None:
        return slots
    pos = torch.tensor(spec.pos, dtype=slots.dtype)
    idx = (slots - spec.base).clamp(0, len(spec.pos) - 1)
    return torch.where(slots >= spec.base, pos[idx], slots)


def apply_tree_mask(mask, trees, q_start, q_len, k_start) -> None:
    """mask [B, max_q, max_k] (queries from slot q_start[b], keys from slot k_start[b]): among a request's tree slots,
    a new token sees only what its TreeSpec allows (a node: itself and its ancestors); earlier queries see none."""
    for b, spec in enumerate(trees):
        if spec is None:
            continue
        qs, n = int(q_start[b]), int(q_len[b])
        slots = torch.arange(qs, qs + n)
        rows = torch.zeros(n, len(spec.pos), dtype=torch.bool)
        inside = slots >= spec.base
        rows[inside] = spec.vis[slots[inside] - spec.base]
        c0 = spec.base - int(k_start[b])  # the column of slot `base` (a sliding window may start inside the tree)
        lo, hi = max(c0, 0), min(c0 + rows.shape[1], mask.shape[2])
        mask[b, :n, lo:hi] &= rows[:, lo - c0:hi - c0]


class DraftTree:
    """One request's tree: node 0 is the root (the last verified token), nodes 1.. the drafts, parents first."""
    __slots__ = ("tokens", "parents", "depths", "children")

    def __init__(self, tokens: list[int], parents: list[int]):
        self.tokens, self.parents = tokens, parents
        self.depths = [0] * len(tokens)
        self.children: list[dict[int, int]] = [{} for _ in tokens]
        for j in range(1, len(tokens)):
            self.depths[j] = self.depths[parents[j]] + 1
            self.children[parents[j]].setdefault(tokens[j], j)  # equal siblings: the first (better) one

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def drafts(self) -> list[int]:
        return self.tokens[1:]

    def path(self, j: int) -> list[int]:
        """Nodes from the root's first child down to j (empty for the root)."""
        out = []
        while j > 0:
            out.append(j)
            j = self.parents[j]
        return out[::-1]

    def ancestors(self) -> torch.Tensor:
        """[n, n] bool: node i sees node j iff j is i or one of its ancestors."""
        n = len(self.tokens)
        anc = torch.eye(n, dtype=torch.bool)
        for j in range(1, n):
            anc[j] |= anc[self.parents[j]]
        return anc

    def spec(self, root_pos: int) -> TreeSpec:
        return TreeSpec(root_pos, [root_pos + d for d in self.depths], self.ancestors())

    def walk(self, sampled: list[int]) -> list[int]:
        """The accepted nodes (root first) given the target's token at every node: from the root, follow the
        child holding the target's token while there is one."""
        out, j = [0], 0
        while sampled[j] in self.children[j]:
            j = self.children[j][sampled[j]]
            out.append(j)
        return out


class Candidates:
    """The growing candidate set of one request while drafting (SGLang's score / token / parent lists)."""
    __slots__ = ("tokens", "parents", "scores", "frontier")

    def __init__(self):
        self.tokens: list[int] = []
        self.parents: list[int] = []  # candidate index of the parent, -1 = the root
        self.scores: list[float] = []
        self.frontier: list[int] = [-1]  # the candidates the next draft step expands (first: the root)

    def path_tokens(self, c: int) -> list[int]:
        out = []
        while c >= 0:
            out.append(self.tokens[c])
            c = self.parents[c]
        return out[::-1]

    def expand(self, logprobs: torch.Tensor, topk: int) -> None:
        """logprobs [len(frontier), V] of the frontier's next token: add the top-k children of each frontier node
        as candidates, and make the k best of them (cumulative score) the next frontier."""
        lp, tok = logprobs.float().topk(topk, dim=-1)
        lp, tok = lp.tolist(), tok.tolist()
        new = []
        for f, row_lp, row_tok in zip(self.frontier, lp, tok):
            base = self.scores[f] if f >= 0 else 0.0
            for s, t in zip(row_lp, row_tok):
                new.append(len(self.tokens))
                self.tokens.append(t)
                self.parents.append(f)
                self.scores.append(base + s)
        self.frontier = sorted(new, key=lambda c: -self.scores[c])[:topk]  # stable: ties to the earlier

    def tree(self, root_token: int, num_nodes: int, cap: int) -> DraftTree:
        """The root and the best num_nodes - 1 candidates (and at most `cap` deep), in generation order."""
        chosen, depth = set(), {-1: 0}
        for c in sorted(range(len(self.tokens)), key=lambda c: -self.scores[c]):
            if len(chosen) >= num_nodes - 1:
                break
            p = self.parents[c]
            if (p < 0 or p in chosen) and depth[p] < cap:
                chosen.add(c)
                depth[c] = depth[p] + 1
        order = sorted(chosen)
        node = {-1: 0, **{c: i + 1 for i, c in enumerate(order)}}
        return DraftTree([root_token] + [self.tokens[c] for c in order],
                         [-1] + [node[self.parents[c]] for c in order])
