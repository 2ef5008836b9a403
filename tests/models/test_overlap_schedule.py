"""Overlap scheduling (ember/engine/overlap.py) gives the tokens, texts, finish reasons and counts of the engine
without it. It is on only on CUDA; here it is switched on for the same engine on CPU, where each launched step is
already computed, so what is checked is the bookkeeping: placeholders and their device substitution, tokens read
one step late, requests that finished at the step just read being dropped from the next, steps that cannot overlap
(penalties in the host form, grammar, prefill) resolving the step in flight first, preemption, aborts, pools left
empty; logprobs, device-form penalties and thinking budgets overlapping."""
import random

import pytest

from ember.engine.io_struct import GenerateReq
from ember.engine.overlap import OverlapStep
from ember.engine.penalties import PenaltyCounts
from ember.engine.sampling_params import SamplingParams
from tests.models.checks import assert_pools_empty


@pytest.fixture(scope="module")
def engine(tiny_qwen3_dir):
    from ember import Engine
    eng = Engine(model_path=str(tiny_qwen3_dir), dtype="float32", device="cpu", page_size=4,
                 max_total_tokens=200, max_running_requests=16)  # a small pool: the long batch preempts
    assert eng.core.overlap is None  # (off on CPU)
    yield eng
    eng.shutdown()


def _run(engine, overlap: bool, requests, device_penalties=False):
    """requests: [(prompt ids, sampling dict)] -> per request (output ids, text, finish reason, completion tokens),
    and the batches launched overlapped (their requests' sampling)."""
    core = engine.core
    engine.flush_cache()
    launches = []
    core.overlap = OverlapStep(core) if overlap else None
    core.sampler.penalties = PenaltyCounts(core.vocab_size, "cpu") if device_penalties else None  # (CUDA's default)
    if overlap:
        launch = core.overlap.launch
        core.overlap.launch = lambda batch: launches.append([r.sampling for r in batch.reqs]) or launch(batch)
    forward, finish = core.runner.forward, core.scheduler.finish

    def checked_forward(reqs, lens, **kw):
        """A step run without overlap (no step in flight) never carries a request that has finished."""
        assert core.runner.future_ids is not None or not any(r.finished for r in reqs)
        return forward(reqs, lens, **kw)

    finished = []

    def checked_finish(req):
        """A finished request holds no placeholder: what the prefix cache takes is its real tokens."""
        assert min(req.token_ids) >= 0
        finished.append(req)
        return finish(req)
    core.runner.forward, core.scheduler.finish = checked_forward, checked_finish
    try:
        outs = engine.generate(input_ids=[p for p, _ in requests], sampling_params=[s for _, s in requests])
    finally:
        core.overlap, core.sampler.penalties = None, None
        del core.runner.forward, core.scheduler.finish
    assert_pools_empty(engine)
    assert all(min(r.token_ids) >= 0 and r.kv_len <= len(r.token_ids) for r in finished)  # (nothing after finish)
    return [(o["output_ids"], o["text"], o["meta_info"]["finish_reason"], o["meta_info"]["completion_tokens"],
             o["meta_info"].get("output_token_logprobs")) for o in outs], launches


def _requests(rng, n, vocab):
    greedy = {"temperature": 0, "ignore_eos": True}
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 30))]
        kind = i % 6
        if kind == 0:
            s = dict(greedy, max_new_tokens=rng.randint(1, 20))
        elif kind == 1:  # seeded sampling: the draw depends on the output position
            s = {"temperature": 0.9, "top_p": 0.9, "seed": 1000 + i, "max_new_tokens": 16, "ignore_eos": True}
        elif kind == 2:  # EOS may end it at any step
            s = {"temperature": 1.0, "seed": 7 + i, "max_new_tokens": 24, "min_new_tokens": 3}
        elif kind == 3:  # a stop string
            s = dict(greedy, max_new_tokens=20, stop=["a", "e"])
        elif kind == 4:  # stop token ids
            s = dict(greedy, max_new_tokens=20, stop_token_ids=list(range(3, vocab, 7)))
        else:
            s = dict(greedy, max_new_tokens=12, logit_bias={5: 2.0})
        if i % 4 == 1:  # logprobs (computed on the device, read with the tokens)
            s["logprobs"] = i % 3
        out.append((prompt, s))
    return out


def _same(a, b) -> bool:
    """The same outputs; logprobs within float32 noise (steps batch differently with and without overlap, and the
    CPU's matmuls round differently by batch size: measured <= 5e-7)."""
    assert [r[:4] for r in a] == [r[:4] for r in b]
    for x, y in zip(a, b):
        assert (x[4] is None) == (y[4] is None)
        for (lp_x, top_x), (lp_y, top_y) in zip(x[4] or [], y[4] or []):
            assert abs(lp_x - lp_y) < 1e-5 and [t for t, _ in top_x] == [t for t, _ in top_y]
            assert all(abs(u - v) < 1e-5 for (_, u), (_, v) in zip(top_x, top_y))
    return True


def test_overlapped_decode_gives_the_same_outputs(engine):
    rng = random.Random(0)
    requests = _requests(rng, 24, engine.core.vocab_size)
    plain, _ = _run(engine, False, requests)
    overlapped, launches = _run(engine, True, requests)
    assert _same(overlapped, plain)
    assert len(launches) > 20 and max(map(len, launches)) > 1  # decode steps did overlap, batched
    assert sum(sp.logprobs is not None for batch in launches for sp in batch) > 20
    assert sum(r[4] is not None for r in plain) == 6 and all(len(r[4]) == len(r[0]) for r in plain if r[4])
    assert engine.core.scheduler.total_preemptions > 0  # (the pool is small: both runs preempted)
    assert {r[2]["type"] for r in plain} >= {"length", "stop"}


def test_steps_that_cannot_overlap_resolve_the_step_in_flight_first(engine):
    """Requests that read their own tokens (penalties in the host form) join running plain ones: those steps run
    without overlap, after the step in flight has been read."""
    rng = random.Random(1)
    requests = _requests(rng, 8, engine.core.vocab_size)
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 10}
    requests += [([5, 6, 7, 8], dict(greedy, repetition_penalty=1.3)),
                 ([9, 10, 11], dict(greedy, logprobs=2)),
                 ([12, 13], dict(greedy, frequency_penalty=0.5, presence_penalty=0.2)),
                 ([14, 15, 16, 17, 18], dict(greedy, regex="[a-d]{3,6}"))]
    plain, _ = _run(engine, False, requests)
    overlapped, launches = _run(engine, True, requests)
    assert _same(overlapped, plain) and launches


def test_grammar_requests_overlap_with_the_step_before_read_first(engine):
    """Structured output overlaps too: the step in flight is read once the next forward is launched, its tokens
    accepted by the matchers, then the masks filled and the step sampled. Requests that finish at the step read
    (a grammar that ends, a stop string) keep their row in the launched step, dropped. Same outputs as without."""
    rng = random.Random(6)
    requests = _requests(rng, 5, engine.core.vocab_size)
    greedy = {"temperature": 0, "max_new_tokens": 24}
    requests += [([14, 15, 16], dict(greedy, regex="[a-d]{2,9}")),
                 ([17, 18], {"temperature": 0.9, "seed": 3, "max_new_tokens": 24, "regex": "(ab|cd)+e?"}),
                 ([19, 20, 21], dict(greedy, json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}}'
                                     )),
                 ([22, 23], dict(greedy, regex="[0-9]{30}", logprobs=1)),
                 ([24, 25], dict(greedy, regex="[a-f]{3,7}", repetition_penalty=1.5))]  # (device form below)
    plain, _ = _run(engine, False, requests)
    overlapped, launches = _run(engine, True, requests, device_penalties=True)
    assert _same(overlapped, plain)
    assert sum(sp.regex is not None or sp.json_schema is not None for batch in launches for sp in batch) > 30
    assert plain[5][2]["type"] == "stop" and plain[8][2]["type"] == "length"  # (a grammar that ended; one cut short)
    assert plain[9][2]["type"] == "stop" and plain[9][0] != _run(engine, False, [(requests[9][0], dict(
        greedy, regex="[a-f]{3,7}"))])[0][0][0]  # (the penalty acted)


def test_penalty_requests_overlap_when_their_counts_are_on_the_device(engine):
    """With the penalties' counts kept on the device (CUDA's default), penalty requests overlap too: each launched
    step's tokens join the counts on the device before the host reads them. Same outputs as without overlap and with
    the host form."""
    rng = random.Random(2)
    requests = _requests(rng, 6, engine.core.vocab_size)
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 14}
    for i, pen in enumerate([{"repetition_penalty": 1.6}, {"frequency_penalty": 1.5, "presence_penalty": 0.5},
                             {"presence_penalty": 1.9}, {"repetition_penalty": 1.3, "frequency_penalty": 0.8}]):
        requests.append(([5 + i, 6, 7, 5 + i], dict(greedy, **pen)))
        requests.append(([9, 9 + i], {"temperature": 0.8, "seed": i, "max_new_tokens": 10, "ignore_eos": True, **pen}))
    plain, _ = _run(engine, False, requests)
    overlapped, launches = _run(engine, True, requests, device_penalties=True)
    assert _same(overlapped, plain)
    assert sum(sp.penalized for batch in launches for sp in batch) > 30
    unpenalized, _ = _run(engine, False, [(p, {k: v for k, v in s.items() if "penalty" not in k}) for p, s in requests])
    assert unpenalized[6:] != plain[6:]  # (the penalties did change the outputs)


def test_thinking_budgets_overlap_until_they_are_about_to_be_spent(engine):
    """A request with a thinking budget overlaps while reading the step in flight cannot spend it; the steps that
    force the end of thinking run without overlap. The same outputs as without overlap, forced end tokens included."""
    core = engine.core
    end_ids = core.tokenizer.encode("</think>", add_special_tokens=False)
    requests = []
    for budgets in ([9, 40], [3, 14]):  # (one run each: a request being forced stops the whole batch overlapping)
        requests = [([20 + i, 21, 22 + i], {"temperature": 0.7 if i else 0, "seed": i, "max_new_tokens": 24,
                                            "ignore_eos": True, "thinking_budget": b}) for i, b in enumerate(budgets)]
        requests += [(p, dict(s, max_new_tokens=24)) for p, s in _requests(random.Random(4), 3, core.vocab_size)]
        plain, _ = _run(engine, False, requests)
        overlapped, launches = _run(engine, True, requests)
        assert _same(overlapped, plain)
        for (ids, *_), b in zip(plain, budgets):  # the end tag (8 tokens here) forced once the budget is spent
            assert b > 24 or ids[b:b + len(end_ids)] == end_ids
        with_budget = [len(batch) for batch in launches if any(sp.thinking_budget for sp in batch)]
        assert len(with_budget) >= 4


def test_an_abort_while_a_step_is_in_flight(engine):
    core = engine.core
    engine.flush_cache()
    core.overlap = OverlapStep(core)
    try:
        for i in range(3):
            core.add_request(GenerateReq(f"a{i}", [3 + i, 4, 5, 6], SamplingParams(max_new_tokens=30, temperature=0,
                                                                                 ignore_eos=True)))
        outs = []
        for _ in range(6):
            outs += core.step()
        assert core.overlap.pending
        core.abort("a1")
        while core.has_work():
            outs += core.step()
    finally:
        core.overlap = None
    for rid in ("a0", "a1", "a2"):  # every report counts the tokens reported so far, no placeholder
        mine = [o for o in outs if o.rid == rid]
        assert all(o.completion_tokens == sum(len(p.new_token_ids) for p in mine[:j + 1])
                   for j, o in enumerate(mine) if o.finish_reason != "abort")
    done = {o.rid: o for o in outs if o.finished}
    assert done["a1"].finish_reason == "abort" and done["a0"].completion_tokens == 30
    ids = {rid: [t for o in outs if o.rid == rid for t in o.new_token_ids] for rid in ("a0", "a2")}
    assert all(len(v) == 30 and min(v) >= 0 for v in ids.values())
    assert_pools_empty(engine)
