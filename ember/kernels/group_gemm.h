// The group-quantized GEMM of vnni_gemm.cpp, callable from other kernels on raw pointers (no tensor ops).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ember {

constexpr int64_t kGroup = 32;  // inputs per quantization group

// A weight [n, k] in the tile layout of vnni_gemm.cpp (4 or 8 bits per code, fp16 scale and offset).
struct GroupWeight {
  const uint8_t* q;
  const at::Half* dw;
  const at::Half* mw;
  int64_t bits, n, k, tiles;
};

GroupWeight group_weight(const at::Tensor& qweight, const at::Tensor& dw, const at::Tensor& mw, int64_t n);

// y[M, n] = x[M, k] W^T, with the activations quantized into the scratch xq [M*k], xd and xs [M*k/32].
void group_gemm_rows(const float* x, int64_t M, const GroupWeight& w, float* y, int8_t* xq, float* xd, float* xs);

}  // namespace ember
