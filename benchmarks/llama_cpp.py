"""llama.cpp's C++ `llama-server`, built from the llama.cpp sources vendored in the
`llama-cpp-python` sdist from PyPI (no other network is reachable here).

    python benchmarks/llama_cpp.py setup            # ~10-20 min on 2 cores, niced
    python benchmarks/llama_cpp.py serve --port 8080 # on ember's GGUF (Q4_K_M), -np 16 -cb

Only the `llama-server` target is built (CPU, Release, no curl, no prebuilt web UI). The sdist is
fetched with pip into benchmarks/.build/, the build lives in benchmarks/.build/llama.cpp-build/.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_ISA, BUILD, DEFAULT_MODEL, VENVS, gguf_path, make_venv, record_setup_time, run  # noqa: E402

NAME = "llama.cpp (llama-server)"
VERSION = "0.3.36"  # llama-cpp-python sdist whose vendored llama.cpp we build
SRC_ROOT = BUILD / f"llama_cpp_python-{VERSION}"
BUILD_DIR = BUILD / ("llama.cpp-build" if BENCH_ISA == "native" else f"llama.cpp-build-{BENCH_ISA}")
# EMBER_BENCH_ISA=avx2: ggml's AVX2 path only (no AVX-512 / VNNI), as on an AVX2-only server
ISA_FLAGS = (["-DGGML_NATIVE=ON"] if BENCH_ISA == "native" else
             ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              "-DGGML_AVX512=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX_VNNI=OFF", "-DGGML_BMI2=ON"])
SERVER_BIN = BUILD_DIR / "bin" / "llama-server"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def is_set_up() -> bool:
    return SERVER_BIN.exists()


def setup(force: bool = False, jobs: int = 2) -> Path:
    if is_set_up() and not force:
        print(f"{SERVER_BIN} exists")
        return SERVER_BIN
    t0 = time.time()
    BUILD.mkdir(parents=True, exist_ok=True)
    sdists = glob.glob(str(BUILD / f"llama_cpp_python-{VERSION}.tar.gz"))
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={VERSION}", "-d", str(BUILD)], nice=False)
        sdists = glob.glob(str(BUILD / f"llama_cpp_python-{VERSION}.tar.gz"))
    if not SRC_ROOT.exists():
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(BUILD, filter="data")
    src = SRC_ROOT / "vendor" / "llama.cpp"
    run(["cmake", "-S", str(src), "-B", str(BUILD_DIR), "-G", "Ninja",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *ISA_FLAGS,
         # A Xeon VM here lists AMX in cpuinfo but its tile instructions raise SIGILL (the hypervisor does
         # not enable the state): -march=native would build ggml's AMX path, which crashes on first use.
         f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"])
    run(["cmake", "--build", str(BUILD_DIR), "--target", "llama-server", "-j", str(jobs)])
    dt = time.time() - t0
    record_setup_time("llama.cpp" if BENCH_ISA == "native" else f"llama.cpp-{BENCH_ISA}", dt, f"llama-cpp-python {VERSION} sdist, cmake --target llama-server -j{jobs}")
    print(f"built {SERVER_BIN} in {dt:.0f} s")
    return SERVER_BIN


# llama.cpp's Python server (llama-cpp-python[server]) on the libllama built above: installed without building
# llama.cpp a second time (LLAMA_BUILD=OFF) and pointed at our build with LLAMA_CPP_LIB_PATH. It serves one
# request at a time; --interrupt_requests False, or each new request aborts the running one.
PY_VENV = VENVS / "llama-cpp-python"


def python_server_is_set_up() -> bool:
    return is_set_up() and (PY_VENV / "bin" / "python").exists() and any(PY_VENV.glob("lib/python*/site-packages/llama_cpp"))


def setup_python_server() -> None:
    setup()
    t0 = time.time()
    make_venv("llama-cpp-python")
    run([str(PY_VENV / "bin" / "pip"), "install", f"llama-cpp-python[server]=={VERSION}"],
        env={"CMAKE_ARGS": "-DLLAMA_BUILD=OFF"})
    record_setup_time("llama.cpp-python", time.time() - t0, f"llama-cpp-python[server] {VERSION}, LLAMA_BUILD=OFF")


def python_server_cmd(model: str = DEFAULT_MODEL, port: int = 8080, ctx: int = 4096) -> str:
    return (f"{PY_VENV / 'bin' / 'python'} -m llama_cpp.server --model {gguf_path(model)} --host 127.0.0.1 "
            f"--port {port} --n_threads 2 --n_ctx {ctx} --interrupt_requests False --model_alias {model}")


def python_server_env() -> dict:
    return {"LLAMA_CPP_LIB_PATH": str(BUILD_DIR / "bin")}


def version() -> str:
    return f"llama.cpp vendored in llama-cpp-python {VERSION}"


def server_cmd(model: str = DEFAULT_MODEL, port: int = 8080, threads: int = 2, parallel: int = 16,
               ctx_per_slot: int = 2048) -> str:
    """The llama-server command line (parallel slots + continuous batching, as a CPU user runs it).

    The context is split evenly between slots, so -c is parallel * ctx_per_slot."""
    gguf = gguf_path(model)
    return (f"{SERVER_BIN} -m {gguf} --host 127.0.0.1 --port {port} -t {threads} -tb {threads} "
            f"-np {parallel} -cb -c {parallel * ctx_per_slot} --jinja --alias {model}")


def server_env() -> dict:
    return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--force", action="store_true")
    s.add_argument("--jobs", type=int, default=2)
    v = sub.add_parser("serve")
    v.add_argument("--model", default=DEFAULT_MODEL)
    v.add_argument("--port", type=int, default=8080)
    v.add_argument("--parallel", type=int, default=16)
    a = p.parse_args(argv)
    if a.cmd == "setup":
        setup(a.force, a.jobs)
        return 0
    cmd = server_cmd(a.model, a.port, parallel=a.parallel)
    print(cmd, flush=True)
    os.execv(shlex.split(cmd)[0], shlex.split(cmd))


if __name__ == "__main__":
    sys.exit(main())
