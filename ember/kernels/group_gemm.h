// The group-quantized GEMM of vnni_gemm.cpp, callable from other kernels on raw pointers (no tensor ops).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

// Each build variant (ember/kernels/__init__.py: avx512, avx2, portable) is compiled into its own C++ and
// torch namespace, so that several variants can live in one process (the tests compare them).
#ifndef EMBER_NS
#define EMBER_NS ember
#endif

namespace EMBER_NS {

constexpr int64_t kGroup = 32;  // inputs per quantization group

// f(std::integral_constant<int, k>{}) with k = min(n, Max), n >= 1: a run-time row count as a template argument
// (kernels keep that many rows' accumulators in registers).
template <int Max, class F>
inline void with_rows(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_rows<Max - 1>(n, f);
  }
  f(std::integral_constant<int, Max>{});
}

// A weight [n, k] in the tile layout of vnni_gemm.cpp (4 or 8 bits per code, fp16 scale and offset).
struct GroupWeight {
  const uint8_t* q;
  const at::Half* dw;
  const at::Half* mw;
  int64_t bits, n, k, tiles;
};

GroupWeight group_weight(const at::Tensor& qweight, const at::Tensor& dw, const at::Tensor& mw, int64_t n);

// y[M, n] = x[M, k] W^T, with the activations quantized into the scratch xq [M*k], xd and xs [M*k/32].
// reference: the portable scalar loop instead of the build's SIMD kernel (for the tests).
void group_gemm_rows(const float* x, int64_t M, const GroupWeight& w, float* y, int8_t* xq, float* xd, float* xs,
                     bool reference = false);

}  // namespace EMBER_NS
