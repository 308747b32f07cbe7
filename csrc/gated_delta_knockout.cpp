// Gated-delta-rule knockout for the final position (CPU kernel of maskvl::gated_delta_knockout).
//
// q [Hk, dk], k [T, Hk, dk], v [T, Hv, dv] (any strides with a contiguous last dim), g, beta [T, Hv],
// scale, qk_l2norm -> o [Hv, dv], delta [T, Hv, dv] in the compute dtype (double for double q, float
// otherwise; g and beta are cast to it). Value head h reads key head h / (Hv / Hk). The derivation is in
// maskvl/ops/gated_delta_knockout.py; per value head, with k and q L2-normalised (q also scaled):
//   reverse scan  u_{T-1} = q,  c_p = <k_p, u_p>,  u_{p-1} = a_p (u_p - beta_p c_p k_p)      (a_p = exp(g_p))
//   forward scan  x_p = S^T k_p,  z_p = S^T u_p   (S = S_{p-1}, the clean state before step p)
//                 w_p = beta_p (v_p - a_p x_p),  delta_p = -expm1(g_p) z_p - c_p w_p,  S <- a_p S + k_p w_p^T
//   o = S_{T-1}^T q.
// The forward step is one sweep over the rows of S [dk, dv]: row i is updated (a S_i + k_i w) and at once
// accumulated into the next step's x and z (or into o after the last step), so S is read and written once
// per position. BLAS would not pay here: per position the work is a rank-1 update and two matrix-vector
// products of one [dk, dv] state, which separate gemv/ger calls would make three passes over S.
// Heads run in parallel (at::parallel_for); each keeps its state [dk, dv] and its u [T, dk] (the size of k;
// no per-position states are kept). Per head the arithmetic order is fixed, so results do not depend on
// the thread count.
#include "common.h"

namespace maskvl {
namespace {

constexpr double kL2NormEps = 1e-6;  // transformers' l2norm (models/qwen3_5/modeling_qwen3_5.py)

template <typename scalar_t>
void gated_delta_knockout_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                               const at::Tensor& beta, double scale_d, bool l2norm, at::Tensor& o_out,
                               at::Tensor& delta_out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t T = k.size(0), Hk = k.size(1), dk = k.size(2), Hv = v.size(1), dv = v.size(2), G = Hv / Hk;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const acc_t* gp = g.data_ptr<acc_t>();
  const acc_t* bp = beta.data_ptr<acc_t>();
  const int64_t skt = k.stride(0), skh = k.stride(1), svt = v.stride(0), svh = v.stride(1);
  acc_t* o = o_out.data_ptr<acc_t>();
  acc_t* delta = delta_out.data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(kL2NormEps);
  const acc_t scale = static_cast<acc_t>(scale_d);

  // Inverse key norms [T, Hk] (shared by the G value heads of a key head), and q_hat [Hk, dk].
  std::vector<acc_t> kinv(T * Hk, acc_t(1));
  if (l2norm) {
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t kh = 0; kh < Hk; ++kh) {
          const scalar_t* row = kp + t * skt + kh * skh;
          kinv[t * Hk + kh] = acc_t(1) / std::sqrt(dot<acc_t>(row, row, dk) + eps);
        }
    });
  }
  std::vector<acc_t> qhat(Hk * dk);
  for (int64_t kh = 0; kh < Hk; ++kh) {
    const scalar_t* row = qp + kh * dk;
    const acc_t r = l2norm ? acc_t(1) / std::sqrt(dot<acc_t>(row, row, dk) + eps) : acc_t(1);
    for (int64_t i = 0; i < dk; ++i) qhat[kh * dk + i] = static_cast<acc_t>(row[i]) * r * scale;
  }

  at::parallel_for(0, Hv, 1, [&](int64_t h0, int64_t h1) {
    std::vector<acc_t> u(T * dk), c(T), cur(dk), kb(dk), kn(dk), S(dk * dv), x(dv), z(dv), w(dv);
    // The normalised key row k_t of this head, exactly as the reference forms it (k * rsqrt(|k|^2 + eps)).
    auto load_key = [&](int64_t t, int64_t kh, acc_t* dst) {
      const scalar_t* row = kp + t * skt + kh * skh;
      const acc_t r = kinv[t * Hk + kh];
      for (int64_t i = 0; i < dk; ++i) dst[i] = static_cast<acc_t>(row[i]) * r;
    };
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t kh = h / G;
      const acc_t* qh = qhat.data() + kh * dk;
      // Reverse scan: u_p and c_p for p = T-1 .. 0.
      std::copy(qh, qh + dk, cur.begin());
      for (int64_t p = T - 1; p >= 0; --p) {
        load_key(p, kh, kb.data());
        std::copy(cur.begin(), cur.end(), u.begin() + p * dk);
        const acc_t cp = dot<acc_t>(kb.data(), cur.data(), dk);
        c[p] = cp;
        const acc_t a = std::exp(gp[p * Hv + h]);
        const acc_t coef = bp[p * Hv + h] * cp;
        for (int64_t i = 0; i < dk; ++i) cur[i] = a * (cur[i] - coef * kb[i]);
      }
      // Forward scan. S_{-1} = 0, so x_0 = z_0 = 0.
      std::fill(S.begin(), S.end(), acc_t(0));
      std::fill(x.begin(), x.end(), acc_t(0));
      std::fill(z.begin(), z.end(), acc_t(0));
      load_key(0, kh, kb.data());
      acc_t* oh = o + h * dv;
      for (int64_t p = 0; p < T; ++p) {
        const acc_t gv = gp[p * Hv + h];
        const acc_t a = std::exp(gv);
        const acc_t one_minus_a = -std::expm1(gv);
        const acc_t b = bp[p * Hv + h];
        const acc_t cp = c[p];
        const scalar_t* vrow = vp + p * svt + h * svh;
        acc_t* drow = delta + (p * Hv + h) * dv;
        for (int64_t j = 0; j < dv; ++j) {
          w[j] = b * (static_cast<acc_t>(vrow[j]) - a * x[j]);
          drow[j] = one_minus_a * z[j] - cp * w[j];
        }
        // One sweep: S <- a S + k_p w^T, accumulating the next step's x, z (or o after the last step).
        const bool last = p + 1 == T;
        const acc_t* nk = qh;  // after the last step: o = S^T q_hat (into x)
        const acc_t* nu = nullptr;
        if (!last) {
          load_key(p + 1, kh, kn.data());
          nk = kn.data();
          nu = u.data() + (p + 1) * dk;
        }
        std::fill(x.begin(), x.end(), acc_t(0));
        std::fill(z.begin(), z.end(), acc_t(0));
        for (int64_t i = 0; i < dk; ++i) {
          acc_t* Si = S.data() + i * dv;
          const acc_t ki = kb[i], nki = nk[i];
          if (last) {
            for (int64_t j = 0; j < dv; ++j) {
              Si[j] = a * Si[j] + ki * w[j];
              x[j] += nki * Si[j];
            }
          } else {
            const acc_t nui = nu[i];
            for (int64_t j = 0; j < dv; ++j) {
              Si[j] = a * Si[j] + ki * w[j];
              x[j] += nki * Si[j];
              z[j] += nui * Si[j];
            }
          }
        }
        std::swap(kb, kn);
      }
      std::copy(x.begin(), x.end(), oh);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gated_delta_knockout_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const at::Tensor& v_in, const at::Tensor& g_in,
                                                            const at::Tensor& beta_in, double scale, bool qk_l2norm) {
  TORCH_CHECK(q_in.dim() == 2 && k_in.dim() == 3 && v_in.dim() == 3 && g_in.dim() == 2 && beta_in.dim() == 2,
              "maskvl::gated_delta_knockout: need q [Hk, dk], k [T, Hk, dk], v [T, Hv, dv], g = beta [T, Hv]");
  const int64_t T = k_in.size(0), Hk = k_in.size(1), dk = k_in.size(2), Hv = v_in.size(1), dv = v_in.size(2);
  TORCH_CHECK(q_in.size(0) == Hk && q_in.size(1) == dk && v_in.size(0) == T && g_in.size(0) == T &&
                  g_in.size(1) == Hv && beta_in.sizes() == g_in.sizes(),
              "maskvl::gated_delta_knockout: need q [Hk, dk], k [T, Hk, dk], v [T, Hv, dv], g = beta [T, Hv]; got ",
              q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes(), ", ", g_in.sizes(), ", ", beta_in.sizes());
  TORCH_CHECK(T >= 1 && Hk >= 1 && Hv % Hk == 0, "maskvl::gated_delta_knockout: need T >= 1 and Hv (", Hv,
              ") a multiple of Hk (", Hk, ")");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && k_in.scalar_type() == v_in.scalar_type(),
              "maskvl::gated_delta_knockout: q, k, v must share one dtype");
  TORCH_CHECK(at::isFloatingType(g_in.scalar_type()) && at::isFloatingType(beta_in.scalar_type()),
              "maskvl::gated_delta_knockout: g and beta must be floating point");
  const auto cd = compute_dtype(q_in.scalar_type());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = last_dim_contiguous(k_in);
  const at::Tensor v = last_dim_contiguous(v_in);
  const at::Tensor g = g_in.to(cd).contiguous();  // [T, Hv]: small next to k and v
  const at::Tensor beta = beta_in.to(cd).contiguous();
  // NaN-filled, so that an element the kernel failed to write can never pass for a result.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  at::Tensor o = at::full({Hv, dv}, nan, q.options().dtype(cd));
  at::Tensor delta = at::full({T, Hv, dv}, nan, q.options().dtype(cd));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "maskvl_gated_delta_knockout", [&] {
    gated_delta_knockout_impl<scalar_t>(q, k, v, g, beta, scale, qk_l2norm, o, delta);
  });
  return {o, delta};
}

}  // namespace

TORCH_LIBRARY_IMPL(maskvl, CPU, m) { m.impl("gated_delta_knockout", &gated_delta_knockout_cpu); }

}  // namespace maskvl
