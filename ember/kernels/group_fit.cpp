// The group fit of w4a8 / 8-bit group quantization (ember/layers/quantization.py `_fit_groups`), one group at a
// time: the torch version runs ~40 whole-tensor ops per round and was most of a quantized model's load time
// (Qwen2.5-Coder-1.5B: 85 s). Same algorithm, float32 like the torch version: start from the min/max grid, then
// alternate least-squares (d, m) for the codes and codes for (d, m), keeping a group's fit only when its squared
// error drops. Sums run in order and no multiply-add is fused (the pragma below), so every variant build (avx512,
// avx2, portable) gives the same codes; the torch version sums in another order and may differ in near-ties.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#ifndef EMBER_NS
#define EMBER_NS ember
#endif

namespace EMBER_NS {
namespace {

constexpr int kMaxGroup = 64;

inline float to_half(float x) { return static_cast<float>(static_cast<at::Half>(x)); }

inline void assign(const float* g, int n, float d, float m, int levels, float* q) {
  for (int k = 0; k < n; ++k) {
    float v = 0.f;
    if (d > 0.f) v = std::nearbyint((g[k] - m) / d);  // (round half to even, as torch.round)
    q[k] = std::min(std::max(v, 0.f), static_cast<float>(levels));
  }
}

inline float sq_error(const float* g, int n, float d, float m, const float* q) {
  float e = 0.f;
  for (int k = 0; k < n; ++k) {
    const float t = d * q[k] + m - g[k];
    e += t * t;
  }
  return e;
}

void fit_one(const float* g, int n, int levels, int64_t rounds, uint8_t* q_out, at::Half* d_out, at::Half* m_out) {
  float lo = g[0], hi = g[0];
  for (int k = 1; k < n; ++k) {
    lo = std::min(lo, g[k]);
    hi = std::max(hi, g[k]);
  }
  float d = to_half((hi - lo) / static_cast<float>(levels)), m = to_half(lo);
  float q[kMaxGroup], qn[kMaxGroup];
  assign(g, n, d, m, levels, q);
  float err = sq_error(g, n, d, m, q);
  const float fn = static_cast<float>(n);
  for (int64_t r = 0; r < rounds; ++r) {
    float sq = 0.f, sw = 0.f, sqq = 0.f, sqw = 0.f;
    for (int k = 0; k < n; ++k) {
      sq += q[k];
      sw += g[k];
      sqq += q[k] * q[k];
      sqw += q[k] * g[k];
    }
    const float det = fn * sqq - sq * sq;
    const bool ok = det > 0.f;
    const float dn = ok ? (fn * sqw - sq * sw) / det : d;
    const float mn = ok ? (sw - dn * sq) / fn : m;
    const float d16 = to_half(std::max(dn, 0.f)), m16 = to_half(mn);
    assign(g, n, d16, m16, levels, qn);
    const float e = sq_error(g, n, d16, m16, qn);
    if (e < err) {
      d = d16;
      m = m16;
      std::copy(qn, qn + n, q);
      err = e;
    }
  }
  for (int k = 0; k < n; ++k) q_out[k] = static_cast<uint8_t>(q[k]);
  *d_out = static_cast<at::Half>(d);
  *m_out = static_cast<at::Half>(m);
}

// g [..., n] float32 (n <= 64): codes [..., n] uint8 and fp16 d, m [...] with g ~= d * q + m.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fit_groups(const at::Tensor& g_in, int64_t levels, int64_t rounds) {
  TORCH_CHECK(g_in.dim() >= 1 && g_in.size(-1) >= 1 && g_in.size(-1) <= kMaxGroup, "groups of 1..64 values");
  TORCH_CHECK(levels >= 1 && levels <= 255, "levels must be in 1..255");
  const at::Tensor g = g_in.to(at::kFloat).contiguous();
  const int n = static_cast<int>(g.size(-1));
  const int64_t groups = g.numel() / n;
  at::Tensor q = at::empty(g.sizes(), g.options().dtype(at::kByte));
  auto shape = g.sizes().vec();
  shape.pop_back();
  at::Tensor dw = at::empty(shape, g.options().dtype(at::kHalf));
  at::Tensor mw = at::empty(shape, g.options().dtype(at::kHalf));
  const float* gp = g.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  at::Half* dp = dw.data_ptr<at::Half>();
  at::Half* mp = mw.data_ptr<at::Half>();
  at::parallel_for(0, groups, 256, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i)
      fit_one(gp + i * n, n, static_cast<int>(levels), rounds, qp + i * n, dp + i, mp + i);
  });
  return {q, dw, mw};
}

}  // namespace
}  // namespace EMBER_NS

TORCH_LIBRARY_FRAGMENT(EMBER_NS, m) {
  m.def("fit_groups(Tensor g, int levels, int rounds) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(EMBER_NS, CPU, m) { m.impl("fit_groups", EMBER_NS::fit_groups); }
