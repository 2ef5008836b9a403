// A whole MoE expert layer on the group-quantized GEMM in one call: route the (token, slot) pairs to their
// experts, and per chosen expert run w13, SwiGLU and w2 over its tokens, then add each weighted result into
// its token's row.
//
// Why: at batch 1 a top-8 layer is 16 small GEMMs; as separate torch calls their fixed costs (dispatch,
// allocation, activation quantization as tensor ops) were a third of the layer's time (issue 13: a MoE
// layer within 1.5x of a dense MLP of its active weights). Here they are C++ loops over scratch buffers.
//
// Batch invariance: each activation row goes through the GEMM the same way whatever the batch
// (vnni_gemm.cpp), and a token's row receives its experts' contributions in ascending expert order into
// zeros, so a token's result is the same alone or in any batch.
//
// Weights: the experts' group-quantized matrices stacked along a leading expert dimension, each in
// vnni_gemm.cpp's tile layout: q13 [E, tiles, H/32, 256|512] for w13 [2I, H] (gate rows then up rows) and
// q2 [E, tiles, I/32, ...] for w2 [H, I], with their fp16 dw/mw [E, tiles, groups, 16].
#include "group_gemm.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace EMBER_NS {
namespace {

// Expert e's matrix from a stack [E, tiles, groups, bytes] (+ dw/mw [E, tiles, groups, 16]) of n rows.
GroupWeight expert_weight(const at::Tensor& q, const at::Tensor& dw, const at::Tensor& mw, int64_t n, int64_t e) {
  const int64_t q_stride = q.stride(0), s_stride = dw.stride(0);
  return {q.data_ptr<uint8_t>() + e * q_stride, dw.data_ptr<at::Half>() + e * s_stride,
          mw.data_ptr<at::Half>() + e * s_stride, q.size(3) == 256 ? 4 : 8, n, q.size(2) * kGroup, q.size(1)};
}

void check_stack(const at::Tensor& q, const at::Tensor& dw, const at::Tensor& mw, int64_t E, int64_t n,
                 int64_t k, const char* what) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == E && (q.size(3) == 256 || q.size(3) == 512), what,
              ": not a stack of group-quantized weights");
  TORCH_CHECK(q.scalar_type() == at::kByte && dw.scalar_type() == at::kHalf && mw.scalar_type() == at::kHalf, what,
              ": wrong dtypes");
  TORCH_CHECK(q.is_contiguous() && dw.is_contiguous() && mw.is_contiguous(), what, ": not contiguous");
  TORCH_CHECK(dw.dim() == 4 && dw.sizes() == mw.sizes() && dw.size(0) == E && dw.size(1) == q.size(1) &&
                  dw.size(2) == q.size(2) && dw.size(3) == 16, what, ": scales do not match the codes");
  TORCH_CHECK(q.size(2) * kGroup == k && q.size(1) * 16 >= n, what, ": shape does not match the layer");
}

// x [T, H]; topk_ids / topk_weights [T, k] (ids outside [0, E) are skipped: held by another rank);
// limit > 0: Step-3.5's SwiGLU clamp. Returns [T, H] in x's dtype.
at::Tensor moe_experts(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                       const at::Tensor& q13, const at::Tensor& dw13, const at::Tensor& mw13, const at::Tensor& q2,
                       const at::Tensor& dw2, const at::Tensor& mw2, int64_t inter, double limit) {
  TORCH_CHECK(x_in.dim() == 2 && topk_ids.dim() == 2 && topk_ids.sizes() == topk_weights.sizes() &&
                  topk_ids.size(0) == x_in.size(0), "moe_experts: x [T, H], topk_ids and topk_weights [T, k]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), E = q13.size(0), I = inter;
  check_stack(q13, dw13, mw13, E, 2 * I, H, "w13");
  check_stack(q2, dw2, mw2, E, H, I, "w2");
  at::Tensor out = at::zeros({T, H}, x.options());
  if (T == 0) return out.to(x_in.scalar_type());

  // the (token, slot) pairs of each expert, tokens in order (a counting sort)
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t p = 0; p < T * k; ++p)
    if (id[p] >= 0 && id[p] < E) ++count[id[p] + 1];
  int64_t max_n = 0;
  for (int64_t e = 0; e < E; ++e) max_n = std::max(max_n, count[e + 1]);
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  std::vector<int64_t> pairs(count[E]), fill(count.begin(), count.end() - 1);
  for (int64_t p = 0; p < T * k; ++p)
    if (id[p] >= 0 && id[p] < E) pairs[fill[id[p]]++] = p;
  if (max_n == 0) return out.to(x_in.scalar_type());

  const int64_t K = std::max(H, I);
  std::vector<float> xs(max_n * H), h(max_n * 2 * I), a(max_n * I), y(max_n * H), xd(max_n * K / kGroup),
      xsum(max_n * K / kGroup);
  std::vector<int8_t> xq(max_n * K);
  const float* xp = x.data_ptr<float>();
  const float* wp = wts.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lim = static_cast<float>(limit);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = count[e + 1] - count[e];
    if (n == 0) continue;
    const int64_t* ps = pairs.data() + count[e];
    for (int64_t r = 0; r < n; ++r) std::memcpy(&xs[r * H], xp + (ps[r] / k) * H, H * sizeof(float));
    group_gemm_rows(xs.data(), n, expert_weight(q13, dw13, mw13, 2 * I, e), h.data(), xq.data(), xd.data(),
                    xsum.data());
    for (int64_t r = 0; r < n; ++r) {
      const float* g = &h[r * 2 * I];
      for (int64_t i = 0; i < I; ++i) {
        float s = g[i] / (1.0f + std::exp(-g[i])), u = g[I + i];
        if (lim > 0) s = std::min(s, lim), u = std::clamp(u, -lim, lim);
        a[r * I + i] = s * u;
      }
    }
    group_gemm_rows(a.data(), n, expert_weight(q2, dw2, mw2, H, e), y.data(), xq.data(), xd.data(), xsum.data());
    for (int64_t r = 0; r < n; ++r) {
      const float w = wp[ps[r]];
      float* o = op + (ps[r] / k) * H;
      const float* yr = &y[r * H];
      // an explicit fma: the SIMD builds would contract a*b+c into one anyway, the portable one not
      for (int64_t j = 0; j < H; ++j) o[j] = std::fma(yr[j], w, o[j]);
    }
  }
  return out.to(x_in.scalar_type());
}

}  // namespace
}  // namespace EMBER_NS

TORCH_LIBRARY_FRAGMENT(EMBER_NS, m) {
  m.def("moe_experts(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor q13, Tensor dw13, Tensor mw13, "
        "Tensor q2, Tensor dw2, Tensor mw2, int inter, float limit) -> Tensor");
}

TORCH_LIBRARY_IMPL(EMBER_NS, CPU, m) { m.impl("moe_experts", EMBER_NS::moe_experts); }
