"""One fused decode step (ember/kernels/fused_decode.cpp) of a bundled w4a8 model at 1..N rows of one request: what a
decode step (1 row) and a speculative verify of k drafts (k + 1 rows) cost, over a context of L cached tokens.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/fused_step_bench.py                          # the 1.5B, L = 150 and 1000
    OMP_WAIT_POLICY=PASSIVE python benchmarks/fused_step_bench.py --model qwen2.5-coder-0.5b --rows 1 2

Prints, per context length and row count, the best and mean of --reps calls in ms: the whole forward (the step, the
lm_head at every row, as a verify asks) and the decoder stack alone. The KV rows hold whatever the pool held (the
cost does not depend on the values). Run it on a quiet machine; rows of one run compare.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import use_serving_env  # noqa: E402

use_serving_env()  # the OpenMP settings of `ember serve`'s engine process, before torch loads


def timed(fn, reps: int) -> tuple[float, float]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, statistics.mean(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--context", type=int, nargs="+", default=[150, 1000], help="cached tokens before the new rows")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    import torch

    from ember import Engine
    from ember.speculative.draft_model import _DraftReq
    engine = Engine(model_path=args.model, dtype="auto", cpu_kv_cache_gb=1.0)
    runner = engine.core.runner
    fused = runner.fused_decoder
    if fused is None:
        raise SystemExit(f"{args.model}: decode steps do not run fused here (see the engine's log)")
    kv = runner.kv_cache
    print(f"{args.model}, {torch.get_num_threads()} threads; ms: best / mean of {args.reps}")
    print("| context | rows | forward (lm_head at every row) | stack only |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for L in args.context:
            tables = {g: a.alloc(-(-(L + max(args.rows)) // kv.page_size)) for g, a in kv.allocators.items()}
            for n in args.rows:
                req = _DraftReq(list(range(100, 100 + L + n)), L, tables)
                fwd = timed(lambda: runner.forward([req], [n], full_rows=[True]), args.reps)
                batch = runner.build_batch([req], [n])
                stack = timed(lambda: fused(batch), args.reps)
                print(f"| {L} | {n} | {fwd[0]:.2f} / {fwd[1]:.2f} | {stack[0]:.2f} / {stack[1]:.2f} |", flush=True)
            for g, table in tables.items():
                kv.allocators[g].free(table)


if __name__ == "__main__":
    main()
