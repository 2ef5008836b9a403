// A whole decode step of a Llama-family decoder (Llama, Qwen2, Qwen3) with group-quantized weights, in one call.
//
// Why: at batch 1 a w4a8 decode step spent ~9 of its 23 ms in ~1,000 small torch ops (norms, rotary,
// residuals, KV writes, the SDPA call) whose cost is dispatch and allocation, not math. Here the step is
// plain loops around group_gemm_rows (vnni_gemm.cpp): buffers allocated once per step, no dispatcher, and
// attention reads keys and values straight from their pages instead of gathering them first.
//
// Per layer, for each row (the one new token of one request):
//   h = rms_norm(x) * w_in;  q, k, v = h Wqkv^T (+ b);  Qwen3: rms_norm each q and k head
//   rotate q and k (rotate-half RoPE, tables from Python)
//   k, v -> the row's KV slot;  o = softmax(q K^T * scale) V over the row's slots (grouped-query heads)
//   x += o Wo^T;  h = rms_norm(x) * w_post;  x += (silu(h Wg^T) * h Wu^T) Wd^T
// and at the end rms_norm(x) * w_final. A row's arithmetic never depends on the other rows (batch-invariant).
#include "group_gemm.h"

#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#define EMBER_AVX512 1
#define EMBER_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EMBER_AVX512 0
#define EMBER_AVX2 1
#else
#define EMBER_AVX512 0
#define EMBER_AVX2 0
#endif

namespace EMBER_NS {
namespace {

#if EMBER_AVX512
// exp on 16 lanes: 2^n * p(r) with n = round(x / ln2), |r| <= ln2 / 2, p = Taylor to degree 6 (~1e-7 rel.).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }
#elif EMBER_AVX2
// exp16's method on 8 lanes; 2^n is built in the exponent bits (n is within -126..127 after the clamp).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// x[i] = exp(x[i] - shift); returns the sum.
float exp_shifted(float* x, int64_t n, float shift) {
  float sum = 0.f;
#if EMBER_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(shift)));
    _mm512_mask_storeu_ps(x + i, m, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
  }
  sum = _mm512_reduce_add_ps(acc);
#else
  int64_t i = 0;
#if EMBER_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(shift)));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum8(acc);
#endif
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
#endif
  return sum;
}

float dot(const float* a, const float* b, int64_t n) {
#if EMBER_AVX512
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#elif EMBER_AVX2
  if (n % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum8(acc);
  }
#endif
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
void axpy(float* y, float a, const float* x, int64_t n) {
#if EMBER_AVX512
  if (n % 16 == 0) {
    const __m512 av = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16)
      _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    return;
  }
#elif EMBER_AVX2
  if (n % 8 == 0) {
    const __m256 av = _mm256_set1_ps(a);
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

#if EMBER_AVX512 || EMBER_AVX2
// Lane u = the sum of a[u]'s eight lanes.
inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// out[0, 8 NC) = sum_j p[j] * inv * v_j: the row's value vectors (slots, kv head g) weighted, accumulated in
// registers in slot order with the same fma per element as `axpy` into memory would do.
// With `first` false the sum continues from out (a later block of slots: the same fma sequence per element).
template <int NC>
void weighted_sum(const float* p, float inv, const float* v_cache, const int64_t* slots, int64_t n, int64_t stride,
                  int64_t off, float* out, bool first) {
  __m256 o[NC];
  for (int c = 0; c < NC; ++c) o[c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(p[j] * inv);
    const float* v = v_cache + slots[j] * stride + off;
    for (int c = 0; c < NC; ++c) o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), o[c]);
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out + 8 * c, o[c]);
}
#endif

// sc[j] = (q . k_j) * scale over the row's n slots (kv head g of Hkv, head size D). Eight keys at a time, each
// with its own accumulator (one chain of FMAs per key waited on the FMA latency: ~40 cycles per key and head).
void attention_scores(const float* q, const float* k_cache, const int64_t* slots, int64_t n, int64_t Hkv, int64_t g,
                      int64_t D, float scale, float* sc) {
  int64_t j = 0;
#if EMBER_AVX512 || EMBER_AVX2
  if (D % 8 == 0) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (; j + 8 <= n; j += 8) {
      const float* k[8];
      __m256 acc[8];
      for (int u = 0; u < 8; ++u) k[u] = k_cache + (slots[j + u] * Hkv + g) * D, acc[u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[u] + d), acc[u]);
      }
      _mm256_storeu_ps(sc + j, _mm256_mul_ps(hsum8x8(acc), sv));
    }
  }
#endif
  for (; j < n; ++j) sc[j] = dot(q, k_cache + (slots[j] * Hkv + g) * D, D) * scale;
}

// out = sum_j p[j] * inv * v_j over the row's n slots (kv head g), in slot order; with `first` false, out += that
// (the slots of a later block).
void attention_values(const float* p, float inv, const float* v_cache, const int64_t* slots, int64_t n, int64_t Hkv, int64_t g,
                      int64_t D, float* out, bool first) {
#if EMBER_AVX512 || EMBER_AVX2
  if (D % 8 == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  // up to 8 registers of the output at a time
      const int64_t off = g * D + d0, stride = Hkv * D;
      with_rows<8>((D - d0) / 8, [&](auto nc) {
        weighted_sum<nc.value>(p, inv, v_cache, slots, n, stride, off, out + d0, first);
      });
    }
    return;
  }
#endif
  if (first) std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < n; ++j) axpy(out, p[j] * inv, v_cache + (slots[j] * Hkv + g) * D, D);
}

// Rows that read the same KV slots: row b joins a group whose longest row's slots agree with its own over its own
// length (the rows of one request's verify do; rows on different branches of a draft tree, or of other requests,
// do not). Each group lists its longest row first.
std::vector<std::vector<int64_t>> slot_groups(const int64_t* sp, const int64_t* lp, int64_t B, int64_t W) {
  std::vector<std::vector<int64_t>> groups;
  for (int64_t b = 0; b < B; ++b) {
    auto same = [&](const std::vector<int64_t>& g) {
      const int64_t m = std::min(lp[b], lp[g[0]]);
      return std::equal(sp + b * W, sp + b * W + m, sp + g[0] * W);
    };
    auto it = std::find_if(groups.begin(), groups.end(), same);
    if (it == groups.end()) {
      groups.push_back({b});
    } else {
      it->push_back(b);
      if (lp[b] > lp[it->front()]) std::swap(it->front(), it->back());
    }
  }
  return groups;
}

// Slots per block: a block's keys (then values) stay in L1 while every query head and row of a task reads them.
constexpr int64_t kKeyBlock = 32;

// Attention for the rows of one slot group and query heads [h0, h1) of kv head g: scores into sc (row b, head h at
// sc + (b * H + h) * W), then out (row b, head h at out + (b * H + h) * D). K and V are read from memory once per
// task, not once per row and head; each row and head's arithmetic is the same as alone (blocks are whole groups of
// eight slots, the sums run in slot order).
void attend(const std::vector<int64_t>& rows, int64_t g, int64_t h0, int64_t h1, const float* q, int64_t q_stride,
            const float* k_cache, const float* v_cache, const int64_t* sp, const int64_t* lp, int64_t W, int64_t H,
            int64_t Hkv, int64_t D, float scale, float* sc, float* out) {
  const int64_t* slots = sp + rows[0] * W;  // the longest row's: every row's own slots are a prefix of them
  const int64_t n_max = lp[rows[0]];
  for (int64_t j0 = 0; j0 < n_max; j0 += kKeyBlock)
    for (const int64_t b : rows)
      if (j0 < lp[b])
        for (int64_t h = h0; h < h1; ++h)
          attention_scores(q + b * q_stride + h * D, k_cache, slots + j0, std::min(kKeyBlock, lp[b] - j0), Hkv, g, D,
                           scale, sc + (b * H + h) * W + j0);
  std::vector<float> inv(rows.size() * (h1 - h0));
  for (size_t r = 0; r < rows.size(); ++r)
    for (int64_t h = h0; h < h1; ++h) {
      float* s = sc + (rows[r] * H + h) * W;
      const int64_t n = lp[rows[r]];
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
      inv[r * (h1 - h0) + (h - h0)] = 1.f / exp_shifted(s, n, mx);
    }
  for (int64_t j0 = 0; j0 < n_max; j0 += kKeyBlock)
    for (size_t r = 0; r < rows.size(); ++r) {
      const int64_t b = rows[r];
      if (j0 < lp[b])
        for (int64_t h = h0; h < h1; ++h)
          attention_values(sc + (b * H + h) * W + j0, inv[r * (h1 - h0) + (h - h0)], v_cache, slots + j0,
                           std::min(kKeyBlock, lp[b] - j0), Hkv, g, D, out + (b * H + h) * D, j0 == 0);
    }
}

void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// HF's rotate-half RoPE on one head: x' = x * cos + [-x2, x1] * sin.
void rotate(float* x, const float* c, const float* s, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] - b * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

void silu_mul(const float* gate_up, float* out, int64_t I) {
  int64_t i = 0;
#if EMBER_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= I; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate_up + i), u = _mm512_loadu_ps(gate_up + I + i);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
  }
#elif EMBER_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= I; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate_up + i), u = _mm256_loadu_ps(gate_up + I + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), u));
  }
#endif
  for (; i < I; ++i) out[i] = gate_up[i] / (1.f + std::exp(-gate_up[i])) * gate_up[I + i];
}

struct Linear {
  GroupWeight w;
  const float* bias;  // nullptr: none
};

struct Layer {
  const float* in_norm;
  const float* post_norm;
  const float* q_norm;  // per-head norms of q and k (Qwen3); nullptr: none
  const float* k_norm;
  Linear qkv, o, gate_up, down;
  float* k_cache;  // [slots, kv_heads, head_dim]
  float* v_cache;
};

const float* f32(const at::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel, what,
              ": expected a contiguous float32 tensor of ", numel, " elements");
  return t.data_ptr<float>();
}

}  // namespace

class DecodeStack : public torch::CustomClassHolder {
 public:
  static constexpr int64_t kPerLayer = 19;

  // tensors: per layer [in_norm, qkv q/dw/mw/bias, o q/dw/mw, post_norm, gate_up q/dw/mw, down q/dw/mw,
  // k_cache, v_cache, q_norm, k_norm] (an empty bias or q/k norm = none), then [final_norm, cos, sin].
  // dims: [layers, hidden, heads, kv_heads, head_dim, intermediate].
  DecodeStack(std::vector<at::Tensor> tensors, std::vector<int64_t> dims, double eps, double scale)
      : keep_(std::move(tensors)), eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)) {
    TORCH_CHECK(dims.size() == 6, "dims: [layers, hidden, heads, kv_heads, head_dim, intermediate]");
    const int64_t L = dims[0];
    hidden_ = dims[1], heads_ = dims[2], kv_heads_ = dims[3], head_dim_ = dims[4], inter_ = dims[5];
    TORCH_CHECK(static_cast<int64_t>(keep_.size()) == L * kPerLayer + 3, "wrong number of tensors");
    TORCH_CHECK(heads_ % kv_heads_ == 0 && head_dim_ % 2 == 0, "bad head layout");
    const int64_t D = head_dim_, qkv_n = (heads_ + 2 * kv_heads_) * D;
    auto linear = [&](int64_t i, int64_t n, int64_t k, bool has_bias) {
      Linear l{group_weight(keep_[i], keep_[i + 1], keep_[i + 2], n), nullptr};
      TORCH_CHECK(l.w.k == k, "weight ", i, ": in_features ", l.w.k, ", expected ", k);
      if (has_bias && keep_[i + 3].defined() && keep_[i + 3].numel() > 0) l.bias = f32(keep_[i + 3], n, "bias");
      return l;
    };
    for (int64_t l = 0; l < L; ++l) {
      const int64_t b = l * kPerLayer;
      Layer layer;
      layer.in_norm = f32(keep_[b], hidden_, "input norm");
      layer.qkv = linear(b + 1, qkv_n, hidden_, true);
      layer.o = linear(b + 5, hidden_, heads_ * D, false);
      layer.post_norm = f32(keep_[b + 8], hidden_, "post-attention norm");
      layer.gate_up = linear(b + 9, 2 * inter_, hidden_, false);
      layer.down = linear(b + 12, hidden_, inter_, false);
      const at::Tensor &k = keep_[b + 15], &v = keep_[b + 16];
      TORCH_CHECK(k.dim() == 3 && k.size(1) == kv_heads_ && k.size(2) == D && k.sizes() == v.sizes(), "KV cache shape");
      layer.q_norm = keep_[b + 17].numel() ? f32(keep_[b + 17], D, "q norm") : nullptr;
      layer.k_norm = keep_[b + 18].numel() ? f32(keep_[b + 18], D, "k norm") : nullptr;
      layer.k_cache = const_cast<float*>(f32(k, k.numel(), "k cache"));
      layer.v_cache = const_cast<float*>(f32(v, v.numel(), "v cache"));
      slots_ = k.size(0);
      layers_.push_back(layer);
    }
    final_norm_ = f32(keep_[L * kPerLayer], hidden_, "final norm");
    const at::Tensor &cos = keep_[L * kPerLayer + 1], &sin = keep_[L * kPerLayer + 2];
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && cos.sizes() == sin.sizes(), "rotary tables [positions, head_dim]");
    max_pos_ = cos.size(0);
    cos_ = f32(cos, cos.numel(), "cos"), sin_ = f32(sin, sin.numel(), "sin");
  }

  // x [B, hidden] embedded tokens; positions, write_slots, kv_lens [B]; kv_slots [B, W] (row b attends to its
  // first kv_lens[b] slots, the new token's included). Returns the final-normed hidden states [B, hidden].
  at::Tensor forward(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& write_slots,
                     const at::Tensor& kv_slots, const at::Tensor& kv_lens) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == hidden_, "x must be [B, hidden]");
    const int64_t B = x_in.size(0), D = head_dim_, H = heads_, Hkv = kv_heads_, I = inter_;
    const at::Tensor pos = positions.to(at::kLong).contiguous(), ws = write_slots.to(at::kLong).contiguous();
    const at::Tensor slots = kv_slots.to(at::kLong).contiguous(), lens = kv_lens.to(at::kLong).contiguous();
    TORCH_CHECK(pos.numel() == B && ws.numel() == B && lens.numel() == B && slots.dim() == 2 && slots.size(0) == B,
                "one position, write slot, KV length and slot row per token");
    const int64_t* pp = pos.data_ptr<int64_t>();
    const int64_t* wp = ws.data_ptr<int64_t>();
    const int64_t* sp = slots.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    const int64_t W = slots.size(1);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pp[b] >= 0 && pp[b] < max_pos_, "position out of the rotary table");
      TORCH_CHECK(wp[b] >= 0 && wp[b] < slots_ && lp[b] >= 1 && lp[b] <= W, "bad KV slot or length");
      for (int64_t j = 0; j < lp[b]; ++j) TORCH_CHECK(sp[b * W + j] >= 0 && sp[b * W + j] < slots_, "KV slot out of the pool");
    }

    at::Tensor x = x_in.to(at::kFloat).contiguous().clone();  // the residual stream, updated in place
    const int64_t qkv_n = (H + 2 * Hkv) * D, widest = std::max({hidden_, H * D, I});
    const auto opts = x.options();
    at::Tensor h = at::empty({B, hidden_}, opts), qkv = at::empty({B, qkv_n}, opts), att = at::empty({B, H * D}, opts);
    at::Tensor tmp = at::empty({B, hidden_}, opts), gu = at::empty({B, 2 * I}, opts), act = at::empty({B, I}, opts);
    at::Tensor xq = at::empty({B * widest}, opts.dtype(at::kChar));
    at::Tensor xd = at::empty({B * widest / kGroup + 1}, opts), xs = at::empty({B * widest / kGroup + 1}, opts);
    at::Tensor scores = at::empty({B * H, W}, opts);
    float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *qp = qkv.data_ptr<float>();
    float *ap = att.data_ptr<float>(), *tp = tmp.data_ptr<float>(), *gp = gu.data_ptr<float>(), *cp = act.data_ptr<float>();
    float* scp = scores.data_ptr<float>();
    auto gemm = [&](const float* in, const Linear& l, float* out) {
      group_gemm_rows(in, B, l.w, out, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), xs.data_ptr<float>());
      if (l.bias)
        for (int64_t b = 0; b < B; ++b) axpy(out + b * l.w.n, 1.f, l.bias, l.w.n);
    };
    auto add_into_x = [&](const float* y) {
      for (int64_t i = 0; i < B * hidden_; ++i) xp[i] += y[i];
    };

    // attention tasks: (slot group, kv head, chunk of its query heads), the heads split only to give every thread one
    const std::vector<std::vector<int64_t>> groups = slot_groups(sp, lp, B, W);
    const int64_t num_groups = static_cast<int64_t>(groups.size()), G = H / Hkv;
    const int64_t chunks = std::clamp<int64_t>(at::get_num_threads() / (num_groups * Hkv), 1, G);

    for (const Layer& layer : layers_) {
      for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * hidden_, layer.in_norm, hp + b * hidden_, hidden_, eps_);
      gemm(hp, layer.qkv, qp);
      for (int64_t b = 0; b < B; ++b) {
        float* row = qp + b * qkv_n;
        const float *c = cos_ + pp[b] * D, *s = sin_ + pp[b] * D;
        if (layer.q_norm)
          for (int64_t head = 0; head < H; ++head) rms_norm(row + head * D, layer.q_norm, row + head * D, D, eps_);
        if (layer.k_norm)
          for (int64_t head = H; head < H + Hkv; ++head) rms_norm(row + head * D, layer.k_norm, row + head * D, D, eps_);
        for (int64_t head = 0; head < H + Hkv; ++head) rotate(row + head * D, c, s, D);  // q heads, then k heads
        std::copy(row + H * D, row + (H + Hkv) * D, layer.k_cache + wp[b] * Hkv * D);
        std::copy(row + (H + Hkv) * D, row + qkv_n, layer.v_cache + wp[b] * Hkv * D);
      }
      at::parallel_for(0, num_groups * Hkv * chunks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {  // task t: slot group, kv head g, chunk c of g's query heads
          const int64_t grp = t / (Hkv * chunks), g = t / chunks % Hkv, c = t % chunks;
          attend(groups[grp], g, g * G + c * G / chunks, g * G + (c + 1) * G / chunks, qp, qkv_n, layer.k_cache,
                 layer.v_cache, sp, lp, W, H, Hkv, D, scale_, scp, ap);
        }
      });
      gemm(ap, layer.o, tp);
      add_into_x(tp);
      for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * hidden_, layer.post_norm, hp + b * hidden_, hidden_, eps_);
      gemm(hp, layer.gate_up, gp);
      for (int64_t b = 0; b < B; ++b) silu_mul(gp + b * 2 * I, cp + b * I, I);
      gemm(cp, layer.down, tp);
      add_into_x(tp);
    }
    at::Tensor out = at::empty({B, hidden_}, opts);
    for (int64_t b = 0; b < B; ++b) rms_norm(xp + b * hidden_, final_norm_, out.data_ptr<float>() + b * hidden_, hidden_, eps_);
    return out;
  }

 private:
  std::vector<at::Tensor> keep_;  // owns every tensor the raw pointers below point into
  std::vector<Layer> layers_;
  const float* final_norm_ = nullptr;
  const float* cos_ = nullptr;
  const float* sin_ = nullptr;
  int64_t max_pos_ = 0, slots_ = 0, hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, inter_ = 0;
  float eps_, scale_;
};

// silu(gate) * up over rows [gate | up] (vLLM's silu_and_mul): the torch path's MLP on quantized models takes the
// decode step's activation, one pass instead of torch's silu and multiply (~7% of an AVX2 prefill).
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "silu_and_mul: expected float32 rows [gate | up]");
  const at::Tensor x = gate_up.contiguous();
  const int64_t I = x.size(-1) / 2, rows = I ? x.numel() / (2 * I) : 0;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = I;
  at::Tensor out = at::empty(sizes, x.options());
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) silu_mul(in + r * 2 * I, o + r * I, I);
  });
  return out;
}

}  // namespace EMBER_NS

TORCH_LIBRARY_FRAGMENT(EMBER_NS, m) {
  m.class_<EMBER_NS::DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double, double>())
      .def("forward", &EMBER_NS::DecodeStack::forward);
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(EMBER_NS, CPU, m) { m.impl("silu_and_mul", EMBER_NS::silu_and_mul); }
