"""Throughput of ember's group-quantized GEMM (ember/kernels/vnni_gemm.cpp) per kernel variant and batch rows M,
against torch's float32 and bfloat16 GEMMs, on one layer shape (Qwen2.5-0.5B's gate/up projection, N=4864, K=896).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/group_gemm_bench.py                 # the variants this CPU runs
    OMP_WAIT_POLICY=PASSIVE python benchmarks/group_gemm_bench.py avx512,avx2     # chosen ones

Prints milliseconds per call and GMAC/s (multiply-adds per second) for 4- and 8-bit weights at M = 1..256. The
weights of one layer fit in the last-level cache here, so M=1 shows the kernel's speed, not the memory's.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ember.kernels import load_variant, supported_variants  # noqa: E402
from ember.layers.quantization import _pack_groups  # noqa: E402

N, K = 4864, 896


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    torch.manual_seed(0)
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else supported_variants()
    w = torch.randn(N, K)
    print(f"N={N} K={K}, {torch.get_num_threads()} threads, variants {variants}")
    for bits in (4, 8):
        q, dw, mw = _pack_groups(w, bits)
        for v in variants:
            op = getattr(torch.ops, load_variant(v)).group_gemm
            for M in (1, 4, 16, 64, 256):
                x = torch.randn(M, K)
                dt = timed(lambda: op(x, q, dw, mw, bits, N), max(3, 2000 // M))
                print(f"group_gemm {v:9s} {bits}-bit M={M:4d} {dt * 1e3:8.3f} ms {M * N * K / dt / 1e9:7.1f} GMAC/s")
    for dtype in (torch.float32, torch.bfloat16):
        ww = w.to(dtype)
        for M in (16, 64, 256):
            x = torch.randn(M, K, dtype=dtype)
            dt = timed(lambda: torch.nn.functional.linear(x, ww), 20)
            print(f"torch linear {str(dtype):14s} M={M:4d} {dt * 1e3:8.3f} ms {M * N * K / dt / 1e9:7.1f} GMAC/s")


if __name__ == "__main__":
    main()
