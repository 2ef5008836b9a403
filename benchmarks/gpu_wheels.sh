#!/usr/bin/env bash
# The packages benchmarks/gpu_run.sh needs that the lent GPU machine lacks (/work/.library/device/KINDS.md lists
# what it has: torch 2.11, triton 3.6, transformers 5.17), as wheels in .whl/ (ignored by git; `carry` it):
# transformers 5.25 (step3p7 / glm4_moe_lite / minimax_m2 classes the tiny models are built with) and its needs.
# The in-process Engine imports none of the server's packages (fastapi, zmq, xgrammar, gguf, av).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
PIP=${PIP:-.venv/bin/python -m pip}
for spec in transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 kernels==0.19.1 \
            hf-xet==1.8.0 tomlkit==0.15.3 truststore==0.10.5 regex==2026.12.2 click==8.5.1 typer==0.29.2; do
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
du -sh .whl
