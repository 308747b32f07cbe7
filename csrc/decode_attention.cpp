// Shared-prefix batched decode attention (CPU kernel of maskvl::decode_attention).
//
// q [B, H, D], k_prefix/v_prefix [T, KV, D] shared by all B variants, k_own/v_own [B, KV, D],
// scale, exclude [B] int64, optionally exclude_sets [N, T + 1] bool with exclude_set [B] int64
// -> out [B, H, D] in the compute dtype. Variant b attends to the T prefix keys and its own row, minus
// key exclude[b] (-1 or any value outside [0, T]: none, e < T: prefix key e, e == T: its own row) and,
// when exclude_set[b] = n >= 0, minus every key j with exclude_sets[n, j] (group knockout), exactly as
// the reference's masked_fill does. The set lookups are compiled only into the kSets instance, so the
// single-key path runs the same code as without sets. Online softmax over tiles
// of the prefix: each work item is one KV head and a block of variants, so a prefix tile is read once
// per block and reused by every variant and every query head of the group (two small GEMMs per tile);
// the prefix is never expanded per variant. No reduction crosses threads: results are deterministic.
#include "common.h"

namespace maskvl {
namespace {

constexpr int64_t kKeyTile = 128;  // prefix keys per tile
constexpr int64_t kVarBlock = 16;  // variants per work item

template <typename scalar_t, bool kSets>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& kpre, const at::Tensor& vpre,
                           const at::Tensor& kown, const at::Tensor& vown, double scale_d,
                           const at::Tensor& exclude, const bool* sets, int64_t set_stride, const int64_t* set_of,
                           at::Tensor& out_t) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), T = kpre.size(0), KV = kpre.size(1), G = H / KV;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const auto cd = out_t.scalar_type();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kop = kown.data_ptr<scalar_t>();
  const scalar_t* vop = vown.data_ptr<scalar_t>();
  const int64_t* ex = exclude.data_ptr<int64_t>();
  const int64_t sob = kown.stride(0), soh = kown.stride(1), svob = vown.stride(0), svoh = vown.stride(1);
  acc_t* out = out_t.data_ptr<acc_t>();

  // Work item: one KV head and up to kVarBlock variants, i.e. R = variants x G query rows. Per prefix
  // tile, scores [R, tile] = Q K_tile^T and acc += P V_tile are two small GEMMs (BLAS through at::mm on
  // strided views of the prefix: no per-variant copy; bf16/fp16 tiles are upcast tile by tile).
  const int64_t nblocks = (B + kVarBlock - 1) / kVarBlock;
  at::parallel_for(0, KV * nblocks, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t kv = w / nblocks, b0 = (w % nblocks) * kVarBlock, b1 = std::min(B, b0 + kVarBlock);
      const int64_t R = (b1 - b0) * G;  // row r: variant b0 + r / G, head kv * G + r % G
      at::Tensor Q = at::empty({R, D}, out_t.options());
      at::Tensor acc = at::zeros({R, D}, out_t.options());
      acc_t* Qp = Q.data_ptr<acc_t>();
      acc_t* ap = acc.data_ptr<acc_t>();
      for (int64_t r = 0; r < R; ++r) {
        const int64_t b = b0 + r / G, h = kv * G + r % G;
        for (int64_t d = 0; d < D; ++d) Qp[r * D + d] = static_cast<acc_t>(qp[(b * H + h) * D + d]);
      }
      std::vector<acc_t> m(R, ninf), l(R, acc_t(0));
      const at::Tensor kh = kpre.select(1, kv), vh = vpre.select(1, kv);  // [T, D] strided views
      for (int64_t t0 = 0; t0 < T; t0 += kKeyTile) {
        const int64_t n = std::min(kKeyTile, T - t0);
        at::Tensor S = at::mm(Q, kh.narrow(0, t0, n).to(cd).t());  // [R, n]
        acc_t* sp = S.data_ptr<acc_t>();
        for (int64_t r = 0; r < R; ++r) {
          acc_t* srow = sp + r * n;
          const int64_t e = ex[b0 + r / G] - t0;  // excluded key's column in this tile, if any
          acc_t tm = ninf;
          if constexpr (kSets) {
            const int64_t n_set = set_of[b0 + r / G];
            const bool* drop = n_set >= 0 ? sets + n_set * set_stride + t0 : nullptr;
            for (int64_t i = 0; i < n; ++i) {
              srow[i] = (i == e || (drop != nullptr && drop[i])) ? ninf : srow[i] * scale;
              tm = srow[i] > tm ? srow[i] : tm;
            }
          } else {
            for (int64_t i = 0; i < n; ++i) {
              srow[i] = i == e ? ninf : srow[i] * scale;
              tm = srow[i] > tm ? srow[i] : tm;
            }
          }
          const acc_t mn = tm > m[r] ? tm : m[r];
          if (mn == ninf) {  // nothing kept so far in this row: P = 0
            for (int64_t i = 0; i < n; ++i) srow[i] = 0;
            continue;
          }
          const acc_t alpha = std::exp(m[r] - mn);  // exp(-inf) = 0 on the first kept key
          acc_t lsum = l[r] * alpha;
          for (int64_t i = 0; i < n; ++i) {
            srow[i] = std::exp(srow[i] - mn);  // P, 0 for the excluded key
            lsum += srow[i];
          }
          if (alpha != acc_t(1))
            for (int64_t d = 0; d < D; ++d) ap[r * D + d] *= alpha;
          l[r] = lsum;
          m[r] = mn;
        }
        acc.addmm_(S, vh.narrow(0, t0, n).to(cd));
      }
      for (int64_t r = 0; r < R; ++r) {  // the variant's own final-position row, then normalize
        const int64_t b = b0 + r / G, h = kv * G + r % G;
        bool own_out = ex[b] == T;
        if constexpr (kSets) own_out = own_out || (set_of[b] >= 0 && sets[set_of[b] * set_stride + T]);
        const acc_t so = own_out ? ninf : dot<acc_t>(Qp + r * D, kop + b * sob + kv * soh, D) * scale;
        acc_t* a = ap + r * D;
        if (so != ninf) {
          const acc_t mn = so > m[r] ? so : m[r];
          const acc_t alpha = std::exp(m[r] - mn), po = std::exp(so - mn);
          for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          axpy<acc_t>(a, po, vop + b * svob + kv * svoh, D);
          l[r] = l[r] * alpha + po;
        }
        acc_t* o = out + (b * H + h) * D;
        const acc_t inv = acc_t(1) / l[r];  // l = 0 only if every key is excluded (T = 0): NaN like the reference
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      }
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& kpre_in, const at::Tensor& vpre_in,
                                const at::Tensor& kown_in, const at::Tensor& vown_in, double scale,
                                const at::Tensor& exclude_in, const std::optional<at::Tensor>& sets_in,
                                const std::optional<at::Tensor>& set_in) {
  TORCH_CHECK(q_in.dim() == 3, "maskvl::decode_attention: q must be [B, H, D], got ", q_in.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  TORCH_CHECK(kpre_in.dim() == 3 && kpre_in.sizes() == vpre_in.sizes() && kpre_in.size(2) == D,
              "maskvl::decode_attention: k_prefix, v_prefix must both be [T, KV, ", D, "], got ", kpre_in.sizes(),
              " and ", vpre_in.sizes());
  const int64_t KV = kpre_in.size(1);
  TORCH_CHECK(KV >= 1 && H % KV == 0, "maskvl::decode_attention: H (", H, ") must be a multiple of KV (", KV, ")");
  TORCH_CHECK(kown_in.dim() == 3 && kown_in.sizes() == vown_in.sizes() && kown_in.size(0) == B &&
                  kown_in.size(1) == KV && kown_in.size(2) == D,
              "maskvl::decode_attention: k_own, v_own must both be [", B, ", ", KV, ", ", D, "]");
  TORCH_CHECK(exclude_in.dim() == 1 && exclude_in.size(0) == B, "maskvl::decode_attention: exclude must be [", B,
              "]");
  const auto st = q_in.scalar_type();
  TORCH_CHECK(kpre_in.scalar_type() == st && vpre_in.scalar_type() == st && kown_in.scalar_type() == st &&
                  vown_in.scalar_type() == st,
              "maskvl::decode_attention: q, k_prefix, v_prefix, k_own, v_own must share one dtype");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor kpre = last_dim_contiguous(kpre_in), vpre = last_dim_contiguous(vpre_in);
  const at::Tensor kown = last_dim_contiguous(kown_in), vown = last_dim_contiguous(vown_in);
  const at::Tensor exclude = exclude_in.to(at::kLong).contiguous();
  const int64_t T = kpre_in.size(0);
  TORCH_CHECK(sets_in.has_value() == set_in.has_value(),
              "maskvl::decode_attention: exclude_sets and exclude_set go together");
  at::Tensor sets, set_of;
  if (sets_in.has_value()) {
    TORCH_CHECK(sets_in->scalar_type() == at::kBool && sets_in->dim() == 2 && sets_in->size(1) == T + 1,
                "maskvl::decode_attention: exclude_sets must be bool [N, ", T + 1, "], got ", sets_in->sizes());
    TORCH_CHECK(set_in->dim() == 1 && set_in->size(0) == B && !at::isFloatingType(set_in->scalar_type()),
                "maskvl::decode_attention: exclude_set must be integer [", B, "]");
    sets = sets_in->contiguous();
    set_of = set_in->to(at::kLong).contiguous();
    const int64_t* so = set_of.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(so[b] < sets.size(0), "maskvl::decode_attention: exclude_set names set ", so[b], " of ",
                  sets.size(0));
  }
  at::Tensor out = at::empty({B, H, D}, q.options().dtype(compute_dtype(st)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "maskvl_decode_attention", [&] {
    if (sets.defined())
      decode_attention_impl<scalar_t, true>(q, kpre, vpre, kown, vown, scale, exclude, sets.data_ptr<bool>(),
                                            sets.size(1), set_of.data_ptr<int64_t>(), out);
    else
      decode_attention_impl<scalar_t, false>(q, kpre, vpre, kown, vown, scale, exclude, nullptr, 0, nullptr, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskvl, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace maskvl
