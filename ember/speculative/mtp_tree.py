"""Tree drafts (topk > 1) from the MTP layers (mtp.py's chain generalized to branches).

In the chain, step k at position i reads token i + k + 1 and step k-1's hidden state at i, so at step k the
positions i >= L - k (L: the root's position) read drafts. With a tree those rows depend on the branch: a branch
(a frontier node of depth k) gets private rows for positions [p_k, L), p_k = max(valid, L - k), reading the tokens
of its own path and the hidden states of its parent's private rows at step k - 1 (and the shared rows of step k - 1
where that step had them). The rows before p_k read verified tokens only and are shared by all branches. In step
k's pool the shared rows sit at their own slots, the private rows of branch b at slots p_k + b * (L - p_k) + ...,
at RoPE positions p_k .. L - 1, seeing the shared prefix and their own branch (a TreeSpec: block-causal). The last
private row of a branch gives its children. After the round only shared rows stay valid: valid = max(valid,
L - K + 1), which is what MTPDrafter.update computes with no confirmed chain (run_drafts empty).
"""
from __future__ import annotations

import torch

from ember.speculative.tree import Candidates, TreeSpec


class _Shim:
    """Just what the batch builder reads."""
    __slots__ = ("token_ids", "kv_len", "page_tables", "spec_tree")

    def __init__(self, token_ids, kv_len, page_tables, spec_tree):
        self.token_ids, self.kv_len, self.page_tables, self.spec_tree = token_ids, kv_len, page_tables, spec_tree


def propose_tree(drafter, reqs, ncaps: list[int], dcaps: list[int]) -> list:
    """MTPDrafter.propose_tree: a DraftTree (or None) per request."""
    out = [None] * len(reqs)
    k, K = drafter.topk, drafter.K
    live = []
    for i, r in enumerate(reqs):
        st = drafter.states.get(r.rid)
        L = r.kv_len
        if st is None or st.h_end != L or st.valid >= L:
            continue
        if not drafter.cover(st, L + k * K):  # every step's shared and private slots
            continue
        live.append(i)
    if not live:
        return out
    states = [drafter.states[reqs[i].rid] for i in live]
    Ls = [reqs[i].kv_len for i in live]
    ss = [st.valid for st in states]
    cands = [Candidates() for _ in live]
    # step k-1's outputs: shared rows over [valid, p_prev), each branch's private rows over [p_prev, L)
    shared_prev = [st.hidden[s - st.h0:L - st.h0] for st, s, L in zip(states, ss, Ls)]
    priv_prev = [{-1: shared_prev[j][:0]} for j in range(len(live))]
    p_prev = list(Ls)
    with torch.inference_mode():
        for step, (layer, builder) in enumerate(zip(drafter.step_layers, drafter.builders)):
            shims, lens, hid, plan = [], [], [], []
            for j, i in enumerate(live):
                L, s, c, toks = Ls[j], ss[j], cands[j], reqs[i].token_ids
                p = max(s, L - step)
                branches = c.frontier if step > 0 else []  # step 0: the root's row is the last shared one
                new = toks[s + step + 1:p + step + 1]
                hid.append(shared_prev[j][:p - s])
                for b in branches:
                    ext = toks[s:L + 1] + c.path_tokens(b)  # (from position s)
                    new = new + ext[p + step + 1 - s:L + step + 1 - s]
                    hid.append(shared_prev[j][p - s:p_prev[j] - s])
                    hid.append(priv_prev[j][c.parents[b]])
                spec = None
                if branches:
                    block = torch.tril(torch.ones(L - p, L - p, dtype=torch.bool))
                    spec = TreeSpec(p, list(range(p, L)) * len(branches), torch.block_diag(*[block] * len(branches)))
                pages = states[j].pages
                shims.append(_Shim([0] * s + new, s, {g: pages for g in builder.kv_cache.groups}, spec))
                lens.append(len(new))
                plan.append((p, branches))
            batch = builder.build(shims, lens)
            embed = drafter.model.model.embed_tokens(batch.input_ids)
            prev = torch.cat(hid).to(embed.dtype)
            x = layer.eh_proj(torch.cat([layer.enorm(embed), layer.hnorm(prev)], dim=-1))
            y = super(type(layer), layer).forward(batch.positions, x, batch)
            heads, off = [], 0
            for j, (p, branches) in enumerate(plan):
                L, s = Ls[j], ss[j]
                shared_prev[j] = y[off:off + p - s]
                priv = {}
                for bi, b in enumerate(branches):
                    a = off + p - s + bi * (L - p)
                    priv[b] = y[a:a + L - p]
                    heads.append(a + L - p - 1)
                if not branches:  # step 0 (p = L): the root's row at L - 1 is shared, it has no private rows
                    heads.append(off + p - s - 1)
                    priv[-1] = y[:0]
                priv_prev[j], p_prev[j] = priv, p
                off += lens[j]
            rows = y.index_select(0, torch.tensor(heads, device=y.device))
            lp = drafter._logits(layer, rows)[:, :drafter.vocab].float().log_softmax(-1)
            at = 0
            for j, (_, branches) in enumerate(plan):
                n = max(len(branches), 1)
                cands[j].expand(lp[at:at + n], k)
                at += n
    for j, i in enumerate(live):
        states[j].run_at, states[j].run_drafts = Ls[j], []  # no chain: only the shared rows stay valid
        out[i] = cands[j].tree(reqs[i].token_ids[-1], ncaps[i] + 1, dcaps[i])
    return out
