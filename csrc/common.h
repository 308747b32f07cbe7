// Shared helpers of the maskvl CPU ops (header only; each op lives in its own .cpp file).
//
// The op schemas are defined from Python (maskvl/ops/<op>.py) so that the Triton kernels can
// register for CUDA even when this extension is not built; the .cpp files here only add the CPU
// kernels with TORCH_LIBRARY_IMPL(maskvl, CPU, m).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace maskvl {

// Accumulation type: double for double inputs, float for float / bfloat16 / half.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// The compute dtype of measures.compute_dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Dot product of two length-n rows with 8 independent partial sums. The fixed lane structure lets
// GCC vectorize the loop (SLP) without -ffast-math, and the summation order never depends on the
// thread count, so results are deterministic.
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* __restrict a, const b_t* __restrict b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) s[l] += static_cast<acc_t>(a[i + l]) * static_cast<acc_t>(b[i + l]);
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))) + tail;
}

// y[0:n] += w * x[0:n] (no reduction: vectorizes as is).
template <typename acc_t, typename x_t>
inline void axpy(acc_t* __restrict y, acc_t w, const x_t* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * static_cast<acc_t>(x[i]);
}

// Exactly maskvl.measures.distances_from_moments for one (A, B, C), same operation order:
//   ||m|| - ||c|| = (2B + C) / (||c|| + ||m||),  cos_dist = (C - (||m|| - ||c||)^2) / (2 ||c|| ||m||),
// clamped to [0, 2]; 1 when exactly one vector is zero, 0 when both are. Comparisons are written so
// that NaN propagates like torch.clamp does.
template <typename T>
inline void distances_from_moments(T A, T B, T C, T* l2, T* cosd) {
  C = C < T(0) ? T(0) : C;
  const T Ac = A < T(0) ? T(0) : A;
  const T nc = std::sqrt(Ac);
  const T m2 = (A + T(2) * B) + C;
  const T nm = std::sqrt(m2 < T(0) ? T(0) : m2);
  *l2 = std::sqrt(C);
  const T denom = nc + nm;
  const bool safe = denom > T(0);
  const T diff = safe ? (T(2) * B + C) / denom : T(0);
  const T prod = nc * nm;
  const bool both = prod > T(0);
  T c = (C - diff * diff) / (both ? T(2) * prod : T(1));
  c = c < T(0) ? T(0) : (c > T(2) ? T(2) : c);
  *cosd = both ? c : (safe ? T(1) : T(0));
}

// Rows of a [N, ..., D] tensor must be contiguous in the last dim; anything else is copied once.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace maskvl
