"""The device form of the penalties (PenaltyCounts, the default on CUDA) gives exactly the host form's logits
(penalize_seen, whose rule tests/models/test_sampling.py checks against the definitions on real logits) as requests
come, grow by one or several tokens, roll back, finish and give their slot to new ones, and when a step's tokens are
added on the device before the host reads them (overlap scheduling)."""
import random

import torch

from ember.engine.request import Req
from ember.engine.sampler import Sampler
from ember.engine.sampling_params import SamplingParams

V = 97
KINDS = [{}, {"repetition_penalty": 1.3}, {"frequency_penalty": 0.7}, {"presence_penalty": -0.5},
         {"frequency_penalty": 0.4, "presence_penalty": 0.3, "repetition_penalty": 0.8},
         {"repetition_penalty": 1.1, "logit_bias": {3: 2.0}, "min_new_tokens": 2}]


def _req(rng, i):
    prompt = [rng.randrange(V) for _ in range(rng.randint(1, 12))]
    return Req(f"r{i}", prompt, SamplingParams(**KINDS[i % len(KINDS)]))


def _both(reqs, seed):
    """(the host form's result, the logits it was applied to) for reqs."""
    logits = torch.randn(len(reqs), V, generator=torch.Generator().manual_seed(seed)) * 3
    host = Sampler(V, [0], "cpu", device_penalties=False).apply_penalties_and_bias(logits, reqs)
    return host, logits


def test_the_device_form_equals_the_host_form_as_requests_come_grow_roll_back_and_go():
    rng = random.Random(0)
    device = Sampler(V, [0], "cpu", device_penalties=True)
    live, n, checked = [_req(rng, i) for i in range(5)], 5, 0
    for step in range(60):
        host, logits = _both(live, step)
        got = device.apply_penalties_and_bias(logits, live)
        assert torch.equal(got, host), f"step {step}"
        checked += not torch.equal(host, logits)
        for r in live:
            r.token_ids += [rng.randrange(V) for _ in range(rng.choice([1, 1, 1, 3]))]  # (several: forced / accepted)
            if rng.random() < 0.1 and r.num_output > 2:
                del r.token_ids[-2:]  # a rollback: the slot is rebuilt
        for r in [r for r in live if rng.random() < 0.15]:
            r.finished = True
            live.remove(r)
            live.append(_req(rng, n))
            n += 1
    assert checked > 50
    assert len(device.penalties.slots) <= 5 + 1 and device.penalties.counts.shape[0] <= 16  # slots were reused


def test_tokens_recorded_on_the_device_before_the_host_reads_them():
    """Overlap scheduling's order (ember/engine/overlap.py): a launched step's tokens are recorded from the device
    and each request holds a placeholder until the step is read, after the next one is launched. Every step sees
    the tokens as the host will know them, counted once, with steps that cannot overlap in between."""
    rng = random.Random(1)
    device = Sampler(V, [0], "cpu", device_penalties=True)
    reqs = [_req(rng, i) for i in range(1, 5)]
    inflight = None  # the tokens of the step in flight: each request's last token is its placeholder
    for step in range(16):
        overlapped = step % 4 != 3
        if not overlapped and inflight is not None:  # a step that cannot overlap reads the one in flight first
            inflight = _read(reqs, inflight)
        host, logits = _both([_resolved(r, inflight) for r in reqs], step)
        assert torch.equal(device.apply_penalties_and_bias(logits, reqs), host), f"step {step}"
        ids = torch.tensor([rng.randrange(V) for _ in reqs])
        if overlapped:
            device.penalties.record(reqs, ids)
            if inflight is not None:
                _read(reqs, inflight)
            for row, r in enumerate(reqs):
                r.token_ids.append(-(row + 1))
            inflight = ids
        else:
            for r, t in zip(reqs, ids.tolist()):
                r.token_ids.append(t)


def _resolved(req, inflight):
    """req as the host will know it once the step in flight is read."""
    r = Req(req.rid, req.prompt_ids, req.sampling)
    r.token_ids = [int(inflight[-t - 1]) if t < 0 else t for t in req.token_ids]
    return r


def _read(reqs, inflight):
    for row, r in enumerate(reqs):
        assert r.token_ids[-1] == -(row + 1)
        r.token_ids[-1] = int(inflight[row])


def test_image_placeholder_ids_beyond_the_vocabulary_are_not_counted():
    r = Req("mm", [5, V + 10, V + 11, 6], SamplingParams(repetition_penalty=1.5))  # (keyed image placeholders)
    r.token_ids.append(7)
    other = Req("text", [8, 9], SamplingParams(repetition_penalty=1.5))  # the next slot
    host, logits = _both([r, other], 0)
    assert torch.equal(Sampler(V, [0], "cpu", device_penalties=True).apply_penalties_and_bias(logits, [r, other]), host)
