"""The host's share of a decode step at many running requests: a tiny 2-layer model (so the model's time is small)
decoding 64 requests for 64 steps, timed and profiled with cProfile (sorted by own time). What it shows is the
per-step Python work around the model (scheduling, sampling, detokenizing, reporting) that a GPU step would wait for.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/host_step_profile.py
"""
import cProfile
import pathlib
import pstats
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tests.tiny_models import tiny_model  # noqa: E402

from ember import Engine  # noqa: E402

engine = Engine(model_path=str(tiny_model("qwen2", pathlib.Path("/tmp/ember-host-profile/qwen2"))), dtype="float32",
                device="cpu", disable_fused_decode=True, max_running_requests=64)
params = {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}
prompts = [[3 + b] + list(range(10, 60)) for b in range(64)]
engine.generate(input_ids=prompts, sampling_params=params)  # warm-up
for rnd in range(3):
    engine.flush_cache()
    t = time.perf_counter()
    engine.generate(input_ids=[[4 + rnd] + p for p in prompts], sampling_params=params)
    print(f"run {rnd}: {(time.perf_counter() - t) / 64 * 1e3:.2f} ms per step (64 requests, prefill included)")
engine.flush_cache()
cProfile.run("engine.generate(input_ids=[[9] + p for p in prompts], sampling_params=params)", "/tmp/ember-host.prof")
pstats.Stats("/tmp/ember-host.prof").sort_stats("tottime").print_stats(20)
