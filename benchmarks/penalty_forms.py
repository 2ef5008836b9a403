"""The two forms of the penalties (ember/engine/penalties.py) on this machine's CPU: the host form (only the seen
tokens' logits touched) against the device form (per-request counts as [slots, V] rows, [B, V] passes), per
sampler step at 1 / 16 / 64 rows of a 151,936-token vocabulary (Qwen2.5's), repetition_penalty 1.05 (Qwen2.5's
generation_config), 300 tokens of history a row growing by one a step. What it decides: the CPU default (host form).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/penalty_forms.py
"""
import pathlib
import platform
import random
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ember.engine.request import Req  # noqa: E402
from ember.engine.sampler import Sampler  # noqa: E402
from ember.engine.sampling_params import SamplingParams  # noqa: E402

V, STEPS = 151936, 20
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
for B in (1, 16, 64):
    rng = random.Random(0)
    reqs = []
    for i in range(B):
        r = Req(f"r{i}", [rng.randrange(V) for _ in range(200)], SamplingParams(repetition_penalty=1.05))
        r.token_ids += [rng.randrange(V) for _ in range(100)]
        reqs.append(r)
    logits = torch.randn(B, V)
    for device_form in (False, True):
        sampler = Sampler(V, [0], "cpu", device_penalties=device_form)
        sampler.apply_penalties_and_bias(logits, reqs)  # (the device form fills its slots here)
        t = time.perf_counter()
        for _ in range(STEPS):
            for r in reqs:
                r.token_ids.append(rng.randrange(V))
            sampler.apply_penalties_and_bias(logits, reqs)
        ms = (time.perf_counter() - t) / STEPS * 1e3
        print(f"rows {B:3d}  {'device form' if device_form else 'host form  '}  {ms:7.2f} ms a step")
