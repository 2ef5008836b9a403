"""Lossless acceptance, checked on an exactly known target: a Markov chain over 8 tokens (p(next | last)) drafted
by a deterministic chain that is often right and often wrong. 24,000 seeded samples of the first 4 tokens, drafted
and verified with the engine's own sampler and acceptance rule, against the exact distribution (chi-square)."""
import itertools
import random

import pytest
import torch

from ember.engine.request import Req
from ember.engine.sampler import Sampler
from ember.engine.sampling_params import SamplingParams
from ember.speculative.verify import DraftView, accept_length, rejection_sample

V, N, K = 8, 24_000, 3


def _chain():
    g = torch.Generator().manual_seed(0)
    logits = 2.5 * torch.randn(V, V, generator=g)  # peaked rows: drafts are right a fair share of the time
    probs = torch.softmax(logits, -1)
    draft_next = (logits + 1.5 * torch.randn(V, V, generator=g)).argmax(-1)  # a different, deterministic drafter
    return logits, probs, draft_next


def _sample(speculate: bool, seed0: int):
    logits, _, draft_next = _chain()
    sampler = Sampler(V, eos_token_ids=[], device="cpu")
    reqs = [Req(f"r{i}", [0], SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=seed0 + i))
            for i in range(N)]
    verifies = produced = 0
    while True:
        live = [r for r in reqs if r.num_output < 4]
        if not live:
            break
        drafts, rows, views = [], [], []
        for r in live:
            d = []
            if speculate:
                for _ in range(min(K, 4 - r.num_output - 1)):
                    d.append(int(draft_next[(d or r.token_ids)[-1]]))
            drafts.append(d)
            for j in range(len(d) + 1):
                rows.append((r.token_ids + d[:j])[-1])
                views.append(DraftView(r, d[:j]))
        sampled, _ = sampler.sample(logits[torch.tensor(rows)].clone(), views)
        at = 0
        for r, d in zip(live, drafts):
            t = sampled[at:at + len(d) + 1]
            at += len(d) + 1
            a = accept_length(t, d)
            r.token_ids += t[:a + 1]
            verifies += 1
            produced += a + 1
    return [tuple(r.output_ids[:4]) for r in reqs], produced / verifies


def _gof_p(samples, probs: dict) -> float:
    """Chi-square goodness of fit against exact probabilities (categories with expected count < 10 pooled)."""
    from collections import Counter
    counts, n = Counter(samples), len(samples)
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for cat, p in probs.items():
        if p * n >= 10:
            obs.append(counts[cat])
            exp.append(p * n)
        else:
            rest_o += counts[cat]
            rest_e += p * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    obs, exp = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    return chi2_sf(float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1)


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi-square with `dof` degrees of freedom >= stat)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def homogeneity_p(a: list, b: list) -> float:
    """Chi-square test that two equally large samples come from one distribution (categories whose expected count
    is < 10 pooled)."""
    from collections import Counter
    assert len(a) == len(b)
    ca, cb = Counter(a), Counter(b)
    cells, rest = [], [0, 0]
    for cat in set(ca) | set(cb):
        if ca[cat] + cb[cat] >= 20:
            cells.append((ca[cat], cb[cat]))
        else:
            rest[0] += ca[cat]
            rest[1] += cb[cat]
    if sum(rest) > 0:
        cells.append(tuple(rest))
    stat = sum((x - (x + y) / 2) ** 2 / ((x + y) / 2) * 2 for x, y in cells)
    return chi2_sf(stat, len(cells) - 1)


def _exact():
    _, probs, _ = _chain()
    pairs = {(a, b): float(probs[0, a] * probs[a, b]) for a in range(V) for b in range(V)}
    marg = [probs[0]]
    for _ in range(3):
        marg.append(marg[-1] @ probs)
    return pairs, marg


@pytest.fixture(scope="module")
def speculative_samples():
    return _sample(True, 0)


def test_speculative_samples_follow_the_target_exactly(speculative_samples):
    samples, accept_len = speculative_samples
    assert 1.3 < accept_len < 3.5  # both accepted and rejected drafts, plenty of each
    pairs, marg = _exact()
    assert _gof_p([s[:2] for s in samples], pairs) > 0.01
    for pos in range(4):
        assert _gof_p([s[pos] for s in samples], {t: float(marg[pos][t]) for t in range(V)}) > 0.01, pos
    # the triple distribution too (512 categories, rare ones pooled)
    _, probs, _ = _chain()
    triples = {(a, b, c): float(probs[0, a] * probs[a, b] * probs[b, c]) for a, b, c in itertools.product(range(V), repeat=3)}
    assert _gof_p([s[:3] for s in samples], triples) > 0.01


def test_same_seeds_give_the_tokens_of_speculation_off(speculative_samples):
    off, accept_len = _sample(False, 0)
    assert accept_len == 1.0
    assert speculative_samples[0] == off


def test_the_checker_catches_a_biased_acceptance(speculative_samples):
    """Accepting every draft (no verification) must fail the same test: it can."""
    _, probs, draft_next = _chain()
    rng = random.Random(0)
    samples = []
    for _ in range(N):
        a = rng.choices(range(V), weights=probs[0].tolist())[0]
        samples.append((a, int(draft_next[a])))
    pairs, _ = _exact()
    assert _gof_p(samples, pairs) < 1e-6


def test_general_rejection_rule_is_lossless():
    """min(1, p/q) acceptance with residual resampling, for a draft that samples from q (not one-hot)."""
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(2 * torch.randn(2, V, generator=g), -1)
    q = torch.softmax(2 * torch.randn(1, V, generator=g), -1)
    firsts, accepted = [], 0
    for _ in range(N):
        d = torch.multinomial(q[0], 1, generator=g)
        a, nxt = rejection_sample(p, q, d, generator=g)
        firsts.append(int(d) if a == 1 else nxt)
        accepted += a
    assert 0.2 * N < accepted < 0.9 * N
    assert _gof_p(firsts, {t: float(p[0, t]) for t in range(V)}) > 0.01
