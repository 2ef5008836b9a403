"""MoE layer efficiency (issue 13, acceptance 5): one MoE layer against a dense MLP of its active parameters.

Layer: 64 experts, top-8 (softmax router), hidden 2048, expert width 768, CPU; fp32 and --quantization
w8a8_int8 (and w4a8). Baseline: a dense SwiGLU MLP holding only the active parameters (width 8 x 768 = 6144),
the same kernels (quantized the same way).
  batch 1:  MoE layer (router + experts) vs one dense call             target: ratio <= 1.5
  batch 16: MoE layer on 16 tokens vs 8 dense calls on the same tokens  target: ratio <= 1.0
(At batch 16 the 16 x 8 choices hit ~56 of the 64 experts: ~7x the active weights, so 8 dense calls read
about as many bytes.) Timings are medians over interleaved repeats (MoE and dense alternate, so load from
other processes hits both alike).

Clocks: `--clock cpu` (default) runs one thread and reads its CPU time (time.thread_time): on a shared,
overloaded machine wall time mostly measures when the scheduler lets us run, and a layer of 16 small GEMMs
is preempted more often than one of 2 large ones. `--clock wall` reads wall time with `--threads` threads.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/moe_bench.py [--repeats 20] [--methods fp32 w8a8_int8 w4a8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ember.layers.mlp import GatedMLP  # noqa: E402
from ember.layers.moe import MoEExperts, RouterGate, route_softmax  # noqa: E402

E, K, H, I = 64, 8, 2048, 768


class MoELayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = RouterGate(H, E)
        self.experts = MoEExperts(E, H, I)

    def forward(self, x):
        w, ids = route_softmax(self.gate(x), K, True)
        return self.experts(x, w, ids)


def build(method: str):
    torch.manual_seed(0)
    moe, dense = MoELayer(), GatedMLP(H, K * I)
    with torch.no_grad():
        for p in [*moe.parameters(), *dense.parameters()]:
            p.normal_(std=0.02)
    if method != "fp32":
        from ember.layers.model_quantization import quantize_model
        quantize_model(moe, method)
        quantize_model(dense, method)
    return moe.eval(), dense.eval()


CLOCK = time.thread_time


_FLUSH = torch.empty(0)


def _time(fn, n=1) -> float:
    """Time n calls, each with the caches flushed first (untimed): in a decode step every layer's weights come
    from memory, not from a cache the previous call left warm."""
    total = 0.0
    for _ in range(n):
        _FLUSH.add_(1.0)
        t0 = CLOCK()
        fn()
        total += CLOCK() - t0
    return total


@torch.inference_mode()
def bench(method: str, repeats: int) -> dict:
    global _FLUSH
    _FLUSH = torch.zeros(64 * 2**20)  # 256 MB, written between timed calls: larger than any cache here
    moe, dense = build(method)
    x1, x16 = torch.randn(1, H), torch.randn(16, H)
    _, ids = route_softmax(moe.gate(x16), K, True)
    hit = int(ids.unique().numel())
    for _ in range(3):  # warm-up (kernel builds, allocator)
        moe(x1), dense(x1), moe(x16), dense(x16)
    t = {"moe_b1": [], "dense_b1": [], "moe_b16": [], "dense8_b16": []}
    for _ in range(repeats):
        t["moe_b1"].append(_time(lambda: moe(x1)))
        t["dense_b1"].append(_time(lambda: dense(x1)))
        t["moe_b16"].append(_time(lambda: moe(x16)))
        t["dense8_b16"].append(_time(lambda: dense(x16), 8))
    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    low = {k: min(v) * 1e3 for k, v in t.items()}  # the least disturbed run of each
    return {"method": method, "experts_hit_at_b16": hit, **{f"{k}_ms": round(v, 3) for k, v in med.items()},
            "ratio_b1": round(med["moe_b1"] / med["dense_b1"], 3),
            "ratio_b16": round(med["moe_b16"] / med["dense8_b16"], 3),
            **{f"{k}_min_ms": round(v, 3) for k, v in low.items()},
            "ratio_b1_min": round(low["moe_b1"] / low["dense_b1"], 3),
            "ratio_b16_min": round(low["moe_b16"] / low["dense8_b16"], 3)}


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["fp32", "w8a8_int8"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: one thread, its CPU time; wall: wall time with --threads threads")
    ap.add_argument("--threads", type=int, default=0, help="torch threads with --clock wall (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        torch.set_num_threads(1)  # all work in this thread, so its CPU time is the layer's
    else:
        CLOCK = time.perf_counter
        if args.threads:
            torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "clock": args.clock, "threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "load_avg": os.getloadavg()}
    print(f"MoE layer E={E} top-{K} H={H} I={I} vs dense MLP of the active parameters (width {K * I}); {env}")
    print(f"{'method':<10} {'hit@16':>6} {'MoE b1':>9} {'dense b1':>9} {'ratio':>6}   "
          f"{'MoE b16':>9} {'8x dense':>9} {'ratio':>6}   (ms, medians of {args.repeats})")
    rows = []
    for m in args.methods:
        r = bench(m, args.repeats)
        rows.append(r)
        print(f"{m:<10} {r['experts_hit_at_b16']:>6} {r['moe_b1_ms']:>9.3f} {r['dense_b1_ms']:>9.3f} "
              f"{r['ratio_b1']:>6.2f}   {r['moe_b16_ms']:>9.3f} {r['dense8_b16_ms']:>9.3f} {r['ratio_b16']:>6.2f}"
              f"   (min-time ratios {r['ratio_b1_min']:.2f} / {r['ratio_b16_min']:.2f})", flush=True)
    print("targets: batch-1 ratio <= 1.5, batch-16 ratio <= 1.0")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "shape": {"E": E, "top_k": K, "H": H, "I": I},
                                         "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
