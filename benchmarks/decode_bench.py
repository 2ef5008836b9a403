"""In-process decode speed of the CPU default path: 128 greedy tokens per request (EOS ignored) at concurrency 1 and
8, best of 2 runs, per bundled model. A quick before/after check for kernel changes (run_all.py is the peer
comparison over HTTP).

    python benchmarks/decode_bench.py                       # the 0.5B and the 1.5B
    python benchmarks/decode_bench.py qwen2.5-coder-0.5b

It runs under the OpenMP settings `ember serve` gives its engine process (benchmarks/common.py BASE_ENV).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import use_serving_env  # noqa: E402

use_serving_env()  # the OpenMP settings of `ember serve`'s engine process, before torch loads


def main() -> None:
    from ember import Engine
    models = sys.argv[1:] or ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    sp = {"temperature": 0, "max_new_tokens": 128, "ignore_eos": True}
    for model in models:
        engine = Engine(model_path=model, dtype="auto", cpu_kv_cache_gb=1.0)
        engine.generate("Write a story about a cat.", {**sp, "max_new_tokens": 8})  # warm-up
        rows = []
        for c in (1, 8):
            best = 0.0
            for _ in range(2):
                engine.flush_cache()
                t = time.perf_counter()
                outs = engine.generate([f"Write a story about a cat number {i}." for i in range(c)], sp)
                dt = time.perf_counter() - t
                best = max(best, sum(o["meta_info"]["completion_tokens"] for o in outs) / dt)
            rows.append(f"c={c} {best:.1f} tok/s")
        print(model, *rows, flush=True)
        del engine


if __name__ == "__main__":
    main()
