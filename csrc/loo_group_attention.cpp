// Leave-group-out attention of the final query (CPU kernel of maskvl::loo_group_attention).
//
// q [H, D], k/v [T, KV, D] (any strides with a contiguous last dim), scale, groups as CSR members [M],
// offsets [NG + 1] (group g = members[offsets[g] .. offsets[g + 1]), distinct positions in [0, T))
// -> o [H, D], delta [NG, H, D] in the compute dtype (double for double, float otherwise).
// Head h reads KV head h / (H / KV). With a_j = softmax_j(scale <q_h, k_j>) and o = sum_j a_j v_j:
//   A = sum_{j in G} a_j,  U = sum_{j in G} a_j v_j,  delta[G] = (A o - U) / (1 - A)
// and, where A > 1/2 (1 - A cancels), the remaining keys' softmax directly:
//   m' = max_{j not in G} s_j,  delta[G] = sum_{j not in G} e'_j v_j / sum_{j not in G} e'_j - o,
//   e'_j = exp(s_j - m');  no key left: masked output 0, delta = -o.
// Same math as maskvl/ops/loo_group_attention.py. Phases: scores (one pass over K), per-head softmax,
// o (one pass over V, fixed-size T chunks with partial sums reduced in chunk order), then the groups
// in parallel (each group's memberships in order, so results do not depend on the thread count).
#include "common.h"

namespace maskvl {
namespace {

constexpr int64_t kChunk = 64;  // rows of T per parallel work item

template <typename scalar_t>
void loo_group_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_d,
                              const int64_t* members, const int64_t* offsets, int64_t NG, at::Tensor& o_out,
                              at::Tensor& delta_out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t H = q.size(0), D = q.size(1), T = k.size(0), KV = k.size(1), G = H / KV;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const int64_t skt = k.stride(0), skh = k.stride(1), svt = v.stride(0), svh = v.stride(1);
  acc_t* o = o_out.data_ptr<acc_t>();
  acc_t* delta = delta_out.data_ptr<acc_t>();

  std::vector<acc_t> qf(H * D);
  {
    const scalar_t* qptr = q.data_ptr<scalar_t>();
    for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<acc_t>(qptr[i]);
  }
  const int64_t nchunks = (T + kChunk - 1) / kChunk;
  std::vector<acc_t> s(H * T);  // scores [H, T]
  std::vector<acc_t> a(H * T);  // softmax weights [H, T]

  // Phase 1: scores; each K row is read once and dotted with the G queries of its group.
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t1 = std::min(T, (c + 1) * kChunk);
      for (int64_t t = c * kChunk; t < t1; ++t)
        for (int64_t kv = 0; kv < KV; ++kv) {
          const scalar_t* krow = kp + t * skt + kv * skh;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kv * G + g;
            s[h * T + t] = dot<acc_t>(qf.data() + h * D, krow, D) * scale;
          }
        }
    }
  });

  // Phase 2: softmax per head.
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const acc_t* sh = s.data() + h * T;
      acc_t* ah = a.data() + h * T;
      acc_t m = ninf;
      for (int64_t t = 0; t < T; ++t) m = sh[t] > m ? sh[t] : m;
      acc_t z = 0;
      for (int64_t t = 0; t < T; ++t) {
        ah[t] = std::exp(sh[t] - m);
        z += ah[t];
      }
      for (int64_t t = 0; t < T; ++t) ah[t] /= z;
    }
  });

  // Phase 3: o = sum_t a_t v_t, per-chunk partials [nchunks, H, D] reduced in chunk order.
  std::vector<acc_t> part(nchunks * H * D, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* pc = part.data() + c * H * D;
      const int64_t t1 = std::min(T, (c + 1) * kChunk);
      for (int64_t t = c * kChunk; t < t1; ++t)
        for (int64_t kv = 0; kv < KV; ++kv) {
          const scalar_t* vrow = vp + t * svt + kv * svh;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kv * G + g;
            axpy<acc_t>(pc + h * D, a[h * T + t], vrow, D);
          }
        }
    }
  });
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) {
      acc_t u = 0;
      for (int64_t c = 0; c < nchunks; ++c) u += part[(c * H + h) * D + d];
      o[h * D + d] = u;
    }

  // Phase 4: the groups. Each work item keeps its own A [H], U [H, D] and, for direct recomputes, a
  // membership mark over T (set for the group's members, cleared afterwards).
  at::parallel_for(0, NG, 1, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> A(H), U(H * D), u(D);
    std::vector<char> mark;
    for (int64_t grp = g0; grp < g1; ++grp) {
      std::fill(A.begin(), A.end(), acc_t(0));
      std::fill(U.begin(), U.end(), acc_t(0));
      const int64_t i0 = offsets[grp], i1 = offsets[grp + 1];
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = members[i];
        for (int64_t kv = 0; kv < KV; ++kv) {
          const scalar_t* vrow = vp + t * svt + kv * svh;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kv * G + g;
            const acc_t w = a[h * T + t];
            A[h] += w;
            axpy<acc_t>(U.data() + h * D, w, vrow, D);
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        acc_t* drow = delta + (grp * H + h) * D;
        const acc_t* oh = o + h * D;
        if (!(A[h] > acc_t(0.5))) {
          const acc_t den = acc_t(1) - A[h];
          for (int64_t d = 0; d < D; ++d) drow[d] = (A[h] * oh[d] - U[h * D + d]) / den;
          continue;
        }
        // Direct: softmax over the keys outside the group.
        if (mark.empty()) mark.assign(T, 0);
        for (int64_t i = i0; i < i1; ++i) mark[members[i]] = 1;
        const acc_t* sh = s.data() + h * T;
        acc_t m = ninf;
        for (int64_t t = 0; t < T; ++t)
          if (!mark[t] && sh[t] > m) m = sh[t];
        if (m == ninf) {  // the group holds every key: masked output 0
          for (int64_t d = 0; d < D; ++d) drow[d] = -oh[d];
        } else {
          std::fill(u.begin(), u.end(), acc_t(0));
          acc_t z = 0;
          for (int64_t t = 0; t < T; ++t) {
            if (mark[t]) continue;
            const acc_t e = std::exp(sh[t] - m);
            z += e;
            axpy<acc_t>(u.data(), e, vp + t * svt + (h / G) * svh, D);
          }
          for (int64_t d = 0; d < D; ++d) drow[d] = u[d] / z - oh[d];
        }
        for (int64_t i = i0; i < i1; ++i) mark[members[i]] = 0;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> loo_group_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, double scale,
                                                           const at::Tensor& members_in, const at::Tensor& offsets_in) {
  TORCH_CHECK(q_in.dim() == 2, "maskvl::loo_group_attention: q must be [H, D], got ", q_in.sizes());
  TORCH_CHECK(k_in.dim() == 3 && v_in.dim() == 3 && k_in.sizes() == v_in.sizes(),
              "maskvl::loo_group_attention: k, v must both be [T, KV, D], got ", k_in.sizes(), " and ", v_in.sizes());
  const int64_t H = q_in.size(0), D = q_in.size(1), T = k_in.size(0), KV = k_in.size(1);
  TORCH_CHECK(k_in.size(2) == D, "maskvl::loo_group_attention: head_dim of q (", D, ") and k (", k_in.size(2),
              ") differ");
  TORCH_CHECK(T >= 1 && KV >= 1 && H % KV == 0, "maskvl::loo_group_attention: need T >= 1 and H (", H,
              ") a multiple of KV (", KV, ")");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && k_in.scalar_type() == v_in.scalar_type(),
              "maskvl::loo_group_attention: q, k, v must share one dtype");
  TORCH_CHECK(members_in.dim() == 1 && offsets_in.dim() == 1 && offsets_in.size(0) >= 1 &&
                  !at::isFloatingType(members_in.scalar_type()) && !at::isFloatingType(offsets_in.scalar_type()),
              "maskvl::loo_group_attention: need integer members [M] and offsets [NG + 1]");
  const at::Tensor members = members_in.to(at::kLong).contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const int64_t M = members.size(0), NG = offsets.size(0) - 1;
  const int64_t* mp = members.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[NG] == M, "maskvl::loo_group_attention: offsets must rise from 0 to len(members) = ", M);
  for (int64_t g = 0; g < NG; ++g)
    TORCH_CHECK(op[g + 1] >= op[g], "maskvl::loo_group_attention: offsets must rise from 0 to len(members) = ", M);
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(mp[i] >= 0 && mp[i] < T, "maskvl::loo_group_attention: members must lie in [0, ", T, ")");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  const auto cd = compute_dtype(q.scalar_type());
  at::Tensor o = at::empty({H, D}, q.options().dtype(cd));
  at::Tensor delta = at::empty({NG, H, D}, q.options().dtype(cd));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "maskvl_loo_group_attention", [&] {
    loo_group_attention_impl<scalar_t>(q, k, v, scale, mp, op, NG, o, delta);
  });
  return {o, delta};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskvl, CPU, m) { m.impl("loo_group_attention", &loo_group_attention_cpu); }

}  // namespace maskvl
