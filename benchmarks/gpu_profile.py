"""Profile one GPU decode run of the random Qwen2.5-0.5B-shaped model (see gpu_smoke.py)."""
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.gpu_smoke import make_model  # noqa: E402

from ember import Engine  # noqa: E402

engine = Engine(model_path=str(make_model(pathlib.Path("/tmp/qwen05b-random"))), dtype="bfloat16")
prompt = list(range(300, 556))
params = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
engine.generate(input_ids=prompt, sampling_params=params)
import cProfile, pstats  # noqa: E401,E402
cProfile.run("engine.generate(input_ids=[1] + prompt, sampling_params=params)", "/tmp/prof")
pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(25)
