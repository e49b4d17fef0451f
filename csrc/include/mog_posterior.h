// mog_posterior (DESIGN.md 3.2): shapes and the per-row math shared by the CPU and CUDA kernels.
//
//   l_k   = logpi_k - 1/2 sum_j [log(2 pi v_kj) + (x_j - c_kj)^2 / v_kj]
//         = bias_k - 1/2 sum_j (x_j s_kj - c_kj s_kj)^2,   s_kj = exp(-log_var_kj / 2)
//   bias_k = logpi_k - 1/2 sum_j (log 2 pi + log_var_kj)
//   lse   = logsumexp_k l_k ; log_resp_k = l_k - lse ; assign = argmax_k l_k
//
// The "scaled difference" form (x s - c s)^2 is two FMAs per element like the matrix-product expansion and has
// no ||x||^2 - 2 x.c + ||c||^2 cancellation, but rounding c*s costs eps*|c s|: kernels using it centre x and c
// on the mean of the means first (the CPU kernel), or form (x - c) * s directly (the CUDA and Triton kernels).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOEK_HD __host__ __device__ __forceinline__
#else
#define MOEK_HD inline
#endif

namespace moekernels {
namespace mog {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

struct Shape {
  int64_t B, D, K;
};

// Per-component constants from log_var (K, D) and logpi (K,): s = exp(-lv/2), cs = c * s, bias.
template <typename T, typename Acc>
MOEK_HD void component_constants(const T* mean_k, const T* log_var_k, T logpi_k, int64_t D, Acc* s_k, Acc* cs_k,
                                 Acc* bias_k) {
  Acc b = static_cast<Acc>(logpi_k) - static_cast<Acc>(0.5 * kLog2Pi) * static_cast<Acc>(D);
  for (int64_t j = 0; j < D; ++j) {
    const Acc lv = static_cast<Acc>(log_var_k[j]);
    const Acc s = exp(-static_cast<Acc>(0.5) * lv);
    s_k[j] = s;
    cs_k[j] = static_cast<Acc>(mean_k[j]) * s;
    b -= static_cast<Acc>(0.5) * lv;
  }
  *bias_k = b;
}

// Epilogue of one row: l (K,) in place -> log_resp; returns lse, writes argmax (first maximum, as torch).
template <typename Acc>
MOEK_HD Acc row_log_softmax(Acc* l, int64_t K, int64_t* argmax) {
  Acc m = l[0];
  int64_t am = 0;
  for (int64_t k = 1; k < K; ++k) {
    if (l[k] > m) {
      m = l[k];
      am = k;
    }
  }
  Acc sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp(l[k] - m);
  const Acc lse = m + log(sum);
  for (int64_t k = 0; k < K; ++k) l[k] -= lse;
  *argmax = am;
  return lse;
}

// Softmax backward of one row: g_k = dL/dl_k from the upstream grads of log_resp (K,) and lse.
//   log_resp = l - lse  =>  g_k = dlr_k - r_k * sum_k' dlr_k' + r_k * dlse,  r = exp(log_resp)
template <typename T, typename Acc>
MOEK_HD void row_grad_logits(const T* dlog_resp, Acc dlse, const T* log_resp, int64_t K, Acc* g) {
  Acc tot = 0;
  for (int64_t k = 0; k < K; ++k) tot += static_cast<Acc>(dlog_resp[k]);
  for (int64_t k = 0; k < K; ++k) {
    const Acc r = exp(static_cast<Acc>(log_resp[k]));
    g[k] = static_cast<Acc>(dlog_resp[k]) + r * (dlse - tot);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Device-friendly helpers (used by csrc/cuda/mog_posterior_cuda.cu; usable on the host too).
//
// PRECISION NOTE (measured, float32, 257 rows x D=16 x K=12 with unit clusters offset by 1e3): the 2-FMA form
// fma(x, s, -(c s))^2 has a max |log_resp| error of 1.5e-3 against float64 (the rounding of c*s ~ 1e3 is
// 3e-5 per element), 25x over the DESIGN.md budget (2x the float32 ref's 2.7e-5, + 1e-5). The direct form
// ((x - c) * s)^2 (x - c exact for nearby values) gives 4.1e-5: within budget. `scaled_diff` is that form
// (3 flops per element instead of 2). Centring x and c on the mean of the means first also rescues the 2-FMA
// form when all components sit near that centre, but not for components far from it (large spread).

// (x_j - c_kj) * s_kj, s = exp(-log_var / 2): the difference first, then the scale (no cancellation).
template <typename Acc>
MOEK_HD Acc scaled_diff(Acc x, Acc c, Acc s) {
  return (x - c) * s;
}

// bias_k = logpi_k - 1/2 (D log 2 pi + sum_j log_var_kj), from the already-reduced sum of log_var over j.
template <typename Acc>
MOEK_HD Acc component_bias(Acc logpi_k, Acc sum_log_var_k, int64_t D) {
  return logpi_k - static_cast<Acc>(0.5) * (static_cast<Acc>(kLog2Pi) * static_cast<Acc>(D) + sum_log_var_k);
}

// Merge the online log-sum-exp state (m, s, arg) with another (m2, s2, arg2): m = max, s = sum exp(l - m),
// arg = the first maximum (the lower index on ties, as torch.argmax). m = -inf, s = 0 is the empty state.
template <typename Acc, typename Index>
MOEK_HD void lse_argmax_merge(Acc& m, Acc& s, Index& arg, Acc m2, Acc s2, Index arg2) {
  if (m2 > m || (m2 == m && arg2 < arg)) arg = arg2;
  const Acc mx = m2 > m ? m2 : m;
  if (mx == -INFINITY) return;  // both empty
  s = s * exp(m - mx) + s2 * exp(m2 - mx);
  m = mx;
}

// One element of the softmax backward: g_k = dlr_k + r_k * coef, r_k = exp(log_resp_k),
// coef = dlse - sum_k' dlr_k' (per row; `row_grad_logits` computes the same for a whole row).
template <typename Acc>
MOEK_HD Acc grad_logit(Acc dlr, Acc log_resp, Acc coef) {
  return dlr + exp(log_resp) * coef;
}

}  // namespace mog
}  // namespace moekernels
