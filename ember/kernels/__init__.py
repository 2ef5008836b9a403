"""C++ kernels, compiled on first use for the CPU they run on (torch.utils.cpp_extension, cached).

`load_group_gemm()` builds `vnni_gemm.cpp` (the group-quantized GEMM, `torch.ops.ember.group_gemm`) and
`fused_decode.cpp` (a whole decode step around it, `torch.classes.ember.DecodeStack`) with `-march=native`,
so AVX-512 VNNI is used where the CPU has it and a portable loop where it does not. The build takes about a
minute once; the result is cached under ~/.cache/torch_extensions, keyed by the sources and the CPU's flags.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded = False


def _cpu_key() -> str:
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def load_group_gemm() -> None:
    """Compile (once per source and CPU) and load the group-quantized GEMM; raises with the compiler's
    message if there is no working C++ toolchain."""
    global _loaded
    with _lock:
        if _loaded:
            return
        from torch.utils import cpp_extension

        here = Path(__file__).parent
        sources = [here / "vnni_gemm.cpp", here / "fused_decode.cpp"]
        # the name keys the cache: a changed source or header, or another CPU, builds anew
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in [*sources, here / "group_gemm.h"])).hexdigest()[:8]
        name = f"ember_kernels_{_cpu_key()}_{digest}"
        try:
            cpp_extension.load(name=name, sources=[str(p) for p in sources], extra_cflags=["-O3", "-march=native"],
                               extra_include_paths=[str(here)], is_python_module=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - surface the build failure with the reason
            raise RuntimeError(f"building the group-quantized CPU kernel failed (needs g++ and ninja): {exc}") from exc
        _loaded = True
        logger.info("group GEMM kernel loaded (AVX-512 VNNI: %s)", torch.ops.ember.has_vnni_kernel())
