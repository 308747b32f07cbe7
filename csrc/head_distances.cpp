// Fused per-head distances (CPU kernel of maskvl::head_distances; see maskvl/ops/head_distances.py).
//
// o [H, D], delta [T, H, D], gram [H, D, D] -> l2 [T, H], cos [T, H] with the moments
//   A_h = o_h^T G_h o_h,  B_ph = o_h^T G_h delta[p,h],  C_ph = delta[p,h]^T G_h delta[p,h]
// fed to distances_from_moments. G_h delta is formed for a tile of kTile rows of one head at a time
// (one BLAS call per tile; never for all T).
// Inputs of other dtypes are cast to the compute dtype (float64 for float64 delta, float32 otherwise).
#include "common.h"

namespace maskvl {
namespace {

constexpr int64_t kTile = 128;  // rows of T per work item (G_h delta tile: kTile x D)

template <typename acc_t>
void head_distances_impl(const at::Tensor& o_t, const at::Tensor& delta_t, const at::Tensor& gram_t,
                         at::Tensor& l2_t, at::Tensor& cos_t) {
  const int64_t T = delta_t.size(0), H = delta_t.size(1), D = delta_t.size(2);
  const acc_t* o = o_t.data_ptr<acc_t>();
  const acc_t* delta = delta_t.data_ptr<acc_t>();
  const acc_t* gram = gram_t.data_ptr<acc_t>();
  acc_t* l2 = l2_t.data_ptr<acc_t>();
  acc_t* cosd = cos_t.data_ptr<acc_t>();

  std::vector<acc_t> A(H);  // A_h = sum_x o_x (G o)_x
  for (int64_t h = 0; h < H; ++h) {
    const acc_t* G = gram + h * D * D;
    acc_t a = 0;
    for (int64_t x = 0; x < D; ++x) a += o[h * D + x] * dot<acc_t>(G + x * D, o + h * D, D);
    A[h] = a;
  }

  // Work item: one head, kTile rows of T. G_h delta for the tile is one small GEMM (BLAS, through
  // at::mm_out on a strided view of delta: no copy) into a per-thread [kTile, D] buffer; then B and C
  // are row reductions against it. Nothing of size [T, H, D] is formed.
  const int64_t ntiles = (T + kTile - 1) / kTile;
  at::parallel_for(0, H * ntiles, 1, [&](int64_t w0, int64_t w1) {
    at::Tensor gd_buf = at::empty({kTile, D}, delta_t.options());
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t h = w / ntiles, tile = w % ntiles;
      const int64_t t0 = tile * kTile, n = std::min(T, t0 + kTile) - t0;
      at::Tensor gd = gd_buf.narrow(0, 0, n);
      at::mm_out(gd, delta_t.select(1, h).narrow(0, t0, n), gram_t[h].t());  // gd[t, x] = sum_y d[t, y] G[x, y]
      const acc_t* gdp = gd.data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) {
        const acc_t* drow = delta + ((t0 + i) * H + h) * D;
        const acc_t C = dot<acc_t>(drow, gdp + i * D, D);
        const acc_t B = dot<acc_t>(o + h * D, gdp + i * D, D);
        const int64_t idx = (t0 + i) * H + h;
        distances_from_moments<acc_t>(A[h], B, C, l2 + idx, cosd + idx);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> head_distances_cpu(const at::Tensor& o_in, const at::Tensor& delta_in,
                                                      const at::Tensor& gram_in) {
  TORCH_CHECK(delta_in.dim() == 3, "maskvl::head_distances: delta must be [T, H, D], got ", delta_in.sizes());
  const int64_t T = delta_in.size(0), H = delta_in.size(1), D = delta_in.size(2);
  TORCH_CHECK(o_in.dim() == 2 && o_in.size(0) == H && o_in.size(1) == D, "maskvl::head_distances: o must be [",
              H, ", ", D, "], got ", o_in.sizes());
  TORCH_CHECK(gram_in.dim() == 3 && gram_in.size(0) == H && gram_in.size(1) == D && gram_in.size(2) == D,
              "maskvl::head_distances: gram must be [", H, ", ", D, ", ", D, "], got ", gram_in.sizes());
  const auto cd = compute_dtype(delta_in.scalar_type());
  const at::Tensor o = o_in.to(cd).contiguous();
  const at::Tensor delta = delta_in.to(cd).contiguous();
  const at::Tensor gram = gram_in.to(cd).contiguous();
  at::Tensor l2 = at::empty({T, H}, delta.options());
  at::Tensor cosd = at::empty({T, H}, delta.options());
  if (cd == at::kDouble)
    head_distances_impl<double>(o, delta, gram, l2, cosd);
  else
    head_distances_impl<float>(o, delta, gram, l2, cosd);
  return {l2, cosd};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskvl, CPU, m) {
  m.impl("head_distances", &head_distances_cpu);
}

}  // namespace maskvl
