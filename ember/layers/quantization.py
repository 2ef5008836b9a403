"""Quantized linear layers for fast CPU serving (`--quantization int8|int4|w8a8_int8|w4a8`).

Batch-1 decode on CPU is bound by reading weights: fp32 GEMMs at M=1 reach a few GFLOP/s here, while
torch's weight-only int8 / int4 CPU kernels read 4x / 8x fewer bytes (activations run in bfloat16 inside
the kernel). Batched decode is bound by compute instead, and there integer dot products win: w8a8_int8
quantizes activations too (per token) and runs fbgemm's int8 GEMM (VNNI), 2-3x the weight-only kernels
at 16+ rows (BENCHMARKS.md); without AVX-512 VNNI fbgemm saturates, and w8a8_int8 runs on ember's group
kernel with 8-bit codes instead. w4a8 reads the fewest bytes: 4-bit groups of 32 (fp16 scale and offset)
times int8 activation groups, on ember's own kernel (ember/kernels/vnni_gemm.cpp: AVX-512 VNNI or AVX2,
exact integer products on both), llama.cpp's Q4_1 x Q8_0 scheme. The fp32 path stays exact; these are
options.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn


METHODS = ("int8", "int4", "w8a8_int8", "w4a8")
INT4_GROUP = 32


class _QuantLinear(nn.Module):
    """What every quantized linear shares: flatten to rows, the kernel (`_mm`), back to shape, bias."""

    quantized = True  # (model casts leave its tensors as they are: cast_unquantized)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.bias = linear.bias
        self.out_features = linear.weight.shape[0]

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1])).to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scales [N] float32)."""
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(_QuantLinear):
    """Per-output-channel symmetric int8 weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scales = _int8_per_channel(linear.weight.detach().float())
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales)


class Int4Linear(_QuantLinear):
    """Group-wise (32) asymmetric int4 weights, packed for torch's CPU int4 kernel."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__(linear)
        w = linear.weight.detach().float()
        N, K = w.shape
        if K % group:
            raise ValueError(f"in_features {K} is not a multiple of the int4 group size {group}")
        g = w.reshape(N, K // group, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-8) / 15.0
        q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(N, K)
        zero = lo + 8 * scale  # torch's kernel dequantizes as (q - 8) * scale + zero
        sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/group, N, 2]
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8))
        self.register_buffer("scales_zeros", sz.to(torch.bfloat16))
        self.group = group

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.qweight, self.group,
                                                          self.scales_zeros)


# Activations enter fbgemm as uint8 with a fixed scale: each row is first divided by its own absmax, so
# the static range [-1, 1] makes the quantization per token (and a row's result independent of the batch).
_ACT_LEVELS = 255
_ACT_SCALE, _ACT_ZERO = 2.0 / _ACT_LEVELS, (_ACT_LEVELS + 1) // 2


def fbgemm_int8_is_exact() -> bool:
    """Whether fbgemm's int8 GEMM adds its u8 x s8 products exactly here: only with AVX-512 VNNI (`vpdpbusd`).
    Without it fbgemm adds pairs of products in saturating int16 (`vpmaddubsw`): 8-bit activations saturate,
    and the 7-bit activations that avoid it lose too much (SmolLM2 mean KL 0.37 against 0.11)."""
    from ember.kernels import current_variant

    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    return current_variant() in ("amx", "avx512") and forced in ("", "AVX512_E1", "AVX512_E1_256")


class W8A8Linear(_QuantLinear):
    """8-bit weights x int8 activations. With AVX-512 VNNI: fbgemm's packed GEMM, int8 weights per output
    channel and activations per token. Elsewhere fbgemm would saturate, so ember's group kernel (8-bit codes
    per group of 32 inputs, activations per group: exact integer products on AVX2, and finer scales)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        if not fbgemm_int8_is_exact():
            self.grouped = GroupQuantLinear(linear, 8)
            return
        self.grouped = None
        q, scales = _int8_per_channel(linear.weight.detach().float())
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's GEMM still needs one
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)  # fbgemm's layout; the int8 copy is freed
        self.packed_bytes = q.numel() + 8 * scales.numel()  # (memory_plan.weight_bytes counts it)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.grouped is not None:
            return self.grouped._mm(x2)
        x2 = x2.float()
        row_max = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x2 / row_max, _ACT_SCALE, _ACT_ZERO, self.packed) * row_max


GROUP = 32  # inputs per quantization group in the group GEMM (vnni_gemm.cpp)
_TILE = 16  # output rows per tile there


FIT_ROUNDS = 4


def _assign(g: torch.Tensor, dw: torch.Tensor, mw: torch.Tensor, levels: int) -> torch.Tensor:
    d, m = dw.float()[..., None], mw.float()[..., None]
    return torch.where(d > 0, torch.round((g - m) / torch.where(d > 0, d, 1.0)), 0.0).clamp(0, levels)


def _fit_groups(g: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (last dim), codes q and fp16 (d, m) with g ~= d * q + m: the C++ fit (ember/kernels/group_fit.cpp,
    the process's default kernel build, so every variant's layers get the same codes), ~10x faster than
    `_fit_groups_torch`, the same algorithm."""
    from ember.kernels import load_default
    return getattr(torch.ops, load_default()).fit_groups(g, levels, FIT_ROUNDS)


def _fit_groups_torch(g: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fit in torch ops (the reference the C++ fit is tested against). Starts from the min/max grid,
    then alternates least-squares (d, m) for the codes and codes for (d, m), keeping a group's fit only
    when its squared error drops (like llama.cpp's make_qkx2_quants, without the weighting)."""
    lo, hi = g.amin(-1), g.amax(-1)
    dw, mw = ((hi - lo) / levels).half(), lo.half()
    q = _assign(g, dw, mw, levels)
    err = (dw.float()[..., None] * q + mw.float()[..., None] - g).pow(2).sum(-1)
    n = g.shape[-1]
    for _ in range(FIT_ROUNDS):
        sq, sw = q.sum(-1), g.sum(-1)
        sqq, sqw = (q * q).sum(-1), (q * g).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        d_new = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, det, 1.0), dw.float())
        m_new = torch.where(ok, (sw - d_new * sq) / n, mw.float())
        d16, m16 = d_new.clamp(min=0).half(), m_new.half()
        q_new = _assign(g, d16, m16, levels)
        err_new = (d16.float()[..., None] * q_new + m16.float()[..., None] - g).pow(2).sum(-1)
        better = err_new < err
        dw, mw = torch.where(better, d16, dw), torch.where(better, m16, mw)
        q = torch.where(better[..., None], q_new, q)
        err = torch.minimum(err, err_new)
    return q.to(torch.uint8), dw, mw


def _pack_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group quantization of w [N, K] (w ~= dw * q + mw, q in 0..2^bits-1, fp16 dw/mw) into
    the tile layout of ember/kernels/vnni_gemm.cpp. Rows go in chunks to bound the float temporaries."""
    N, K = w.shape
    if K % GROUP:
        raise ValueError(f"in_features {K} is not a multiple of the group size {GROUP}")
    levels, ng = (1 << bits) - 1, K // GROUP
    step = 64 * _TILE  # (1024 rows: float temporaries of a few MB however large the matrix)
    return _layout((_fit_groups(w[r0:r0 + step].float().reshape(-1, ng, GROUP), levels) for r0 in range(0, N, step)),
                   bits)


def _unlayout(qweight, dws, mws, bits: int, rows: int):
    """The inverse of _layout: codes q [N, ng, 32] (uint8) and dw, mw [N, ng] of the first `rows` rows."""
    p = qweight.long()
    tiles, ng = p.shape[:2]
    if bits == 4:
        p = p.view(tiles, ng, 4, _TILE, 4)  # (chunk c, row j, byte b): q[j, 4c+b] | q[j, 16+4c+b] << 4
        lo, hi = (p & 15).permute(0, 3, 1, 2, 4), (p >> 4).permute(0, 3, 1, 2, 4)  # [tiles, j, ng, c, b]
        q = torch.cat([lo.reshape(tiles, _TILE, ng, 16), hi.reshape(tiles, _TILE, ng, 16)], dim=-1)
    else:
        q = p.view(tiles, ng, 8, _TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles, _TILE, ng, GROUP)
    q = q.reshape(tiles * _TILE, ng, GROUP)[:rows].to(torch.uint8)
    dw, mw = (t.transpose(1, 2).reshape(tiles * _TILE, ng)[:rows] for t in (dws, mws))
    return q, dw, mw


def _layout(chunks, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q [n, ng, 32] and fp16 dw, mw [n, ng] per chunk of rows, into the kernel's tiles of 16 rows."""
    packed, dws, mws = [], [], []
    for q, dw, mw in chunks:
        ng = q.shape[1]
        pad = (-q.shape[0]) % _TILE
        if pad:
            q, dw, mw = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (q, dw, mw))
        tiles = q.shape[0] // _TILE
        q = q.reshape(tiles, _TILE, ng, GROUP).transpose(1, 2)  # [tiles, groups, 16 rows, 32 inputs]
        if bits == 4:  # byte (c, j, b) = q[j, 4c+b] | q[j, 16+4c+b] << 4
            lo4, hi4 = (h.reshape(tiles, ng, _TILE, 4, 4).transpose(2, 3) for h in (q[..., :16], q[..., 16:]))
            packed.append((lo4 | (hi4 << 4)).reshape(tiles, ng, 256))
        else:  # byte (t, j, b) = q[j, 4t+b]
            packed.append(q.reshape(tiles, ng, _TILE, 8, 4).transpose(2, 3).reshape(tiles, ng, 512))
        dws.append(dw.reshape(tiles, _TILE, ng).transpose(1, 2))
        mws.append(mw.reshape(tiles, _TILE, ng).transpose(1, 2))
    return torch.cat(packed).contiguous(), torch.cat(dws).contiguous(), torch.cat(mws).contiguous()


class GroupQuantLinear(_QuantLinear):
    """4- or 8-bit group-wise weights x int8 group-wise activations on ember's group kernel (`w4a8`), in the
    kernel variant the CPU runs (ember.kernels: AVX-512 VNNI, AVX2, or the portable loop).

    Batch-1 decode reads 4.5-5 bits per weight here (llama.cpp's Q4_1 x Q8_0 scheme), and each activation
    row is computed the same way whatever the batch, so results are batch-invariant."""

    def __init__(self, linear: nn.Linear, bits: int = 4):
        super().__init__(linear)
        from ember.kernels import load_group_gemm

        self.kernel_ns = load_group_gemm()  # the torch namespace of the kernel variant in use (ember.kernels)
        qweight, dw, mw = _pack_groups(linear.weight.detach(), bits)
        self.register_buffer("qweight", qweight)
        self.register_buffer("dw", dw)
        self.register_buffer("mw", mw)
        self.bits = bits

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        return getattr(torch.ops, self.kernel_ns).group_gemm(x2, self.qweight, self.dw, self.mw, self.bits,
                                                             self.out_features)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights as codes q [N, K // 32, 32] (uint8) and their fp16 scales and offsets dw, mw [N, K // 32]."""
        return _unlayout(self.qweight, self.dw, self.mw, self.bits, self.out_features)

    def select_rows(self, ids: torch.Tensor) -> "GroupQuantLinear":
        """The layer restricted to output rows `ids` (the same codes, re-tiled): y[:, j] of it is y[:, ids[j]]."""
        q, dw, mw = self.codes()
        ids = ids.to(torch.long)
        out = object.__new__(type(self))
        nn.Module.__init__(out)
        out.bias = None if self.bias is None else nn.Parameter(self.bias.detach()[ids], requires_grad=False)
        out.out_features, out.kernel_ns, out.bits = len(ids), self.kernel_ns, self.bits
        qweight, dws, mws = _layout([(q[ids], dw[ids], mw[ids])], self.bits)
        out.register_buffer("qweight", qweight)
        out.register_buffer("dw", dws)
        out.register_buffer("mw", mws)
        return out


# With int4, two kinds of layer keep 8 bits (as llama.cpp's Q4_K_M keeps some tensors at 6-8 bits):
# qkv_proj (small, and the output is sensitive to it) and down_proj (large K: torch's int8 kernel is faster
# there than its int4 one). The lm_head stays int4: at 136M weights it is the largest read per token
# (int8 27 ms vs int4 12 ms here). Qwen2.5-Coder-0.5B, mean KL to fp32 per token: 0.100 all-int4,
# 0.055 with this choice, 0.032 with lm_head int8 as well.
INT4_KEEP_INT8 = ("qkv_proj", "down_proj")
# w4a8 keeps qkv_proj at 8 bits (4% of the weights). Qwen2.5-Coder-0.5B, mean KL to fp32 per token:
# 0.083 all 4-bit, 0.049 with qkv 8-bit, 0.045 with down_proj too, 0.023 with qkv and lm_head 8-bit
# (lm_head at 8 bits adds 68 MB read per token, ~2.5 ms).
W4A8_KEEP_8BIT: tuple[str, ...] = ("qkv_proj",)


class GroupQuantEmbedding(nn.Module):
    """The input embedding table as 8-bit codes per group of 32 (fp16 scale and offset: 8.5 bits per weight, an
    error of at most 1/510 of a group's range), rows dequantized as they are looked up. The float32 table of a
    quantized model would otherwise be its largest tensor (Qwen2.5-0.5B: 544 MB, a third of its float32 size)."""

    quantized = True

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        w = embedding.weight.detach()
        rows, dim = w.shape
        if dim % GROUP:
            raise ValueError(f"embedding width {dim} is not a multiple of the group size {GROUP}")
        codes = torch.empty(rows, dim, dtype=torch.uint8)
        dw = torch.empty(rows, dim // GROUP, dtype=torch.float16)
        mw = torch.empty_like(dw)
        for r0 in range(0, rows, 1024):  # min/max grid per group, in chunks to bound the float temporaries
            g = w[r0:r0 + 1024].float().reshape(-1, dim // GROUP, GROUP)
            lo, hi = g.amin(-1), g.amax(-1)
            d, m = ((hi - lo) / 255).half(), lo.half()
            codes[r0:r0 + 1024] = _assign(g, d, m, 255).to(torch.uint8).reshape(-1, dim)
            dw[r0:r0 + 1024], mw[r0:r0 + 1024] = d, m
        self.register_buffer("codes", codes)
        self.register_buffer("dw", dw)
        self.register_buffer("mw", mw)
        self.embedding_dim, self.dtype = dim, w.dtype
        self.full_vocab = getattr(embedding, "full_vocab", rows)  # (vision models mask ids past it)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.codes[ids].float().unflatten(-1, (-1, GROUP))
        rows = q * self.dw[ids].float().unsqueeze(-1) + self.mw[ids].float().unsqueeze(-1)
        return rows.flatten(-2).to(self.dtype)
