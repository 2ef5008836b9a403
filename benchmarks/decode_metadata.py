"""Host time of the Triton backend's per-step metadata (TritonBackend.prepare) for a decode step, by its decode
shortcut and by its general form, at batch 1 / 16 / 64 / 128 (on CPU the device copies are no-ops: this is the
Python and torch work a GPU step under overlap scheduling must not wait for).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_metadata.py
"""
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ember.attention.base import GroupBatch  # noqa: E402
from ember.attention.triton_backend import TritonBackend  # noqa: E402

rng = random.Random(0)
P = 16
for B in (1, 16, 64, 128):
    prefix = [rng.randint(256, 640) for _ in range(B)]  # prompt 256 + up to 384 tokens decoded
    tables = [rng.sample(range(1, 100_000), p // P + 1) for p in prefix]
    gb = GroupBatch(prefix, [1] * B, tables, P, None, "cpu")
    row = []
    for form in (TritonBackend._general, TritonBackend._decode):
        for _ in range(50):
            form(gb)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(200):
                form(gb)
            best = min(best, (time.perf_counter() - t) / 200)
        row.append(best * 1e6)
    print(f"batch {B:4d}: general {row[0]:7.1f} us, decode shortcut {row[1]:7.1f} us ({row[0] / row[1]:.1f}x)")
