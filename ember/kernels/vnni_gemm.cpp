// Group-quantized GEMM for CPU decode: u4 or u8 weights x s8 activations, on AVX-512 VNNI or AVX2.
//
// Why: batch-1 decode reads every weight once per token, so it is bound by memory bandwidth; torch's own
// int4/int8 CPU kernels read more bytes per weight than llama.cpp's blocks and convert to bf16 on the way.
// This kernel follows llama.cpp's Q4_1 x Q8_0 idea (groups of 32 along K, integer dot products) with a
// layout made for VNNI: 16 output rows sit in the 16 int32 lanes of one register, so `vpdpbusd` adds four
// k-products per lane and no horizontal sum is ever needed. On AVX2 (no VNNI) the same layout is read as two
// halves of 8 rows, and the products go through `vpmaddubsw` (u8 x s8 pairs into saturating int16), which is
// exact here: a pair of 4-bit codes times |a| <= 127 is at most 3,810, and eight such pairs (a whole group)
// still fit int16; 8-bit codes are split into two 4-bit nibbles first. Every path adds the same integers and
// applies the same float epilogue in the same order, so all agree bit for bit with the portable loop.
//
// Math, per output row n and activation row m, over groups g of 32 inputs:
//   weight  w[n,k] ~= dw[n,g] * q[n,k] + mw[n,g]        (q unsigned: 0..15 or 0..255)
//   input   x[m,k] ~= xd[m,g] * a[m,k]                  (a signed int8 in -127..127, per-group absmax scale)
//   y[m,n]  = sum_g dw*xd * sum_k q*a  +  mw * (xd * sum_k a)
// Each activation row is computed with the same instructions whatever the batch size, so a request's
// result does not depend on what it is batched with.
//
// Layout (made by ember/layers/quantization.py, `_pack_groups`), per tile of 16 rows and group of 32:
//   4-bit: 256 bytes = 4 chunks x 16 rows x 4 bytes; byte (c, j, b) = q[j, 4c+b] | q[j, 16+4c+b] << 4
//   8-bit: 512 bytes = 8 chunks x 16 rows x 4 bytes; byte (t, j, b) = q[j, 4t+b]
//   dw, mw: fp16 [tiles][groups][16]
#include "group_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define EMBER_VNNI 1
#define EMBER_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define EMBER_VNNI 0
#define EMBER_AVX2 1
#else
#define EMBER_VNNI 0
#define EMBER_AVX2 0
#endif

// AMX (Intel Xeon since Sapphire Rapids): the int32 sums of several activation rows in one tile instruction
#if EMBER_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#define EMBER_AMX 1
#else
#define EMBER_AMX 0
#endif

// AVX-VNNI (Intel since Alder Lake / Sierra Forest): `vpdpbusd` on 256 bits, the AVX2 tile without the int16 step
#if EMBER_AVX2 && defined(__AVXVNNI__)
#define EMBER_AVXVNNI 1
#else
#define EMBER_AVXVNNI 0
#endif

namespace EMBER_NS {
namespace {

constexpr int64_t G = kGroup;  // inputs per group
constexpr int64_t T = 16;      // output rows per tile
// activation rows per pass over a weight tile (a tile's codes are unpacked once per group for all of them). With
// AVX-512 a pass of 8 (8 accumulators + 8 code registers of 32) read a 1.5B model's weights from memory at 5 rows
// in 48 ms against 54 in passes of 4 + 1, at 8 rows 53 against 63, at 12-64 rows ~10% faster; 1-4 rows the same.
// AVX2 holds half a tile's codes in registers and reuses them for 8 rows as well.
constexpr int64_t MB = 8;
// Weights are prefetched twice: into L2 16 KB ahead of the group being read (the hardware prefetchers stop at 4 KB
// pages; 1 KB ahead reached ~8 GB/s per socket on a 2-core Xeon VM, 16 KB ~14 GB/s, 32-64 KB no better), and into L1
// 2 KB ahead. Everything into L1 16 KB ahead held L1 fill buffers for the whole trip from memory; the two levels took
// a Qwen2.5-1.5B w4a8 step from ~47.6 to ~44.0 ms at 1 row and ~59 to ~51.4 ms at 4 rows (a speculative verify),
// where the multiply-adds had stopped the weight stream instead of overlapping it.
constexpr int64_t kPrefetchFar = 16384, kPrefetchNear = 2048;

#if EMBER_VNNI || EMBER_AVX2
inline void prefetch_group(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchNear + off), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchFar + off), _MM_HINT_T2);
  }
}
#endif

// Per group of 32: symmetric int8 with scale absmax/127; xs keeps xd * sum(a) for the weights' offset.
void quantize_group_scalar(const float* v, int8_t* q, float* xd, float* xs) {
  float amax = 0.f;
  for (int64_t k = 0; k < G; ++k) amax = std::fmax(amax, std::fabs(v[k]));
  const float d = amax / 127.f;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < G; ++k) {
    const int32_t a = static_cast<int32_t>(std::nearbyint(v[k] * inv));
    q[k] = static_cast<int8_t>(a);
    sum += a;
  }
  *xd = d;
  *xs = d * static_cast<float>(sum);
}

// The same floats (|x| max, one multiply, round to nearest even) with AVX2: the scalar loop took ~1 ns per input,
// 18% of a 256-row down_proj GEMM on AVX2.
void quantize_group(const float* v, int8_t* q, float* xd, float* xs) {
#if EMBER_VNNI || EMBER_AVX2
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 x[4];
  for (int i = 0; i < 4; ++i) x[i] = _mm256_loadu_ps(v + 8 * i);
  __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(x[0], absmask), _mm256_and_ps(x[1], absmask)),
                            _mm256_max_ps(_mm256_and_ps(x[2], absmask), _mm256_and_ps(x[3], absmask)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.f;
  const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i a[4];
  for (int i = 0; i < 4; ++i)
    a[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  __m256i sum = _mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), _mm256_add_epi32(a[2], a[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  // int32 -> int8 (|a| <= 127: no saturation); packs work within 128-bit lanes, the permute restores the order
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(a[0], a[1]), _mm256_packs_epi32(a[2], a[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *xd = d;
  *xs = d * static_cast<float>(_mm_cvtsi128_si32(s4));
#else
  quantize_group_scalar(v, q, xd, xs);
#endif
}

void quantize_activations(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xs, bool scalar) {
  const int64_t ng = K / G;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t o = m * K + g * G, i = m * ng + g;
        (scalar ? quantize_group_scalar : quantize_group)(x + o, xq + o, xd + i, xs + i);
      }
  });
}

#if EMBER_VNNI
// A group's 4-bit codes of one tile as 8 registers of 16 rows x 4 inputs (inputs 4t..4t+3 in wv[t]); the AMX tile
// stores the same registers as its B operand.
inline void unpack_codes4(const uint8_t* p, __m512i* wv) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m512i raw = _mm512_loadu_si512(p + 64 * c);
    wv[c] = _mm512_and_si512(raw, low4);
    wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
  }
}

// acc + s * (d * xd) + mn * xs: one row's float epilogue for a group's int32 sums s of 16 outputs, in the order of
// every path (the AMX tile's and the portable loop's too)
inline __m512 group_epilogue16(__m512 acc, __m512i s, __m512 d, __m512 mn, float xd, float xs) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(xd)), acc);
  return _mm512_fmadd_ps(mn, _mm512_set1_ps(xs), acc);
}

// One tile of 16 output rows against NM (1..8) activation rows.
template <int BITS, int NM>
void tile_vnni(const uint8_t* w, const at::Half* dw, const at::Half* mw, int64_t ng, const int8_t* xq,
               const float* xd, const float* xs, int64_t K, float* y, int64_t ldy, int64_t rows) {
  __m512 acc[NM];
  for (int m = 0; m < NM; ++m) acc[m] = _mm512_setzero_ps();
  constexpr int64_t bytes = BITS == 4 ? 256 : 512;
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* p = w + g * bytes;
    prefetch_group(p, bytes);
    __m512i wv[8];
    if constexpr (BITS == 4) {
      unpack_codes4(p, wv);
    } else {
      for (int t = 0; t < 8; ++t) wv[t] = _mm512_loadu_si512(p + 64 * t);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dw + g * T)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mw + g * T)));
    if constexpr (NM == 2) {
      // the two rows' products interleaved (two chains a row): this streamed a 1.5B model's weights from memory
      // as fast as one row (41.6 against 40.3 ms on 2 cores; 45.9 with the rows one after the other, below)
      __m512i s[2][2];
      for (int m = 0; m < 2; ++m) s[m][0] = s[m][1] = _mm512_setzero_si512();
      for (int t = 0; t < 8; ++t)
        for (int m = 0; m < 2; ++m) {
          int32_t a4;
          std::memcpy(&a4, xq + m * K + g * G + 4 * t, 4);
          s[m][t & 1] = _mm512_dpbusd_epi32(s[m][t & 1], wv[t], _mm512_set1_epi32(a4));
        }
      for (int m = 0; m < 2; ++m)
        acc[m] = group_epilogue16(acc[m], _mm512_add_epi32(s[m][0], s[m][1]), d, mn, xd[m * ng + g], xs[m * ng + g]);
    } else {  // (interleaving 3+ rows, or pairs of them, was slower: 3-8 rows run one after the other)
      for (int m = 0; m < NM; ++m) {
        const int8_t* a = xq + m * K + g * G;
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();  // two chains: dpbusd latency
        for (int t = 0; t < 8; t += 2) {
          int32_t a0, a1;
          std::memcpy(&a0, a + 4 * t, 4);
          std::memcpy(&a1, a + 4 * t + 4, 4);
          s0 = _mm512_dpbusd_epi32(s0, wv[t], _mm512_set1_epi32(a0));
          s1 = _mm512_dpbusd_epi32(s1, wv[t + 1], _mm512_set1_epi32(a1));
        }
        acc[m] = group_epilogue16(acc[m], _mm512_add_epi32(s0, s1), d, mn, xd[m * ng + g], xs[m * ng + g]);
      }
    }
  }
  const __mmask16 keep = rows >= T ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  for (int m = 0; m < NM; ++m) _mm512_mask_storeu_ps(y + m * ldy, keep, acc[m]);
}
#endif

#if EMBER_AMX
#include "amx_tile.h"  // (inside this namespace: it uses T, G and prefetch_group)
#endif

#if EMBER_AVX2
// Shared by the AVX2 half tiles below (rows 8h..8h+7 of a tile of 16).

// acc[m] += s[m] * (dw * xd) + mw * xs for group g: the float epilogue of every path, in the same order
template <int NM>
inline void group_epilogue(__m256* acc, const __m256i* s, const at::Half* dw, const at::Half* mw, const float* xd,
                           const float* xs, int64_t ng, int64_t g, int h) {
  const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dw + g * T + 8 * h)));
  const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mw + g * T + 8 * h)));
  for (int m = 0; m < NM; ++m) {
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m]), _mm256_mul_ps(d, _mm256_set1_ps(xd[m * ng + g])), acc[m]);
    acc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[m * ng + g]), acc[m]);
  }
}

template <int NM>
inline void store_half(const __m256* acc, float* y, int64_t ldy, int64_t rows, int h) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(rows - 8 * h, 8))), lanes);
  for (int m = 0; m < NM; ++m) _mm256_maskstore_ps(y + m * ldy + 8 * h, keep, acc[m]);
}

// The half tiles' loops: for each 8-row half (h) and group (g), sums(p, h, g, s) fills the NM rows' int32 sums
// from the group's codes p, then the shared float epilogue; each half is stored when its groups are done.
template <int NM, class Sums>
inline void half_tiles(const uint8_t* w, int64_t bytes, const at::Half* dw, const at::Half* mw, int64_t ng,
                       const float* xd, const float* xs, float* y, int64_t ldy, int64_t rows, Sums sums) {
  for (int h = 0; h < 2 && 8 * h < rows; ++h) {
    __m256 acc[NM];
    for (int m = 0; m < NM; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* p = w + g * bytes;
      if (h == 0) prefetch_group(p, bytes);
      __m256i s[NM];
      sums(p, h, g, s);
      group_epilogue<NM>(acc, s, dw, mw, xd, xs, ng, g, h);
    }
    store_half<NM>(acc, y, ldy, rows, h);
  }
}
#endif

#if EMBER_AVX2 && !EMBER_AVXVNNI
// 8-bit codes on AVX2 without VNNI: one 8-row half of the tile against NM (1..4) activation rows. Each code is
// split into its two nibbles (a byte times |a| <= 127 would saturate vpmaddubsw's int16 pairs), loaded and split
// right before its products so that both nibbles' chains of every row stay in registers.
template <int NM>
void tile_avx2_8bit(const uint8_t* w, const at::Half* dw, const at::Half* mw, int64_t ng, const int8_t* xq,
                    const float* xd, const float* xs, int64_t K, float* y, int64_t ldy, int64_t rows) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  half_tiles<NM>(w, 512, dw, mw, ng, xd, xs, y, ldy, rows, [&](const uint8_t* p, int h, int64_t g, __m256i* s) {
    __m256i lo16[NM], hi16[NM];
    for (int m = 0; m < NM; ++m) lo16[m] = hi16[m] = _mm256_setzero_si256();
    for (int t = 0; t < 8; ++t) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * t + 32 * h));
      const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      for (int m = 0; m < NM; ++m) {
        int32_t a4;
        std::memcpy(&a4, xq + m * K + g * G + 4 * t, 4);
        const __m256i av = _mm256_set1_epi32(a4);
        lo16[m] = _mm256_add_epi16(lo16[m], _mm256_maddubs_epi16(lo, av));
        hi16[m] = _mm256_add_epi16(hi16[m], _mm256_maddubs_epi16(hi, av));
      }
    }
    for (int m = 0; m < NM; ++m)
      s[m] = _mm256_add_epi32(_mm256_madd_epi16(lo16[m], ones), _mm256_madd_epi16(hi16[m], sixteen));
  });
}
#endif

#if EMBER_AVX2
// 4-bit codes on AVX2 (and 4- or 8-bit on AVX-VNNI): one 8-row half of the tile at a time; each group's codes are
// unpacked once into 8 registers and all NM (1..8) activation rows pass over them, their chains interleaved. Per
// 256 multiply-adds that is 8 vpmaddubsw + 8 vpaddw + the epilogue. Unpacking both halves per group (16 registers,
// spilled) for at most 4 rows ran at 74 GMAC/s per core on a Xeon against 92 for this (4-bit gate/up, M=240).
// Same integers and the same float epilogue in the same order as every other path.
// (Out of line: inlined into the dispatching loop it ran ~10% slower with GCC 12.)
template <int BITS, int NM>
__attribute__((noinline)) void tile_avx2_rows(const uint8_t* w, const at::Half* dw, const at::Half* mw, int64_t ng,
                                              const int8_t* xq, const float* xd, const float* xs, int64_t K, float* y,
                                              int64_t ldy, int64_t rows) {
  static_assert(BITS == 4 || EMBER_AVXVNNI, "8-bit codes without VNNI use tile_avx2_8bit");
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  constexpr int64_t bytes = BITS == 4 ? 256 : 512;
  half_tiles<NM>(w, bytes, dw, mw, ng, xd, xs, y, ldy, rows, [&](const uint8_t* p, int h, int64_t g, __m256i* s) {
    __m256i c8[8];  // codes of rows 8h..8h+7 for inputs 4t..4t+3
    for (int c = 0; c < bytes / 64; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * c + 32 * h));
      if constexpr (BITS == 4) {
        c8[c] = _mm256_and_si256(raw, low4);
        c8[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      } else {
        c8[c] = raw;
      }
    }
    for (int m = 0; m < NM; ++m) s[m] = _mm256_setzero_si256();
    for (int t = 0; t < 8; ++t)
      for (int m = 0; m < NM; ++m) {
        int32_t a4;
        std::memcpy(&a4, xq + m * K + g * G + 4 * t, 4);
        const __m256i av = _mm256_set1_epi32(a4);
#if EMBER_AVXVNNI
        s[m] = _mm256_dpbusd_avx_epi32(s[m], c8[t], av);
#else
        s[m] = _mm256_add_epi16(s[m], _mm256_maddubs_epi16(c8[t], av));
#endif
      }
    if constexpr (!EMBER_AVXVNNI)
      for (int m = 0; m < NM; ++m) s[m] = _mm256_madd_epi16(s[m], ones);  // int16 pairs -> int32 per row
  });
}

template <int BITS>
void run_tile_avx2(const uint8_t* w, const at::Half* dw, const at::Half* mw, int64_t ng, const int8_t* xq,
                   const float* xd, const float* xs, int64_t K, float* y, int64_t ldy, int64_t rows, int nm) {
#if !EMBER_AVXVNNI
  if constexpr (BITS == 8) {
    for (int m0 = 0; m0 < nm; m0 += 4) {  // (its nibble chains fill the registers at 4 rows)
      const int8_t* a = xq + m0 * K;
      const float *d = xd + m0 * ng, *s = xs + m0 * ng;
      float* out = y + m0 * ldy;
      with_rows<4>(nm - m0, [&](auto nm4) { tile_avx2_8bit<nm4.value>(w, dw, mw, ng, a, d, s, K, out, ldy, rows); });
    }
  } else
#endif
  {
    with_rows<MB>(nm, [&](auto n) { tile_avx2_rows<BITS, n.value>(w, dw, mw, ng, xq, xd, xs, K, y, ldy, rows); });
  }
}
#endif

// The portable loop with the same math: the reference the SIMD paths are tested against, and the kernel of a
// build without AVX2 (slow).
template <int BITS>
void tile_scalar(const uint8_t* w, const at::Half* dw, const at::Half* mw, int64_t ng, const int8_t* xq,
                 const float* xd, const float* xs, int64_t K, float* y, int64_t ldy, int64_t rows, int nm) {
  constexpr int64_t bytes = BITS == 4 ? 256 : 512;
  for (int m = 0; m < nm; ++m) {
    float acc[T] = {0.f};
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* p = w + g * bytes;
      const int8_t* a = xq + m * K + g * G;
      for (int64_t j = 0; j < T; ++j) {
        int32_t s = 0;
        for (int64_t k = 0; k < G; ++k) {
          int32_t q;
          if constexpr (BITS == 4) {
            const int64_t c = (k % 16) / 4, b = k % 4;
            const uint8_t byte = p[(c * T + j) * 4 + b];
            q = k < 16 ? (byte & 0x0F) : (byte >> 4);
          } else {
            q = p[((k / 4) * T + j) * 4 + k % 4];
          }
          s += q * a[k];
        }
        const float d = static_cast<float>(dw[g * T + j]), mn = static_cast<float>(mw[g * T + j]);
        acc[j] = std::fma(static_cast<float>(s), d * xd[m * ng + g], acc[j]);
        acc[j] = std::fma(mn, xs[m * ng + g], acc[j]);
      }
    }
    for (int64_t j = 0; j < rows; ++j) y[m * ldy + j] = acc[j];
  }
}

template <int BITS>
void run_tile(const uint8_t* w, const at::Half* dw, const at::Half* mw, int64_t ng, const int8_t* xq,
              const float* xd, const float* xs, int64_t K, float* y, int64_t ldy, int64_t rows, int nm,
              bool reference) {
  if (reference) return tile_scalar<BITS>(w, dw, mw, ng, xq, xd, xs, K, y, ldy, rows, nm);
#if EMBER_VNNI
  with_rows<MB>(nm, [&](auto n) { tile_vnni<BITS, n.value>(w, dw, mw, ng, xq, xd, xs, K, y, ldy, rows); });
#elif EMBER_AVX2
  run_tile_avx2<BITS>(w, dw, mw, ng, xq, xd, xs, K, y, ldy, rows, nm);
#else
  tile_scalar<BITS>(w, dw, mw, ng, xq, xd, xs, K, y, ldy, rows, nm);
#endif
}

}  // namespace

GroupWeight group_weight(const at::Tensor& qweight, const at::Tensor& dw, const at::Tensor& mw, int64_t n) {
  TORCH_CHECK(qweight.dim() == 3 && (qweight.size(2) == 256 || qweight.size(2) == 512), "not a group-quantized weight");
  TORCH_CHECK(qweight.size(0) * T >= n && qweight.is_contiguous() && dw.is_contiguous() && mw.is_contiguous());
  return {qweight.data_ptr<uint8_t>(), dw.data_ptr<at::Half>(), mw.data_ptr<at::Half>(),
          qweight.size(2) == 256 ? 4 : 8, n, qweight.size(1) * G, qweight.size(0)};
}

void group_gemm_rows(const float* x, int64_t M, const GroupWeight& w, float* y, int8_t* xq, float* xd, float* xs,
                     bool reference) {
  const int64_t K = w.k, ng = K / G, n = w.n;
  quantize_activations(x, M, K, xq, xd, xs, reference);
  const int64_t tile_bytes = ng * (w.bits == 4 ? 256 : 512);
  // Threads claim chunks of tiles from a shared counter rather than a fixed half each: when another process
  // takes one of the cores for a moment (the API server, on a 2-core machine), the other thread does more.
  // A tile's weights stay in cache while every activation row passes over them.
  const int64_t nthreads = at::get_num_threads();
  const int64_t chunk = std::clamp<int64_t>(w.tiles / (8 * nthreads), 1, 16);
  const int64_t nchunks = (w.tiles + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
#if EMBER_AMX
  if (!reference && M >= kAmxMinRows && amx_enabled()) {
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      const int64_t tile_rows = std::min<int64_t>(M, 16);
      amx_configure(static_cast<int>(tile_rows));
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < nchunks;)
        for (int64_t t = c * chunk; t < std::min(w.tiles, (c + 1) * chunk); ++t)
          for (int64_t m0 = 0, nm; m0 < M; m0 += nm) {
            // passes of kAmxBlock rows, none of fewer than 16 (the tiles are configured for min(M, 16) rows)
            nm = std::min(kAmxBlock, M - m0);
            if (M - m0 - nm > 0 && M - m0 - nm < 16) nm -= 16;
            const int64_t rows = std::min<int64_t>(T, n - t * T);
            const uint8_t* wt = w.q + t * tile_bytes;
            const at::Half *d = w.dw + t * ng * T, *mn = w.mw + t * ng * T;
            (w.bits == 4 ? tile_amx<4> : tile_amx<8>)(wt, d, mn, ng, xq + m0 * K, xd + m0 * ng, xs + m0 * ng, K,
                                                     y + m0 * n + t * T, n, rows, nm, tile_rows);
          }
      _tile_release();
    });
    return;
  }
#endif
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < nchunks;) {
      for (int64_t t = c * chunk; t < std::min(w.tiles, (c + 1) * chunk); ++t) {
        const int64_t rows = std::min<int64_t>(T, n - t * T);
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
          const int nm = static_cast<int>(std::min<int64_t>(MB, M - m0));
          const uint8_t* wt = w.q + t * tile_bytes;
          const at::Half* d = w.dw + t * ng * T;
          const at::Half* mn = w.mw + t * ng * T;
          const int8_t* a = xq + m0 * K;
          float* out = y + m0 * n + t * T;
          if (w.bits == 4)
            run_tile<4>(wt, d, mn, ng, a, xd + m0 * ng, xs + m0 * ng, K, out, n, rows, nm, reference);
          else
            run_tile<8>(wt, d, mn, ng, a, xd + m0 * ng, xs + m0 * ng, K, out, n, rows, nm, reference);
        }
      }
    }
  });
}

namespace {

// x [M, K] float32; qweight uint8 [tiles, K/32, 256|512]; dw, mw fp16 [tiles, K/32, 16]; returns [M, n].
at::Tensor group_gemm_impl(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& dw,
                           const at::Tensor& mw, int64_t bits, int64_t n, bool reference) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const GroupWeight w = group_weight(qweight, dw, mw, n);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K == w.k && w.bits == bits, "weight layout does not match x");
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xd = at::empty({M, K / G}, x.options());
  at::Tensor xs = at::empty({M, K / G}, x.options());
  at::Tensor y = at::empty({M, n}, x.options());
  group_gemm_rows(x.data_ptr<float>(), M, w, y.data_ptr<float>(), xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
                  xs.data_ptr<float>(), reference);
  return y;
}

at::Tensor group_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& dw, const at::Tensor& mw,
                      int64_t bits, int64_t n) {
  return group_gemm_impl(x, qweight, dw, mw, bits, n, false);
}

at::Tensor group_gemm_reference(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& dw,
                                const at::Tensor& mw, int64_t bits, int64_t n) {
  return group_gemm_impl(x, qweight, dw, mw, bits, n, true);
}

bool has_vnni_kernel() { return EMBER_VNNI; }

// Whether this build's GEMM takes its AMX tile for 9+ rows (an amx build whose process was granted the tile state).
bool uses_amx() {
#if EMBER_AMX
  return amx_enabled();
#else
  return false;
#endif
}

// How many threads at::parallel_for runs a 2+-way split on here (1 when the build lacks OpenMP: then it is serial).
int64_t parallel_threads() {
  std::atomic<int64_t> calls{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { calls.fetch_add(1); });
  return calls.load();
}

std::string kernel_isa() { return EMBER_AMX ? "amx" : EMBER_VNNI ? "avx512" : EMBER_AVXVNNI ? "avxvnni" : EMBER_AVX2 ? "avx2" : "portable"; }

}  // namespace
}  // namespace EMBER_NS

TORCH_LIBRARY_FRAGMENT(EMBER_NS, m) {
  m.def("group_gemm(Tensor x, Tensor qweight, Tensor dw, Tensor mw, int bits, int n) -> Tensor");
  m.def("group_gemm_reference(Tensor x, Tensor qweight, Tensor dw, Tensor mw, int bits, int n) -> Tensor");
  m.def("has_vnni_kernel", &EMBER_NS::has_vnni_kernel);
  m.def("uses_amx", &EMBER_NS::uses_amx);
  m.def("parallel_threads", &EMBER_NS::parallel_threads);
  m.def("kernel_isa", &EMBER_NS::kernel_isa);
}

TORCH_LIBRARY_IMPL(EMBER_NS, CPU, m) {
  m.impl("group_gemm", EMBER_NS::group_gemm);
  m.impl("group_gemm_reference", EMBER_NS::group_gemm_reference);
}
