"""Issue 18's GPU table in one run on a lent GPU: ember against transformers on random weights of real shapes
(no model hub there; the compute is the same), bf16, prompt 256, 128 output tokens forced, plus the weight-read
roofline from a copy-bandwidth measurement made in the same run.

    python benchmarks/gpu_bench.py --out DIR                      # every section, results written as they come
    python benchmarks/gpu_bench.py --out DIR --sections bandwidth qwen05b:ember qwen05b:static
    python benchmarks/gpu_bench.py --smoke --out /tmp/gb --sections bandwidth qwen05b:ember qwen05b:dynamic

Sections: `bandwidth` (device-to-device copy: bytes read + written per second) and SHAPE:ENGINE, SHAPE qwen05b
(Qwen2.5-0.5B) or qwen7b (Qwen2.5-7B), ENGINE `ember` (Triton attention + CUDA graphs + overlap; 0.5B at batch
1 / 16 / 64, 7B at 1 / 32), `eager` (ember without CUDA graphs, batch 1), `sampled` (ember with Qwen2.5's
sampling defaults, repetition penalty included, 0.5B at 1 / 64: the sampler's device-side work), `dynamic`
(transformers generate, its dynamic cache, same batches) or `static` (its static cache under torch.compile, 0.5B
at 64 and 1). Rows go to DIR/gpu_bench.json and DIR/gpu_bench.md as they come, so a run cut short keeps what it
measured.
benchmarks/gpu_run.sh runs this and the GPU tests in one command on the device machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROMPT, OUTPUT = 256, 128
SHAPES = {  # Qwen2.5 configs (hub config.json values)
    "qwen05b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "smoke": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
BATCHES = {"qwen05b": dict(ember=(1, 16, 64), eager=(1,), sampled=(1, 64), dynamic=(1, 16, 64), static=(64, 1)),
           "qwen7b": dict(ember=(1, 32), eager=(), sampled=(), dynamic=(1, 32), static=()),
           "smoke": dict(ember=(1, 4), eager=(1,), sampled=(4,), dynamic=(1, 4), static=(1,))}
# what a Qwen2.5-Instruct deployment samples with (its generation_config, ember's --sampling-defaults model): the
# `sampled` rows run the sampler's truncations and the penalties' device form under overlap scheduling
QWEN_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "seed": 0}


class Run:
    def __init__(self, out: pathlib.Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.device = "cpu" if smoke else "cuda"
        self.result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "torch": torch.__version__, "rows": [], "bandwidth_gbs": None, "errors": []}
        import transformers
        self.result["transformers"] = transformers.__version__
        try:
            import triton
            self.result["triton"] = triton.__version__
        except ImportError:
            pass

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_bench.json").write_text(json.dumps(self.result, indent=1))
        (self.out / "gpu_bench.md").write_text(table(self.result))

    # ------------------------------------------------------------------ sections
    def bandwidth(self):
        n = (64 << 20) if self.smoke else (4 << 30)
        x = torch.empty(n, dtype=torch.uint8, device=self.device)
        y = torch.empty_like(x)
        y.copy_(x)
        self.sync()
        t = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        self.sync()
        self.result["bandwidth_gbs"] = 2 * n * 10 / (time.perf_counter() - t) / 1e9  # read + write
        del x, y

    def model(self, shape: str) -> pathlib.Path:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from tests.tiny_models import byte_level_tokenizer
        path = pathlib.Path(f"/tmp/ember-gpu-bench/{shape}")
        if not (path / "config.json").exists():
            tok = byte_level_tokenizer()
            cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1000000.0,
                              eos_token_id=tok.eos_token_id)
            torch.manual_seed(0)
            with torch.device(self.device):  # (initialized where it will run: seconds, not minutes, for the 7B)
                model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            del model
            self.free()
        return path

    def free(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def weight_bytes(self, path: pathlib.Path) -> int:
        from safetensors import safe_open
        total = 0
        for f in path.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * 2  # bf16
        return total

    def prompts(self, batch: int) -> list[list[int]]:
        return [[3 + b] + list(range(300, 300 + PROMPT - 1)) for b in range(batch)]

    def ember(self, shape: str, path: pathlib.Path, batches, graphs: bool, sampling: dict | None = None):
        from ember import Engine
        if not batches:
            return
        kwargs = dict(attention_backend="triton", moe_runner_backend="triton", disable_cuda_graph=not graphs,
                      max_running_requests=max(max(batches), 1), cuda_graph_max_bs=max(batches))
        if self.smoke:
            kwargs.update(device="cpu", dtype="float32", max_total_tokens=4096)
        else:
            kwargs.update(dtype="bfloat16")
        engine = Engine(model_path=str(path), **kwargs)
        label = "ember (Triton attention, CUDA graphs)" if graphs else "ember (Triton attention, no CUDA graphs)"
        if sampling:
            label = label[:-1] + "; Qwen2.5's sampling: T 0.7, top-p 0.8, top-k 20, repetition 1.05)"
        params = {"max_new_tokens": OUTPUT, "temperature": 0, "ignore_eos": True, **(sampling or {})}
        try:
            for batch in batches:
                engine.generate(input_ids=self.prompts(batch), sampling_params=params)  # warm-up: same shapes
                engine.flush_cache()
                self.sync()
                t = time.perf_counter()
                outs = engine.generate(input_ids=[[9] + p for p in self.prompts(batch)], sampling_params=params)
                self.sync()
                dt = time.perf_counter() - t
                assert all(len(o["output_ids"]) == OUTPUT for o in outs)
                self.row(shape, label, batch, batch * OUTPUT / dt)
        finally:
            engine.shutdown()
            del engine
            self.free()

    def transformers(self, shape: str, path: pathlib.Path, batches, static: bool):
        from transformers import AutoModelForCausalLM
        if not batches:
            return
        dtype = torch.float32 if self.smoke else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        label = "transformers generate (dynamic cache)"
        kwargs = {}
        if static:
            label = "transformers generate (static cache" + (")" if self.smoke else ", compiled)")
            kwargs["cache_implementation"] = "static"
            if not self.smoke:  # (transformers' documented recipe; compiling on CPU would take the smoke run minutes)
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        try:
            for batch in batches:
                ids = torch.tensor([[9] + p for p in self.prompts(batch)], device=self.device)
                with torch.no_grad():
                    for _ in range(2 if static else 1):  # warm-up (static: compiles, then captures)
                        model.generate(ids, max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False, **kwargs)
                    self.sync()
                    t = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False,
                                         **kwargs)
                    self.sync()
                dt = time.perf_counter() - t
                assert out.shape[1] == ids.shape[1] + OUTPUT
                self.row(shape, label, batch, batch * OUTPUT / dt)
        finally:
            del model
            self.free()

    def row(self, shape, engine, batch, tps):
        self.result["rows"].append({"shape": shape, "engine": engine, "batch": batch, "tok_s": tps})
        print(f"{shape} | {engine} | batch {batch} | {tps:.1f} tok/s", flush=True)
        self.save()

    def section(self, name: str):
        """`bandwidth` or SHAPE:ENGINE (see the module docstring); an engine's failure is recorded, the run goes on."""
        if name == "bandwidth":
            return self.bandwidth()
        shape, engine = name.split(":")
        shape = "smoke" if self.smoke else shape
        try:
            path = self.model(shape)
            self.result.setdefault("weight_bytes", {})[shape] = self.weight_bytes(path)
            batches = BATCHES[shape][engine]
            if engine in ("ember", "eager", "sampled"):
                self.ember(shape, path, batches, graphs=engine != "eager",
                           sampling=QWEN_SAMPLING if engine == "sampled" else None)
            else:
                self.transformers(shape, path, batches, static=engine == "static")
        except Exception as e:  # one engine failing must not lose the others' rows
            import traceback
            traceback.print_exc()
            self.result["errors"].append(f"{name}: {type(e).__name__}: {e}"[:2000])
            self.free()


def table(result: dict) -> str:
    bw = result.get("bandwidth_gbs")
    lines = [f"GPU: {result['device']}; torch {result['torch']}, transformers {result.get('transformers')}, "
             f"triton {result.get('triton')}; bf16, random weights, prompt {PROMPT}, {OUTPUT} output tokens forced.",
             f"Copy bandwidth (read + write): {bw:.0f} GB/s" if bw else "Copy bandwidth: not measured", "",
             "| shape | engine | batch | output tok/s | batch-1 % of weight-read roofline |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        wb = result.get("weight_bytes", {}).get(r["shape"])
        roof = f"{100 * r['tok_s'] / (bw * 1e9 / wb):.0f} %" if bw and wb and r["batch"] == 1 else ""
        lines.append(f"| {r['shape']} | {r['engine']} | {r['batch']} | {r['tok_s']:.0f} | {roof} |")
    lines += [f"error: {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu")
    # (the acceptance numbers first, transformers' compiled static cache, the slowest to set up, last)
    ap.add_argument("--sections", nargs="+", default=["bandwidth", "qwen05b:ember", "qwen7b:ember", "qwen05b:eager",
                                                      "qwen05b:dynamic", "qwen7b:dynamic", "qwen05b:static",
                                                      "qwen05b:sampled"])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # (before ember imports Triton: the kernels run interpreted)
    run = Run(pathlib.Path(args.out), args.smoke)
    for section in args.sections:
        t = time.perf_counter()
        run.section(section)
        run.save()
        print(f"[{section}: {time.perf_counter() - t:.0f} s]", flush=True)
    print(table(run.result))


if __name__ == "__main__":
    main()
