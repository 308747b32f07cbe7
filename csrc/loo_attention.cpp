// Leave-one-out attention of the final query (CPU kernel of maskvl::loo_attention).
//
// q [H, D], k/v [T, KV, D] (any strides with a contiguous last dim, e.g. a transposed KV cache view),
// scale -> o [H, D], delta [T, H, D] in the compute dtype (double for double, float otherwise).
// Head h reads KV head h / (H / KV). For each head, with s_j = scale <q_h, k_j>, the argmax j1 (first
// occurrence), its score m1 and the best other score m2:
//   e'_j = exp(s_j - m2) for j != j1,  Z' = sum_{j != j1} e'_j >= 1,  U' = sum_{j != j1} e'_j v_j
//   r = exp(m2 - m1),  Z = Z' r + 1,  o = (U' r + v_j1) / Z
//   delta[p] = e_p / (Z - e_p) (o - v_p) with e_p = exp(s_p - m1)       (= a_p / (1 - a_p) (o - v_p))
//   delta[j1] = U' / Z' - o                  (the argmax key, recomputed directly: no 1 - a cancellation)
// T == 1: the masked output is zero by definition, delta = -o.
// Phases: scores (one pass over K), per-head statistics, U' (one pass over V, fixed-size T chunks with
// per-chunk partial sums reduced in chunk order, so results do not depend on the thread count),
// o, and the delta rows (a second pass over V, which cannot be avoided: delta needs o).
#include "common.h"

namespace maskvl {
namespace {

constexpr int64_t kChunk = 64;  // rows of T per parallel work item

template <typename scalar_t>
void loo_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_d,
                        at::Tensor& o_out, at::Tensor& delta_out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t H = q.size(0), D = q.size(1), T = k.size(0), KV = k.size(1), G = H / KV;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const int64_t skt = k.stride(0), skh = k.stride(1), svt = v.stride(0), svh = v.stride(1);
  acc_t* o = o_out.data_ptr<acc_t>();
  acc_t* delta = delta_out.data_ptr<acc_t>();

  // Query rows upcast once ([H, D]).
  std::vector<acc_t> qf(H * D);
  {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<acc_t>(qp[i]);
  }

  if (T == 1) {  // removing the only key leaves nothing: masked output 0, delta = -o, o = v_0.
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* vrow = vp + (h / G) * svh;
      for (int64_t d = 0; d < D; ++d) {
        o[h * D + d] = static_cast<acc_t>(vrow[d]);
        delta[h * D + d] = -o[h * D + d];
      }
    }
    return;
  }

  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  std::vector<acc_t> s(H * T);   // scores [H, T]
  std::vector<acc_t> ep(H * T);  // exp(s - m2) [H, T], 0 at the argmax

  // Phase 1: scores; each K row is read once and dotted with the G queries of its group.
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t1 = std::min(T, (c + 1) * kChunk);
      for (int64_t t = c * kChunk; t < t1; ++t) {
        for (int64_t kv = 0; kv < KV; ++kv) {
          const scalar_t* krow = kp + t * skt + kv * skh;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kv * G + g;
            s[h * T + t] = dot<acc_t>(qf.data() + h * D, krow, D) * scale;
          }
        }
      }
    }
  });

  // Phase 2: per-head statistics (O(T) each).
  std::vector<int64_t> j1(H);
  std::vector<acc_t> m1(H), Zp(H), Z(H), r(H);
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const acc_t* sh = s.data() + h * T;
      int64_t best = 0;
      for (int64_t t = 1; t < T; ++t)
        if (sh[t] > sh[best]) best = t;  // strict: first occurrence wins ties
      acc_t second = -std::numeric_limits<acc_t>::infinity();
      for (int64_t t = 0; t < T; ++t)
        if (t != best && sh[t] > second) second = sh[t];
      acc_t* eh = ep.data() + h * T;
      acc_t z = 0;
      for (int64_t t = 0; t < T; ++t) {
        eh[t] = t == best ? acc_t(0) : std::exp(sh[t] - second);
        z += eh[t];
      }
      j1[h] = best;
      m1[h] = sh[best];
      Zp[h] = z;
      r[h] = std::exp(second - sh[best]);
      Z[h] = z * r[h] + acc_t(1);
    }
  });

  // Phase 3: U' = sum_{j != j1} e'_j v_j, per-chunk partials [nchunks, H, D].
  std::vector<acc_t> part(nchunks * H * D, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* pc = part.data() + c * H * D;
      const int64_t t1 = std::min(T, (c + 1) * kChunk);
      for (int64_t t = c * kChunk; t < t1; ++t) {
        for (int64_t kv = 0; kv < KV; ++kv) {
          const scalar_t* vrow = vp + t * svt + kv * svh;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kv * G + g;
            const acc_t w = ep[h * T + t];
            if (w != acc_t(0)) axpy<acc_t>(pc + h * D, w, vrow, D);
          }
        }
      }
    }
  });

  // Phase 4: o and the argmax key's masked output o_wo = U' / Z'.
  std::vector<acc_t> owo(H * D);
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const scalar_t* vbest = vp + j1[h] * svt + (h / G) * svh;
      for (int64_t d = 0; d < D; ++d) {
        acc_t u = 0;
        for (int64_t c = 0; c < nchunks; ++c) u += part[(c * H + h) * D + d];
        o[h * D + d] = (u * r[h] + static_cast<acc_t>(vbest[d])) / Z[h];
        owo[h * D + d] = u / Zp[h];
      }
    }
  });

  // Phase 5: delta rows [T, H, D].
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t1 = std::min(T, (c + 1) * kChunk);
      for (int64_t t = c * kChunk; t < t1; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          acc_t* drow = delta + (t * H + h) * D;
          const acc_t* oh = o + h * D;
          if (t == j1[h]) {
            const acc_t* wh = owo.data() + h * D;
            for (int64_t d = 0; d < D; ++d) drow[d] = wh[d] - oh[d];
            continue;
          }
          const scalar_t* vrow = vp + t * svt + (h / G) * svh;
          const acc_t e = std::exp(s[h * T + t] - m1[h]);
          const acc_t w = e / (Z[h] - e);
          for (int64_t d = 0; d < D; ++d) drow[d] = w * (oh[d] - static_cast<acc_t>(vrow[d]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> loo_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale) {
  TORCH_CHECK(q_in.dim() == 2, "maskvl::loo_attention: q must be [H, D], got ", q_in.sizes());
  TORCH_CHECK(k_in.dim() == 3 && v_in.dim() == 3, "maskvl::loo_attention: k, v must be [T, KV, D]");
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "maskvl::loo_attention: k ", k_in.sizes(), " and v ",
              v_in.sizes(), " differ");
  const int64_t H = q_in.size(0), D = q_in.size(1), T = k_in.size(0), KV = k_in.size(1);
  TORCH_CHECK(k_in.size(2) == D, "maskvl::loo_attention: head_dim of q (", D, ") and k (", k_in.size(2),
              ") differ");
  TORCH_CHECK(T >= 1 && KV >= 1 && H % KV == 0, "maskvl::loo_attention: need T >= 1 and H (", H,
              ") a multiple of KV (", KV, ")");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && k_in.scalar_type() == v_in.scalar_type(),
              "maskvl::loo_attention: q, k, v must share one dtype");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  const auto cd = compute_dtype(q.scalar_type());
  at::Tensor o = at::empty({H, D}, q.options().dtype(cd));
  at::Tensor delta = at::empty({T, H, D}, q.options().dtype(cd));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "maskvl_loo_attention", [&] {
    loo_attention_impl<scalar_t>(q, k, v, scale, o, delta);
  });
  return {o, delta};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskvl, CPU, m) { m.impl("loo_attention", &loo_attention_cpu); }

}  // namespace maskvl
