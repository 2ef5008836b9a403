// The AMX tile of vnni_gemm.cpp's group GEMM (its `amx` build), included inside that file's namespace.
#pragma once

// Batches, prefills: from 9 activation rows on (where the VNNI tile would make three passes of 4 rows over the
// weights) one AMX `tdpbsud` makes a group's int32 sums for up to 16 rows at once, from the unpacked codes (B: 8
// rows of 16 outputs x 4 inputs, the VNNI tile's own register layout) and the activations read in place (A: a
// row's 32 bytes). The float epilogue is tile_vnni's, in the same order, so both paths agree bit for bit. Measured
// on a 2-core Xeon VM (Qwen2.5-1.5B w4a8 fused step): 8 rows 65 ms either way, 12 rows 86 -> 76, 16 rows 109 -> 87;
// a 128-token prefill 677 -> 545 ms. At 2-4 rows (a speculative verify) AMX was slower than VNNI (4 rows 45 -> 55
// ms): the epilogue, the tile stores and their reload do not shrink with the rows, only the products do.
constexpr int64_t kAmxMinRows = 9;
constexpr int64_t kAmxBlock = 256;  // activation rows per pass over a weight tile (their float sums stay in L1)
constexpr int kAmxRound = 4;        // groups whose products are in flight together (tile results have latency)

// Linux gives a process the AMX register state only when asked (5.16+); without it the tile instructions fault.
bool amx_enabled() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: the int32 sums of a round's 4 groups (r x 16 outputs), tmm4-5: activations (r rows x one group's 32
// bytes), tmm6-7: a group's codes (8 x 64 bytes); r = min(M, 16). Per thread (the configuration is thread state).
void amx_configure(int r) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = r, c.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) c.rows[t] = r, c.colsb[t] = 32;
  for (int t = 6; t < 8; ++t) c.rows[t] = 8, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// The int32 sums of up to 4 groups (codes[j]: group j's codes in the B layout) for r activation rows at a
// (a + j * 32: group j's), into tmm0-3. (GCC's tile intrinsics paste their tile numbers into the instruction.)
inline void amx_round_sums(const int8_t* a, int64_t K, const uint8_t* const* codes, int nj) {
#define EMBER_AMX_SUMS(J, A, B)           \
  if (J < nj) {                           \
    _tile_zero(J);                        \
    _tile_loadd(A, a + J * G, K);         \
    _tile_loadd(B, codes[J], 64);         \
    _tile_dpbsud(J, A, B);                \
  }
  EMBER_AMX_SUMS(0, 4, 6)
  EMBER_AMX_SUMS(1, 5, 7)
  EMBER_AMX_SUMS(2, 4, 6)
  EMBER_AMX_SUMS(3, 5, 7)
#undef EMBER_AMX_SUMS
}

inline void amx_store_sums(int32_t (*sums)[T][T], int nj) {
  _tile_stored(0, sums[0], 64);
  if (nj > 1) _tile_stored(1, sums[1], 64);
  if (nj > 2) _tile_stored(2, sums[2], 64);
  if (nj > 3) _tile_stored(3, sums[3], 64);
}

// One tile of 16 output rows against M (<= kAmxBlock) activation rows. Steps: rounds of 4 groups, each over the
// rows in blocks of r = min(M, 16) (the last block ends at row M and skips the rows the block before it did).
// Software-pipelined: a step's tile products run while the float epilogue of the step before it does (a tile
// result is ready tens of cycles after its instruction, and only through memory).
template <int BITS>
void tile_amx(const uint8_t* w, const at::Half* dw, const at::Half* mw, int64_t ng, const int8_t* xq,
              const float* xd, const float* xs, int64_t K, float* y, int64_t ldy, int64_t rows, int64_t M,
              int64_t configured) {
  const int64_t r = std::min<int64_t>(M, 16);
  // (a pass of fewer rows than the tiles were configured for would read activations past its rows)
  TORCH_CHECK(r == configured, "AMX pass of ", M, " rows on tiles configured for ", configured);
  struct Step {
    int64_t g0, m0, from;  // groups g0.., rows m0..m0+r of which from.. are new
    int nj, buf;
  };
  alignas(64) float acc[kAmxBlock][T];
  alignas(64) int32_t sums[2][kAmxRound][T][T];
  alignas(64) uint8_t codes[2][kAmxRound][8][64];
  for (int64_t m = 0; m < M; ++m) _mm512_store_ps(acc[m], _mm512_setzero_ps());
  constexpr int64_t bytes = BITS == 4 ? 256 : 512;
  const auto epilogue = [&](const Step& e) {
    __m512 d[kAmxRound], mn[kAmxRound];
    for (int j = 0; j < e.nj; ++j) {
      d[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dw + (e.g0 + j) * T)));
      mn[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mw + (e.g0 + j) * T)));
    }
    for (int64_t m = e.from; m < e.m0 + r; ++m) {
      __m512 v = _mm512_load_ps(acc[m]);
      for (int j = 0; j < e.nj; ++j) {
        const int64_t g = e.g0 + j;
        v = group_epilogue16(v, _mm512_load_si512(sums[e.buf][j][m - e.m0]), d[j], mn[j], xd[m * ng + g], xs[m * ng + g]);
      }
      _mm512_store_ps(acc[m], v);
    }
  };
  Step prev{0, 0, 0, 0, -1};
  int round = 0;
  for (int64_t g0 = 0; g0 < ng; g0 += kAmxRound, ++round) {
    const int nj = static_cast<int>(std::min<int64_t>(kAmxRound, ng - g0));
    const uint8_t* src[kAmxRound];
    for (int j = 0; j < nj; ++j) {
      const uint8_t* p = w + (g0 + j) * bytes;
      prefetch_group(p, bytes);
      if constexpr (BITS == 4) {
        __m512i wv[8];
        unpack_codes4(p, wv);
        for (int t = 0; t < 8; ++t) _mm512_store_si512(codes[round & 1][j][t], wv[t]);
        src[j] = codes[round & 1][j][0];
      } else {
        src[j] = p;  // 8-bit codes: already the B layout
      }
    }
    for (int64_t done = 0; done < M;) {
      const Step cur{g0, std::min(done, M - r), done, nj, prev.buf < 0 ? 0 : 1 - prev.buf};
      if (prev.buf >= 0) amx_store_sums(sums[prev.buf], prev.nj);
      amx_round_sums(xq + cur.m0 * K + g0 * G, K, src, nj);
      if (prev.buf >= 0) epilogue(prev);
      prev = cur;
      done = cur.m0 + r;
    }
  }
  amx_store_sums(sums[prev.buf], prev.nj);
  epilogue(prev);
  const __mmask16 keep = rows >= T ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  for (int64_t m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + m * ldy, keep, _mm512_load_ps(acc[m]));
}
