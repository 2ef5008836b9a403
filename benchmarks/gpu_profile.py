"""Profile one GPU decode run of the random Qwen2.5-0.5B-shaped model that gpu_bench.py builds (cProfile: where
the host's time goes per step), on Triton attention with CUDA graphs unless --disable-cuda-graph is given."""
import cProfile
import pathlib
import pstats
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.gpu_bench import Run  # noqa: E402

from ember import Engine  # noqa: E402

path = Run(pathlib.Path("/tmp/ember-gpu-bench"), smoke=False).model("qwen05b")
engine = Engine(model_path=str(path), dtype="bfloat16", attention_backend="triton",
                disable_cuda_graph="--disable-cuda-graph" in sys.argv)
prompt = list(range(300, 556))
params = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
engine.generate(input_ids=prompt, sampling_params=params)
cProfile.run("engine.generate(input_ids=[1] + prompt, sampling_params=params)", "/tmp/prof")
pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(25)
