"""C++ kernels, compiled on first use (torch.utils.cpp_extension, cached), one build per instruction set.

`vnni_gemm.cpp` is the group-quantized GEMM (`torch.ops.ember.group_gemm`), `fused_decode.cpp` a whole
decode step around it (`torch.classes.ember.DecodeStack`), `moe_experts.cpp` a whole MoE expert layer on it
(`torch.ops.ember.moe_experts`) and `group_fit.cpp` the quantizer's per-group fit (`torch.ops.ember.fit_groups`). Each is built in variants with fixed compiler
flags rather than `-march=native`, so that a variant can be built and tested on any x86 machine that runs it:

  amx       avx512, and AMX tiles (`tdpbsud`) for the products of two or more activation rows (Sapphire Rapids+)
  avx512    AVX-512 VNNI (`vpdpbusd`, 16 rows per register)
  avxvnni   the avx2 kernel with AVX-VNNI's 256-bit `vpdpbusd` (Intel Alder Lake, Sierra Forest and later)
  avx2      AVX2 + FMA + F16C (`vpmaddubsw` + `vpmaddwd`): every x86-64 server of the last decade
  portable  no SIMD flags: the scalar loop (a reference; every build also has it as `group_gemm_reference`)

The process's variant is the best one the CPU's flags (/proc/cpuinfo) allow, or `EMBER_KERNEL_ISA` (e.g.
`avx2`, to measure the AVX2 path on an AVX-512 machine); it registers under the torch namespace `ember`.
Another variant, loaded for a test, registers under `ember_<variant>`. A build takes about a minute once and
is cached under ~/.cache/torch_extensions, keyed by the sources, the variant and its namespace.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, str] = {}  # variant -> torch namespace
_default: str | None = None
_forced: list[str] = []  # variants forced by `forced_variant`, innermost last

_AVX2 = ["-mavx", "-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
VARIANT_FLAGS = {
    "amx": [*_AVX512, "-mamx-tile", "-mamx-int8"],
    "avx512": _AVX512,
    "avxvnni": [*_AVX2, "-mavxvnni"],
    "avx2": _AVX2,
    "portable": [],
}
# /proc/cpuinfo flags each variant needs
_AVX512_NEEDS = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
_NEEDS = {"amx": _AVX512_NEEDS | {"amx_tile", "amx_int8"}, "avx512": _AVX512_NEEDS,
          "avxvnni": {"avx2", "fma", "f16c", "avx_vnni"}, "avx2": {"avx2", "fma", "f16c"}, "portable": set()}


def cpu_flags() -> set[str]:
    try:
        line = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        line = ""
    return set(line.partition(":")[2].split())


@functools.cache
def amx_granted() -> bool:
    """Whether Linux gives this process the AMX tile state (asked once: `arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)`, Linux 5.16+). A CPU can list amx_tile under a kernel or hypervisor that refuses it."""
    import ctypes
    import platform
    try:
        sys_arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
        return platform.machine() == "x86_64" and \
            ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, req_xcomp_perm, xtiledata) == 0
    except (OSError, AttributeError):
        return False


def supported_variants(flags: set[str] | None = None) -> list[str]:
    """The variants this CPU can run, best first (given `flags`: the variants those /proc/cpuinfo flags allow)."""
    real = flags is None
    flags = cpu_flags() if real else flags
    return [v for v in VARIANT_FLAGS if _NEEDS[v] <= flags and not (v == "amx" and real and not amx_granted())]


def default_variant() -> str:
    """The process's variant: `EMBER_KERNEL_ISA` if set, else the best the CPU runs (fixed at first use)."""
    global _default
    if _default is None:
        wanted = os.environ.get("EMBER_KERNEL_ISA", "").strip().lower()
        supported = supported_variants()
        if wanted and wanted not in supported:
            raise RuntimeError(f"EMBER_KERNEL_ISA={wanted!r}: this CPU runs {', '.join(supported)}")
        _default = wanted or supported[0]
    return _default


def current_variant() -> str:
    """The variant new quantized layers use: a `forced_variant` in effect, else the process's default."""
    return _forced[-1] if _forced else default_variant()


@contextlib.contextmanager
def forced_variant(variant: str):
    """Layers built inside use `variant`'s kernels (the tests run the AVX2 path on an AVX-512 machine)."""
    if variant not in supported_variants():
        raise RuntimeError(f"this CPU cannot run the {variant} kernels")
    _forced.append(variant)
    try:
        yield
    finally:
        _forced.pop()


def load_variant(variant: str) -> str:
    """Compile (once per source and variant) and load a variant; returns its torch namespace (`ember` for the
    process's default). Raises with the compiler's message if there is no working C++ toolchain."""
    with _lock:
        if variant in _loaded:
            return _loaded[variant]
        from torch.utils import cpp_extension

        ns = "ember" if variant == default_variant() else f"ember_{variant}"
        here = Path(__file__).parent
        sources = [here / "vnni_gemm.cpp", here / "fused_decode.cpp", here / "moe_experts.cpp", here / "group_fit.cpp"]
        # the name keys the cache: a changed source or header, or another variant, builds anew
        # -fopenmp: at::parallel_for is inline code that runs serially unless the extension itself is compiled with
        # OpenMP (its GOMP calls then bind to the libgomp torch already loaded): without it every kernel ran on one core
        cflags = ["-O3", "-fopenmp", *VARIANT_FLAGS[variant], f"-DEMBER_NS={ns}"]
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in [*sources, here / "group_gemm.h", here / "amx_tile.h"])
                              + " ".join(cflags).encode()).hexdigest()[:8]
        name = f"ember_kernels_{variant}_{ns}_{digest}"
        try:
            cpp_extension.load(name=name, sources=[str(p) for p in sources], extra_cflags=cflags,
                               extra_include_paths=[str(here)], is_python_module=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - surface the build failure with the reason
            raise RuntimeError(f"building the group-quantized CPU kernel failed (needs g++ and ninja): {exc}") from exc
        built = getattr(torch.ops, ns).kernel_isa()
        assert built == variant, f"the {variant} build compiled the {built} path"
        _loaded[variant] = ns
        logger.info("group GEMM kernels loaded: %s (torch.ops.%s)", variant, ns)
        return ns


def load_default() -> str:
    """Load the process's default variant (never a forced one); returns its torch namespace, `ember`."""
    return load_variant(default_variant())


def load_group_gemm() -> str:
    """Load the kernels of `current_variant()`; returns their torch namespace (`ember` unless forced)."""
    return load_variant(current_variant())
