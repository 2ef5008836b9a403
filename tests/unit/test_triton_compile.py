"""The Triton kernels (attention, MoE, RoPE, RMSNorm, SiLU x up) compile for a GPU without one: Triton's whole CUDA
pipeline (front end, layouts, LLVM, PTX, and cubin through the ptxas its wheel ships) for sm_90 (H100/H200) in
bfloat16, at real models' shapes, and each fits in the shared memory of a block. What the interpreter cannot check
(tl.dot's tile constraints, layouts, register and shared-memory budgets) fails here. Runs in a subprocess: the
kernels must be plain @triton.jit functions, not the interpreted ones test_triton_attention.py makes."""
import os
import subprocess
import sys

import pytest

SHARED_LIMIT = 227 * 1024  # bytes per block on sm_90 (sm_80: 163 KB; every case here is under 64 KB)

# (kernel, head / latent dims as the launchers pick tiles for them)
CASES = ["decode gqa 32/8 x 128", "decode split-k 8", "combine 8 x 128", "extend gqa 32/8 x 128",
         "mla decode 512+64 split-k 4", "mla extend 512+64", "moe gate_up 16 rows", "moe down 64 rows weighted",
         "extend gqa 32/8 x 128 tree", "rope 28/4 x 128", "rms_norm 3584", "add + rms_norm unit offset 2560",
         "silu_and_mul 1024 clamped"]


def _compile_all() -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ember.attention import triton_decode, triton_extend, triton_mla
    from ember.layers import fused_triton, moe_triton, rotary_triton
    from ember.attention.triton_common import block, dot_precision

    target = GPUTarget("cuda", 90, 32)
    prec = dot_precision(torch.bfloat16)

    def compile_one(name, fn, pointers, consts, num_stages=2):
        sig = {a: "constexpr" if a in consts else pointers.get(a, "fp32" if a in ("scale", "eps", "limit") else "i32")
               for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=target,
                                options=dict(num_warps=4, num_stages=num_stages))
        print(f"{name}: shared={kernel.metadata.shared}", flush=True)

    paged = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "Lse": "*fp32", "PageTable": "*i32",
             "SeqLens": "*i32", "Prefix": "*i32", "QLoc": "*i32", "QLen": "*i32", "QL": "*bf16", "QR": "*bf16",
             "Cache": "*bf16", "Mid": "*fp32", "TreeBase": "*i32", "TreeSize": "*i32", "TreePosOff": "*i32",
             "TreeVisOff": "*i32", "TreePos": "*i32", "TreeVis": "*i8"}
    split = dict(paged, O="*fp32")  # split-K writes float32 partial outputs
    gqa = dict(PAGE_SIZE=16, GROUP=4, BLOCK_H=block(4), DK=128, DV=128, BLOCK_DK=128, BLOCK_DV=128, BLOCK_N=64,
               PRECISION=prec)
    compile_one(CASES[0], triton_decode._decode_kernel, paged, dict(gqa, NUM_SPLITS=1))
    compile_one(CASES[1], triton_decode._decode_kernel, split, dict(gqa, NUM_SPLITS=8))
    compile_one(CASES[2], triton_decode._combine_kernel, paged, dict(DV=128, BLOCK_DV=128, NUM_SPLITS=8))
    extend = dict(PAGE_SIZE=16, GROUP=4, DK=128, DV=128, BLOCK_DK=128, BLOCK_DV=128, BLOCK_M=64, BLOCK_N=64,
                  PRECISION=prec)
    compile_one(CASES[3], triton_extend._extend_kernel, paged, dict(extend, HAS_TREE=False))
    compile_one(CASES[4], triton_mla._mla_decode_kernel, split, dict(
        PAGE_SIZE=16, R=512, DR=64, BLOCK_R=512, BLOCK_DR=64, BLOCK_H=16, BLOCK_N=32, PRECISION=prec, NUM_SPLITS=4))
    compile_one(CASES[5], triton_extend._extend_kernel, paged, dict(
        PAGE_SIZE=16, GROUP=20, DK=576, DV=512, BLOCK_DK=block(576), BLOCK_DV=512, BLOCK_M=16, BLOCK_N=16,
        PRECISION=prec, HAS_TREE=False), num_stages=1)
    moe = {"A": "*bf16", "W": "*bf16", "C": "*bf16", "SortedIds": "*i32", "BlockExpert": "*i32", "RouteWeights": "*fp32"}
    tiles = dict(BLOCK_N=64, BLOCK_K=64, PRECISION=prec)
    compile_one(CASES[6], moe_triton._grouped_gemm_kernel, moe, dict(tiles, A_DIV=8, MUL_WEIGHT=False, BLOCK_M=16))
    compile_one(CASES[7], moe_triton._grouped_gemm_kernel, dict(moe, C="*fp32"),
                dict(tiles, A_DIV=1, MUL_WEIGHT=True, BLOCK_M=64))
    compile_one(CASES[8], triton_extend._extend_kernel, paged, dict(extend, HAS_TREE=True))
    rope = {"Q": "*bf16", "K": "*bf16", "QO": "*bf16", "KO": "*bf16", "Cos": "*fp32", "Sin": "*fp32", "Pos": "*i64"}
    compile_one(CASES[9], rotary_triton._rope_kernel, rope, dict(H=28, HKV=4, HALF=64, D=128, BLOCK_H=32, BLOCK_HKV=4,
                                                                 BLOCK_HALF=64, BLOCK_REST=1))
    norm = {"X": "*bf16", "Delta": "*bf16", "Sum": "*bf16", "W": "*bf16", "O": "*bf16"}
    compile_one(CASES[10], fused_triton._rms_norm_kernel, norm,
                dict(D=3584, BLOCK=4096, UNIT_OFFSET=False, HAS_DELTA=False))
    compile_one(CASES[11], fused_triton._rms_norm_kernel, norm,
                dict(D=2560, BLOCK=4096, UNIT_OFFSET=True, HAS_DELTA=True))
    compile_one(CASES[12], fused_triton._silu_and_mul_kernel, {"X": "*bf16", "O": "*bf16"},
                dict(BLOCK=1024, HAS_LIMIT=True))


def test_the_kernels_compile_for_sm90():
    pytest.importorskip("triton", minversion="3.9")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shared = dict(line.split(": shared=") for line in proc.stdout.splitlines() if ": shared=" in line)
    assert list(shared) == CASES, proc.stdout
    assert all(int(s) <= SHARED_LIMIT for s in shared.values()), shared


if __name__ == "__main__":
    _compile_all()
