"""Every Triton kernel launch tiny bfloat16 engines make, recorded under the interpreter on CPU, compiled for sm_90.

tests/unit/test_triton_compile.py compiles each kernel at real models' shapes; this compiles exactly what the GPU
run (benchmarks/gpu_run.sh) will launch: the tiny models' head sizes, tile choices, split-K counts, the CUDA-graph
runner's static shapes, in bfloat16 as on a GPU. `record()` runs the engines (TRITON_INTERPRET=1), `compile_all()`
(in a process without the interpreter) compiles each distinct launch.
"""
from __future__ import annotations

import inspect
import json
import os
import pathlib
import random

KINDS = ["qwen3", "gemma3", "glm4_moe_lite", "step3p5"]  # dense + q/k norms; windows + unit offset; MLA + MoE; clamp
DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.int32": "i32",
          "torch.int64": "i64", "torch.int8": "i8", "torch.uint8": "u8", "torch.bool": "i1"}


def record(workdir: pathlib.Path) -> list[dict]:
    """Run the tiny engines in bfloat16 with every Triton path on; -> the distinct launches."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from ember import Engine
    from ember.engine.cuda_graph_runner import DecodeGraphRunner
    from ember.layers.triton_layers import use_triton_layers
    from tests.tiny_models import tiny_model

    seen: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        sig, consts = {}, {}
        for name, value in list(zip(names, args)) + [(k, v) for k, v in kwargs.items() if k in params]:
            if "constexpr" in str(params[name].annotation) or value is None:
                consts[name] = value
            elif isinstance(value, torch.Tensor):
                sig[name] = "*" + DTYPES[str(value.dtype)]
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            else:
                sig[name] = "fp32"
        launch = {"module": self.fn.__module__, "name": self.fn.__name__, "sig": sig, "consts": consts,
                  "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 2)}
        seen.setdefault(json.dumps(launch, sort_keys=True, default=str), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        rng = random.Random(0)
        shared = [rng.randint(3, 200) for _ in range(21)]  # (past Gemma's 16-token window; a cached prefix)
        prompts = [shared + [rng.randint(3, 200) for _ in range(n)] for n in (3, 9)]
        # (2 new tokens and a first request that only prefills: the launches of 4 and of decoding it too, measured
        # to be the same 26, in 35 s instead of 48 under the interpreter)
        sampling = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}
        for kind in KINDS:
            path = tiny_model(kind, workdir / kind)
            engine = Engine(model_path=str(path), dtype="bfloat16", device="cpu", attention_backend="triton",
                            moe_runner_backend="triton", page_size=16, max_total_tokens=1024, context_length=200)
            try:
                runner = engine.core.runner
                use_triton_layers(runner.model)
                engine.generate(input_ids=prompts[0], sampling_params={**sampling, "max_new_tokens": 1})  # prefill
                engine.generate(input_ids=prompts, sampling_params=sampling)  # extend after a cached prefix
                runner.graph_runner = DecodeGraphRunner(runner, max_bs=4, max_context=200, capture=False)
                engine.generate(input_ids=prompts, sampling_params=sampling)  # the graphs' static shapes
            finally:
                engine.shutdown()
    finally:
        InterpretedFunction.run = run
    return list(seen.values())


def compile_all(launches: list[dict]) -> list[tuple[str, int]]:
    """Compile each launch for sm_90 (Triton's whole CUDA pipeline, cubin included) -> (name, shared bytes)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    assert os.environ.get("TRITON_INTERPRET") != "1"
    out = []
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        sig = {name: "constexpr" if name in launch["consts"] else launch["sig"][name] for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, launch["consts"]), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
        out.append((launch["name"], kernel.metadata.shared))
    return out
