// molr_mog_score (DESIGN.md 3.1): shapes and the per-row math shared by the CPU and CUDA kernels.
//
// Per row (x (D), s, gamma; experts k < K with bases A_k (D, d); components l < L):
//   z_k   = A_k^T x                           (the caller's GEMM; A = None: z_k = x for every k, D == d)
//   e_kl  = z_k - s mu_kl ;  m_kl = s^2 exp(log_var_kl) + gamma^2
//   l_kl  = logpi_kl - 1/2 sum_i [log m_kl,i + e_kl,i^2 / m_kl,i] + (||z_k||^2 - ||x||^2) / (2 gamma^2)
//           - (D - d)/2 log gamma^2 - D/2 log(2 pi)
//   lse   = logsumexp_kl l_kl ;  w_kl = exp(l_kl - lse)
//   c_k   = sum_l w_kl (z_k / gamma^2 - e_kl / m_kl) ;  score = -x / gamma^2 + sum_k A_k c_k   (the caller's GEMM)
//
// Numerics (read this before writing a kernel):
//  * The row constant R = -(D-d)/2 log gamma^2 - D/2 log 2pi is kept OUT of the logits: the softmax runs on
//    l'_kl = bias_kl - 1/2 quad_kl + (||z_k||^2 - ||x||^2) / (2 gamma^2)   (bias_kl = logpi_kl - 1/2 sum log m)
//    and lse = logsumexp(l') + R. (||z_k||^2 - ||x||^2) is formed first, then scaled: with gamma = 1e-4 the two
//    norms over 2 gamma^2 are ~1e14 and must not be added to the small terms one by one.
//  * Identity (A = None): z_k = x, so the (||z||^2 - ||x||^2) term is exactly 0 and is skipped, and
//    score = -x/gamma^2 + sum_kl w_kl (x/gamma^2 - e_kl/m_kl) = -sum_kl w_kl e_kl / m_kl (sum w = 1): the
//    identity path computes the score in this form directly (no 1/gamma^2 cancellation), and its backward uses
//    dx = sum_kl de_kl (the -G/gamma^2, W_k G/gamma^2, dl z/gamma^2 and -dlse x/gamma^2 terms cancel exactly).
//  * Backward: recompute the logits l' and take w = softmax(l') again (max-shifted, renormalised) rather than
//    exp(l - lse_saved): lse is ~ -||x||^2 / (2 gamma^2) and, rounded to float32, has an absolute error of up to
//    ulp(lse)/2 (0.06 at ||x||^2/(2 gamma^2) = 1.5e6), which exp(l - lse) would turn into a relative error of w.
//    K*L is small, so recomputing the max and the sum costs nothing; `row_weights` does it.
//
// Backward (G = dL/dscore, dlse, optional g_w = dL/dw):
//   dc_k  = A_k^T G  (caller's GEMM; identity: dc_k = G)
//   dw_kl = g_w_kl + dc_k . (z_k/gamma^2 - e_kl/m_kl)      (identity: g_w_kl - G . e_kl/m_kl)
//   dl_kl = w_kl (dw_kl - sum w dw) + w_kl dlse             (computed by row_dlogits_split: see there why)
//   de_kl = -w_kl dc_k / m_kl - dl_kl e_kl / m_kl
//   dm_kl =  w_kl dc_k e_kl / m_kl^2 - dl_kl / 2 (1/m_kl - e_kl^2/m_kl^2)
//   dz_k  = (W_k dc_k + (sum_l dl_kl) z_k) / gamma^2 + sum_l de_kl            (W_k = sum_l w_kl)
//   dmu_kl = -s de_kl ; dlog_var_kl = s^2 exp(log_var_kl) dm_kl ; dlogpi_kl = dl_kl
//   dx = -G/gamma^2 + sum_k A_k dz_k - dlse x / gamma^2 (caller's GEMM) ; dA_k = sum_rows G c_k^T + x dz_k^T
//        (use the computed sum_kl dl_kl for dlse here, not the incoming dlse: the term then cancels the
//         (sum_l dl_kl) z_k / gamma^2 parts of dz consistently, as autograd through the formula does)
//   identity: dx = sum_kl de_kl, no dA.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOEK_HD __host__ __device__ __forceinline__
#else
#define MOEK_HD inline
#endif

namespace moekernels {
namespace molr {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

struct Shape {
  int64_t B, D, K, L, d;
  bool identity;  // A = None: D == d, z_k = x
};

// ------------------------------------------------------------------------------------------- constants
// Constants of one component (k, l) for one (s, gamma): inv_m[i] = 1/m_kl,i, smu[i] = s mu_kl,i;
// returns bias_kl = logpi_kl - 1/2 sum_i log m_kl,i.   v[i] = exp(log_var_kl,i) (precomputed by the caller).
template <typename Acc, typename TV, typename TM>
MOEK_HD Acc kl_constants(const TM* mu_kl, const TV* v_kl, Acc logpi_kl, Acc s, Acc gamma2, int64_t d, Acc* inv_m,
                         Acc* smu) {
  const Acc s2 = s * s;
  Acc sum_log = 0;
  for (int64_t i = 0; i < d; ++i) {
    const Acc m = s2 * static_cast<Acc>(v_kl[i]) + gamma2;
    inv_m[i] = Acc(1) / m;
    smu[i] = s * static_cast<Acc>(mu_kl[i]);
    sum_log += log(m);
  }
  return logpi_kl - Acc(0.5) * sum_log;
}

// The part of l common to every component of a row and kept out of the softmax:
//   R = -(D - d)/2 log gamma^2 - D/2 log(2 pi)
template <typename Acc>
MOEK_HD Acc row_constant(int64_t D, int64_t d, Acc gamma2) {
  return -Acc(0.5) * static_cast<Acc>(D - d) * log(gamma2) - Acc(0.5 * kLog2Pi) * static_cast<Acc>(D);
}

// ------------------------------------------------------------------------------------------- forward
// l'_kl = bias_kl - 1/2 sum_i (z_i - s mu_i)^2 / m_i + proj_k, where proj_k = (||z_k||^2 - ||x||^2) / (2 gamma^2)
// (0 for the identity).
template <typename Acc>
MOEK_HD Acc kl_logit(const Acc* z_k, const Acc* smu, const Acc* inv_m, int64_t d, Acc bias, Acc proj_k) {
  Acc q = 0;
  for (int64_t i = 0; i < d; ++i) {
    const Acc e = z_k[i] - smu[i];
    q += e * e * inv_m[i];
  }
  return bias - Acc(0.5) * q + proj_k;
}

// Max-shifted softmax of n logits in place (l -> w); returns logsumexp(l).
template <typename Acc>
MOEK_HD Acc row_weights(Acc* l, int64_t n) {
  Acc mx = l[0];
  for (int64_t j = 1; j < n; ++j) mx = l[j] > mx ? l[j] : mx;
  Acc sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const Acc e = exp(l[j] - mx);
    l[j] = e;
    sum += e;
  }
  const Acc inv = Acc(1) / sum;
  for (int64_t j = 0; j < n; ++j) l[j] *= inv;
  return mx + log(sum);
}

// c_k = sum_l w_kl (z_k/gamma^2 - e_kl/m_kl) = W_k z_k / gamma^2 - sum_l w_kl (z_k - s mu_kl) / m_kl   (general A)
// For the identity, call with inv_gamma2 = 0 and accumulate every k into the same c: c = -sum_kl w e/m = score.
// c is overwritten (accumulate = false) or added to (accumulate = true). smu_k / inv_m_k hold the L components
// of expert k, kl_stride apart (default d: packed).
template <typename Acc>
MOEK_HD void expert_c(const Acc* z_k, const Acc* w_k, const Acc* smu_k, const Acc* inv_m_k, int64_t L, int64_t d,
                      Acc inv_gamma2, Acc* c, bool accumulate, int64_t kl_stride = 0) {
  const int64_t st = kl_stride > 0 ? kl_stride : d;
  Acc W = 0;
  for (int64_t l = 0; l < L; ++l) W += w_k[l];
  for (int64_t i = 0; i < d; ++i) {
    Acc acc = W * inv_gamma2 * z_k[i];
    for (int64_t l = 0; l < L; ++l) acc -= w_k[l] * (z_k[i] - smu_k[l * st + i]) * inv_m_k[l * st + i];
    c[i] = accumulate ? c[i] + acc : acc;
  }
}

// ------------------------------------------------------------------------------------------- backward
// dw_kl = g_w_kl + dc_k . (z_k * inv_gamma2 - e_kl / m_kl)   (identity: inv_gamma2 = 0, dc_k = G)
template <typename Acc>
MOEK_HD Acc kl_dw(const Acc* dc_k, const Acc* z_k, const Acc* smu, const Acc* inv_m, int64_t d, Acc inv_gamma2,
                  Acc g_w) {
  Acc t = 0;
  for (int64_t i = 0; i < d; ++i) t += dc_k[i] * (z_k[i] * inv_gamma2 - (z_k[i] - smu[i]) * inv_m[i]);
  return g_w + t;
}

// Softmax backward in place: dw (n) -> dl_kl = w (dw - sum w dw) + w dlse   (sum_kl dl_kl = dlse).
template <typename Acc>
MOEK_HD void row_dlogits(const Acc* w, Acc* dw, int64_t n, Acc dlse) {
  Acc tot = 0;
  for (int64_t j = 0; j < n; ++j) tot += w[j] * dw[j];
  for (int64_t j = 0; j < n; ++j) dw[j] = w[j] * (dw[j] - tot + dlse);
}

// Softmax backward with the expert-constant part of dw split off. dw_kl = a_k + b_kl, where
//   a_k  = dc_k . z_k / gamma^2        (~1/gamma^2 large, the same for every l of expert k; 0 for the identity)
//   b_kl = g_w_kl - dc_k . e_kl / m_kl (kl_dw with inv_gamma2 = 0)
// dl_kl = w_kl [(a_k - sum_k' W_k' a_k') + (b_kl - sum w b) + dlse], with a_k - abar formed as
// sum_k' W_k' (a_k - a_k'): its rounding error then scales with (1 - W_k) |a| rather than with |a| (forming
// dw = a + b first and then dw - sum w dw loses eps |a| / gamma^2 in dx; 10x the ref's float32 error at gamma=1e-2).
// W (K) holds W_k = sum_l w_kl on return. b (K*L) is overwritten with dl.
template <typename Acc>
MOEK_HD void row_dlogits_split(const Acc* w, const Acc* a, Acc* b, Acc* W, int64_t K, int64_t L, Acc dlse) {
  Acc bbar = 0;
  for (int64_t k = 0; k < K; ++k) {
    Acc Wk = 0;
    for (int64_t l = 0; l < L; ++l) {
      Wk += w[k * L + l];
      bbar += w[k * L + l] * b[k * L + l];
    }
    W[k] = Wk;
  }
  for (int64_t k = 0; k < K; ++k) {
    Acc da = 0;
    for (int64_t k2 = 0; k2 < K; ++k2) da += W[k2] * (a[k] - a[k2]);
    for (int64_t l = 0; l < L; ++l) b[k * L + l] = w[k * L + l] * (da + (b[k * L + l] - bbar) + dlse);
  }
}

// One component's backward through e and m: accumulates dz_k[i] += de_i, dmu_acc[i] += -s de_i,
// dvar_acc[i] += s^2 dm_i (the caller multiplies by exp(log_var) once at the end).
//   de = -w dc / m - dl e / m ;  dm = w dc e / m^2 - dl/2 (1/m - e^2/m^2)
template <typename Acc>
MOEK_HD void kl_backward(const Acc* dc_k, const Acc* z_k, const Acc* smu, const Acc* inv_m, int64_t d, Acc w, Acc dl,
                         Acc s, Acc* dz_k, Acc* dmu_acc, Acc* dvar_acc) {
  const Acc s2 = s * s;
  for (int64_t i = 0; i < d; ++i) {
    const Acc im = inv_m[i];
    const Acc e = z_k[i] - smu[i];
    const Acc ei = e * im;
    const Acc wdc = w * dc_k[i];
    const Acc de = -(wdc + dl * e) * im;
    const Acc dm = wdc * ei * im - Acc(0.5) * dl * (im - ei * ei);
    dz_k[i] += de;
    dmu_acc[i] -= s * de;
    dvar_acc[i] += s2 * dm;
  }
}

}  // namespace molr
}  // namespace moekernels
