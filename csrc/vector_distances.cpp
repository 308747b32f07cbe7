// Fused vector distances (CPU kernel of maskvl::vector_distances; see maskvl/ops/vector_distances.py).
//
// clean [N], delta [T, N] -> l2 [T], cos [T] with A = |c|^2, B = <c, d_t>, C = |d_t|^2 fed to
// distances_from_moments; B and C are reduced in one pass over each delta row.
// Inputs of other dtypes are cast to the compute dtype (float64 for float64 delta, float32 otherwise).
#include "common.h"

namespace maskvl {
namespace {

template <typename acc_t>
void vector_distances_impl(const at::Tensor& clean_t, const at::Tensor& delta_t, at::Tensor& l2_t,
                           at::Tensor& cos_t) {
  const int64_t T = delta_t.size(0), N = delta_t.size(1);
  const acc_t* c = clean_t.data_ptr<acc_t>();
  const acc_t* delta = delta_t.data_ptr<acc_t>();
  acc_t* l2 = l2_t.data_ptr<acc_t>();
  acc_t* cosd = cos_t.data_ptr<acc_t>();
  const acc_t A = dot<acc_t>(c, c, N);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* d = delta + t * N;
      acc_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, cc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= N; i += 8) {
        for (int l = 0; l < 8; ++l) {
          b[l] += c[i + l] * d[i + l];
          cc[l] += d[i + l] * d[i + l];
        }
      }
      acc_t bt = 0, ct = 0;
      for (; i < N; ++i) {
        bt += c[i] * d[i];
        ct += d[i] * d[i];
      }
      const acc_t B = (((b[0] + b[4]) + (b[1] + b[5])) + ((b[2] + b[6]) + (b[3] + b[7]))) + bt;
      const acc_t C = (((cc[0] + cc[4]) + (cc[1] + cc[5])) + ((cc[2] + cc[6]) + (cc[3] + cc[7]))) + ct;
      distances_from_moments<acc_t>(A, B, C, l2 + t, cosd + t);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vector_distances_cpu(const at::Tensor& clean_in, const at::Tensor& delta_in) {
  TORCH_CHECK(delta_in.dim() == 2, "maskvl::vector_distances: delta must be [T, N], got ", delta_in.sizes());
  TORCH_CHECK(clean_in.dim() == 1 && clean_in.size(0) == delta_in.size(1),
              "maskvl::vector_distances: clean must be [", delta_in.size(1), "], got ", clean_in.sizes());
  const auto cd = compute_dtype(delta_in.scalar_type());
  const at::Tensor clean = clean_in.to(cd).contiguous();
  const at::Tensor delta = delta_in.to(cd).contiguous();
  at::Tensor l2 = at::empty({delta.size(0)}, delta.options());
  at::Tensor cosd = at::empty({delta.size(0)}, delta.options());
  if (cd == at::kDouble)
    vector_distances_impl<double>(clean, delta, l2, cosd);
  else
    vector_distances_impl<float>(clean, delta, l2, cosd);
  return {l2, cosd};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskvl, CPU, m) {
  m.impl("vector_distances", &vector_distances_cpu);
}

}  // namespace maskvl
