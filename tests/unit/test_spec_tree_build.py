"""Tree drafts without a model: SGLang's candidate selection (top-k expansion by cumulative log-prob, the best
num_draft_tokens - 1 candidates, parents first), the walk along the target's tokens, and the tree mask rows."""
import math

import torch

from ember.speculative.tree import Candidates, DraftTree, TreeSpec, apply_tree_mask, to_logical


def _lp(*pairs, V=10):
    """A log-prob row with the given (token, prob) pairs and the rest spread thinly."""
    row = torch.full((V,), 1e-6)
    for t, p in pairs:
        row[t] = p
    return row.log()


def test_candidates_follow_sglang_selection():
    c = Candidates()
    c.expand(_lp((3, 0.6), (5, 0.3)).unsqueeze(0), 2)  # root: children 3 (0.6), 5 (0.3)
    assert c.tokens == [3, 5] and c.parents == [-1, -1] and c.frontier == [0, 1]
    # step 2: 3 -> {7: 0.5, 8: 0.4}; 5 -> {1: 0.9, 2: 0.05}; cumulative: .30 .24 .27 .015 -> frontier 7, 1
    c.expand(torch.stack([_lp((7, 0.5), (8, 0.4)), _lp((1, 0.9), (2, 0.05))]), 2)
    assert c.tokens[2:] == [7, 8, 1, 2] and c.parents[2:] == [0, 0, 1, 1]
    assert c.frontier == [2, 4]
    assert math.isclose(math.exp(c.scores[4]), 0.27, rel_tol=1e-4)
    assert c.path_tokens(4) == [5, 1]
    tree = c.tree(root_token=9, num_nodes=5, cap=3)  # the 4 best: 3 (.6), 5 (.3), 7 (.3), 1 (.27)
    assert tree.tokens == [9, 3, 5, 7, 1] and tree.parents == [-1, 0, 0, 1, 2]
    assert tree.depths == [0, 1, 1, 2, 2]
    # a depth cap of 1 (max_tokens near) keeps only the root's children
    assert c.tree(9, 5, cap=1).tokens == [9, 3, 5]


def test_selection_keeps_every_parent():
    """A child as likely as its parent (p = 1 rounds to log 0): the parent is still taken first."""
    c = Candidates()
    c.expand(_lp((1, 0.5), (2, 0.5)).unsqueeze(0), 2)
    c.expand(torch.stack([_lp((4, 1.0)), _lp((6, 0.1), (7, 0.1))]), 2)
    tree = c.tree(0, 4, cap=3)
    for j in range(1, len(tree)):
        assert tree.parents[j] < j


def test_walk_and_ancestors():
    #        0
    #      1   2
    #     3 4   5
    tree = DraftTree([10, 11, 12, 13, 14, 15], [-1, 0, 0, 1, 1, 2])
    assert tree.walk([12, 0, 15, 0, 0, 99]) == [0, 2, 5]  # root -> 12 (node 2) -> 15 (node 5); 99 is the bonus
    assert tree.walk([11, 14, 0, 0, 0, 0]) == [0, 1, 4]
    assert tree.walk([7, 0, 0, 0, 0, 0]) == [0]
    anc = tree.ancestors()
    assert anc[4].tolist() == [True, True, False, False, True, False]
    assert anc[5].tolist() == [True, False, True, False, False, True]
    spec = tree.spec(100)
    assert spec.pos == [100, 101, 101, 102, 102, 102]
    assert to_logical(spec, torch.tensor([98, 100, 103, 105])).tolist() == [98, 100, 102, 102]


def test_tree_mask_rows():
    """Queries from slot 4 (2 plain rows, then 3 tree rows), keys from slot 1: plain rows see no tree slot, tree
    rows see what vis allows; everything else is left as the causal mask had it."""
    spec = TreeSpec(6, [6, 7, 7], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool))
    mask = torch.ones(1, 5, 8, dtype=torch.bool)
    apply_tree_mask(mask, [spec], torch.tensor([4]), torch.tensor([5]), torch.tensor([1]))
    tree_cols = mask[0, :, 5:8].int().tolist()
    assert tree_cols == [[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert bool(mask[0, :, :5].all())


def test_ngram_tree_merges_the_matches():
    from ember.speculative.ngram import ngram_draft, ngram_tree
    #        0  1  2  3  4  5  6  7  8  9 10 11 12
    toks = [5, 1, 2, 5, 1, 3, 4, 9, 5, 1, 2, 7, 5]  # the last 5 occurs at 0, 3, 8 (each a 1-token match)
    tree = ngram_tree(toks, max_nodes=10, max_depth=3, min_window=1, max_window=4, breadth=3)
    # most recent first: 8 -> 1 2 7, then 3 -> 1 3 4, then 0 -> 1 2 5 (its 1 2 already there)
    assert tree.tokens == [5, 1, 2, 7, 3, 4, 5] and tree.parents == [-1, 0, 1, 2, 1, 4, 2]
    assert ngram_draft(toks, 3, 1, 4) == [1, 2, 7]  # the chain is the first branch
    narrow = ngram_tree(toks, max_nodes=10, max_depth=3, min_window=1, max_window=4, breadth=1)
    assert narrow.tokens == [5, 1, 2, 7]
    assert len(ngram_tree(toks, max_nodes=4, max_depth=3, min_window=1, max_window=4, breadth=3)) == 5
    assert ngram_tree(toks, 4, 3, min_window=2, max_window=4, breadth=3) is None  # no 2-token match of "7 5"
