"""ModelRunner's decode-step batch builder gives the same tensors as the general one (no model needed)."""
import random
from types import SimpleNamespace

import torch

from ember.engine.model_runner import ModelRunner


def _runner(page_size: int) -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)  # only the batch-building state
    runner.page_size, runner.window, runner.device = page_size, None, "cpu"
    runner.kv_cache = SimpleNamespace(groups=["full"])
    return runner


def test_decode_batch_equals_the_general_batch():
    rng = random.Random(0)
    for trial in range(50):
        P = rng.choice([1, 4, 16])
        runner = _runner(P)
        reqs = []
        for _ in range(rng.randint(1, 6)):
            kv_len = rng.choice([0, 1, P - 1, P, rng.randint(1, 100)]) if trial % 5 else 37  # equal lengths too
            pages = rng.sample(range(1, 500), kv_len // P + 1)
            reqs.append(SimpleNamespace(kv_len=kv_len, token_ids=[rng.randint(0, 999) for _ in range(kv_len + 1)],
                                        page_tables={"full": pages}))
        fast, general = runner.build_batch(reqs, [1] * len(reqs)), runner._general_batch(reqs, [1] * len(reqs))
        for name in ("input_ids", "positions", "logit_index"):
            assert torch.equal(getattr(fast, name), getattr(general, name)), name
        a, b = fast.attn["full"], general.attn["full"]
        for name in ("write_slots", "kv_slots", "q_pad_index", "kv_lens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (trial, name)
        assert (a.mask is None) == (b.mask is None) and (a.mask is None or torch.equal(a.mask, b.mask))
        assert (a.batch_size, a.max_q) == (b.batch_size, b.max_q)
