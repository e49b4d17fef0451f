// mog_posterior CUDA kernels (DESIGN.md 3.2). Torch-free: launched by mog_posterior_bind.cpp through the
// launchers declared in mog_posterior_cuda.h. Per-element math comes from csrc/include/mog_posterior.h.
//
// Forward   l_ik = bias_k - 1/2 sum_j ((x_ij - c_kj) s_kj)^2,  s = exp(-log_var/2),
//           bias_k = logpi_k - 1/2 (D log 2pi + sum_j log_var_kj)        (mog_bias_kernel, one block per k)
//   mog_posterior_fwd_kernel: one block per tile of BM rows; it walks the components in tiles of BK and the
//   dimensions in chunks of kBD, staging x (BM x kBD), means and s (BK x kBD) in shared memory. Each thread owns
//   TM rows x TN components (strided so shared-memory reads are conflict-free) and accumulates the direct
//   scaled differences in fp32 FMAs (fp64 for double). No TF32/tensor cores and no ||x||^2 - 2 x.c + ||c||^2
//   expansion: (x - c) is formed first, so data far from the origin keeps its precision. After each component
//   tile, a row's NTX lanes (one warp segment) reduce max/argmax and sum-exp with xor shuffles, and the row's
//   online log-sum-exp state is merged (mog::lse_argmax_merge). With one component tile (K <= BK) the logits
//   stay in registers and log_resp is written once; otherwise raw logits go to a scratch (log_resp itself
//   when T is the accumulation type) and each thread rereads its own entries after the last tile.
// Backward  g_ik = g_lr_ik + r_ik (g_lse_i - sum_k g_lr_ik)                (coef_i by mog_bwd_coef_kernel)
//   dx_ij      = -sum_k g_ik (x_ij - c_kj) w_kj,  w = exp(-log_var)      (mog_bwd_dx_kernel: rows x dims tiles)
//   dmeans_kj  =  w_kj sum_i g_ik (x_ij - c_kj)
//   dlog_var_kj = 1/2 (w_kj sum_i g_ik (x_ij - c_kj)^2 - sum_i g_ik) ;  dlogpi_k = sum_i g_ik
//   mog_bwd_param_kernel: components x dims tiles, each block summing one split of the rows into partials;
//   mog_bwd_finalize_kernel adds the partials in split order (deterministic, no atomics) and applies w.
//   g is recomputed from g_log_resp and the saved log_resp where it is staged (never stored B x K).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "mog_posterior.h"
#include "mog_posterior_cuda.h"
#include "cuda_dtypes.cuh"

namespace moekernels {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBD = 16;   // forward: dimensions per shared-memory chunk
constexpr int kBKc = 16;  // backward dx: components per shared-memory chunk
constexpr int kBI = 16;   // backward params: rows per shared-memory chunk

// ------------------------------------------------------------------------------------------ load / store

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// log_resp: a float16 log-probability below -65504 is stored as -65504 rather than -inf (exp of either is 0), so
// finite inputs never give an infinite log_resp. Other outputs (lse, gradients) are not clamped: an overflowing
// float16 gradient stays inf, as AMP's GradScaler expects.
template <typename T, typename Acc>
__device__ __forceinline__ void store_logp(T* p, Acc v) {
  store(p, v);
}
template <>
__device__ __forceinline__ void store_logp<__half, float>(__half* p, float v) {
  store(p, fmaxf(v, -65504.0f));
}

template <typename Acc>
__device__ __forceinline__ Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// Deterministic block sum (fixed tree); every thread of the block must call it. NT: threads, multiple of 32.
template <int NT, typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block_sum: NT must be a multiple of 32");
  __shared__ Acc warp_sums[NT / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  Acc t = 0;
  if (warp == 0) {
    t = lane < NT / 32 ? warp_sums[lane] : Acc(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(kFullMask, t, off);
  }
  return t;  // valid in warp 0
}

// ------------------------------------------------------------------------------------------ forward
constexpr int kBiasThreads = 128;

// bias_k = logpi_k - 1/2 (D log 2pi + sum_j log_var_kj); one block per component.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kBiasThreads)
    mog_bias_kernel(const T* __restrict__ log_var, const T* __restrict__ logpi, Acc* __restrict__ bias, int D) {
  const int64_t k = blockIdx.x;
  Acc s = 0;
  for (int j = threadIdx.x; j < D; j += kBiasThreads) s += to_acc(log_var[k * D + j]);
  s = block_sum<kBiasThreads>(s);
  if (threadIdx.x == 0) bias[k] = mog::component_bias(static_cast<Acc>(to_acc(logpi[k])), s, D);
}

template <typename T, typename Acc, int BM, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BK / TN), 2)
    mog_posterior_fwd_kernel(const T* __restrict__ x, const T* __restrict__ means, const T* __restrict__ log_var,
                             const Acc* __restrict__ bias, T* log_resp, T* __restrict__ lse_out,
                             int64_t* __restrict__ assign, Acc* raw, int64_t B, int D, int K) {
  constexpr int NTX = BK / TN;  // lanes per row (components)
  constexpr int NTY = BM / TM;  // row groups
  constexpr int NT = NTX * NTY;
  static_assert(BK % TN == 0 && BM % TM == 0, "tile sizes");
  static_assert(NTX <= 32 && 32 % NTX == 0, "a row's component lanes must lie inside one warp");
  static_assert(NT % 32 == 0, "whole warps");

  __shared__ Acc xs[kBD][BM + 1];
  __shared__ Acc ss[kBD][BK + 1];
  __shared__ Acc cs[kBD][BK + 1];

  const int tid = threadIdx.x;
  const int tx = tid % NTX, ty = tid / NTX;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const bool single_tile = K <= BK;

  Acc run_m[TM], run_s[TM];
  int run_a[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    run_m[i] = neg_inf<Acc>();
    run_s[i] = 0;
    run_a[i] = 0;
  }
  Acc l[TM][TN];

  for (int k0 = 0; k0 < K; k0 += BK) {
    Acc acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0;

    for (int d0 = 0; d0 < D; d0 += kBD) {
      const int dn = min(kBD, D - d0);
      __syncthreads();  // the previous chunk's reads are done
      for (int idx = tid; idx < BM * kBD; idx += NT) {
        const int m = idx / kBD, dd = idx % kBD;
        const int64_t r = row0 + m;
        xs[dd][m] = (r < B && dd < dn) ? static_cast<Acc>(to_acc(x[r * D + d0 + dd])) : Acc(0);
      }
      for (int idx = tid; idx < BK * kBD; idx += NT) {
        const int n = idx / kBD, dd = idx % kBD;
        const int k = k0 + n;
        const bool ok = k < K && dd < dn;
        const int64_t off = static_cast<int64_t>(k) * D + d0 + dd;
        ss[dd][n] = ok ? static_cast<Acc>(exp(Acc(-0.5) * static_cast<Acc>(to_acc(log_var[off])))) : Acc(0);
        cs[dd][n] = ok ? static_cast<Acc>(to_acc(means[off])) : Acc(0);
      }
      __syncthreads();
      for (int dd = 0; dd < dn; ++dd) {
        Acc xr[TM], sr[TN], cr[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) xr[i] = xs[dd][ty + i * NTY];
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          sr[j] = ss[dd][tx + j * NTX];
          cr[j] = cs[dd][tx + j * NTX];
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) {
            const Acc t = mog::scaled_diff(xr[i], cr[j], sr[j]);
            acc[i][j] = fma(t, t, acc[i][j]);
          }
      }
    }

    // Logits of this component tile; padding components are -inf.
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int k = k0 + tx + j * NTX;
      const Acc b = k < K ? bias[k] : Acc(0);
#pragma unroll
      for (int i = 0; i < TM; ++i) l[i][j] = k < K ? b - Acc(0.5) * acc[i][j] : neg_inf<Acc>();
    }

    // Per row: tile max/argmax over the row's NTX lanes, then sum exp(l - max), then the online merge.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      Acc m = neg_inf<Acc>();
      int a = 0x7fffffff;
#pragma unroll
      for (int j = 0; j < TN; ++j) {  // ascending k: strict > keeps the first maximum
        if (l[i][j] > m) {
          m = l[i][j];
          a = k0 + tx + j * NTX;
        }
      }
#pragma unroll
      for (int off = NTX / 2; off > 0; off >>= 1) {
        const Acc m2 = __shfl_xor_sync(kFullMask, m, off);
        const int a2 = __shfl_xor_sync(kFullMask, a, off);
        if (m2 > m || (m2 == m && a2 < a)) {
          m = m2;
          a = a2;
        }
      }
      // m is finite: every tile holds at least one real component.
      Acc s = 0;
#pragma unroll
      for (int j = 0; j < TN; ++j) s += exp(l[i][j] - m);
#pragma unroll
      for (int off = NTX / 2; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
      mog::lse_argmax_merge(run_m[i], run_s[i], run_a[i], m, s, a);
    }

    if (!single_tile) {  // raw logits to the scratch; reread below by this same thread
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t r = row0 + ty + i * NTY;
        if (r >= B) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int k = k0 + tx + j * NTX;
          if (k < K) raw[r * K + k] = l[i][j];
        }
      }
    }
  }

  Acc lse[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) lse[i] = run_m[i] + log(run_s[i]);

  if (single_tile) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t r = row0 + ty + i * NTY;
      if (r >= B) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int k = tx + j * NTX;
        if (k < K) store_logp(&log_resp[r * K + k], l[i][j] - lse[i]);
      }
    }
  } else {
    for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t r = row0 + ty + i * NTY;
        if (r >= B) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int k = k0 + tx + j * NTX;
          if (k < K) {
            const Acc v = raw[r * K + k];
            store_logp(&log_resp[r * K + k], v - lse[i]);
          }
        }
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t r = row0 + ty + i * NTY;
      if (r < B) {
        store(&lse_out[r], lse[i]);
        assign[r] = static_cast<int64_t>(run_a[i]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ backward
constexpr int kCoefRows = 8;  // one warp per row

// coef_i = g_lse_i - sum_k g_log_resp_ik
template <typename T, typename Acc>
__global__ void __launch_bounds__(32 * kCoefRows)
    mog_bwd_coef_kernel(const T* __restrict__ g_lr, const T* __restrict__ g_lse, Acc* __restrict__ coef, int64_t B,
                        int K) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCoefRows + (threadIdx.x >> 5);
  if (r >= B) return;  // warp-uniform
  Acc t = 0;
  for (int k = lane; k < K; k += 32) t += static_cast<Acc>(to_acc(g_lr[r * K + k]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(kFullMask, t, off);
  if (lane == 0) coef[r] = static_cast<Acc>(to_acc(g_lse[r])) - t;
}

// dx_ij = -sum_k g_ik (x_ij - c_kj) w_kj : tile BM rows x BN dims, components in chunks of kBKc.
template <typename T, typename Acc, int BM, int BN, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    mog_bwd_dx_kernel(const T* __restrict__ g_lr, const T* __restrict__ lr, const Acc* __restrict__ coef,
                      const T* __restrict__ x, const T* __restrict__ means, const T* __restrict__ log_var,
                      T* __restrict__ dx, int64_t B, int D, int K) {
  constexpr int NTX = BN / TN, NTY = BM / TM, NT = NTX * NTY;
  static_assert(BN % TN == 0 && BM % TM == 0 && NT % 32 == 0, "tile sizes");
  __shared__ Acc gs[kBKc][BM + 1];
  __shared__ Acc cs[kBKc][BN + 1];
  __shared__ Acc ws[kBKc][BN + 1];

  const int tid = threadIdx.x;
  const int tx = tid % NTX, ty = tid / NTX;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int j0 = blockIdx.y * BN;

  Acc xr[TM][TN], acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + ty + i * NTY;
#pragma unroll
    for (int jj = 0; jj < TN; ++jj) {
      const int j = j0 + tx + jj * NTX;
      xr[i][jj] = (r < B && j < D) ? static_cast<Acc>(to_acc(x[r * D + j])) : Acc(0);
      acc[i][jj] = 0;
    }
  }

  for (int k0 = 0; k0 < K; k0 += kBKc) {
    const int kn = min(kBKc, K - k0);
    __syncthreads();
    for (int idx = tid; idx < BM * kBKc; idx += NT) {
      const int m = idx / kBKc, kk = idx % kBKc;
      const int64_t r = row0 + m;
      Acc g = 0;
      if (r < B && kk < kn) {
        const int64_t off = r * K + k0 + kk;
        g = mog::grad_logit(static_cast<Acc>(to_acc(g_lr[off])), static_cast<Acc>(to_acc(lr[off])), coef[r]);
      }
      gs[kk][m] = g;
    }
    for (int idx = tid; idx < kBKc * BN; idx += NT) {
      const int kk = idx / BN, n = idx % BN;
      const int j = j0 + n;
      const bool ok = kk < kn && j < D;
      const int64_t off = static_cast<int64_t>(k0 + kk) * D + j;
      cs[kk][n] = ok ? static_cast<Acc>(to_acc(means[off])) : Acc(0);
      ws[kk][n] = ok ? static_cast<Acc>(exp(-static_cast<Acc>(to_acc(log_var[off])))) : Acc(0);
    }
    __syncthreads();
    for (int kk = 0; kk < kn; ++kk) {
      Acc gr[TM], cr[TN], wr[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) gr[i] = gs[kk][ty + i * NTY];
#pragma unroll
      for (int jj = 0; jj < TN; ++jj) {
        cr[jj] = cs[kk][tx + jj * NTX];
        wr[jj] = ws[kk][tx + jj * NTX];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int jj = 0; jj < TN; ++jj) acc[i][jj] = fma(gr[i], (xr[i][jj] - cr[jj]) * wr[jj], acc[i][jj]);
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + ty + i * NTY;
    if (r >= B) continue;
#pragma unroll
    for (int jj = 0; jj < TN; ++jj) {
      const int j = j0 + tx + jj * NTX;
      if (j < D) store(&dx[r * D + j], -acc[i][jj]);
    }
  }
}

// Partials over one split of the rows, for a tile of BKt components x BN dims:
//   pm[s,k,j] = sum_i g_ik (x_ij - c_kj) ; pv[s,k,j] = sum_i g_ik (x_ij - c_kj)^2 ; pg[s,k] = sum_i g_ik
// grid: x = component tiles * dim tiles (dim fastest), y = splits.
template <typename T, typename Acc, int BKt, int BN, int TK, int TN>
__global__ void __launch_bounds__((BKt / TK) * (BN / TN))
    mog_bwd_param_kernel(const T* __restrict__ g_lr, const T* __restrict__ lr, const Acc* __restrict__ coef,
                         const T* __restrict__ x, const T* __restrict__ means, Acc* __restrict__ pm,
                         Acc* __restrict__ pv, Acc* __restrict__ pg, int64_t B, int D, int K, int64_t rows_per_split,
                         int dim_tiles) {
  constexpr int NTX = BN / TN, NTY = BKt / TK, NT = NTX * NTY;
  static_assert(BN % TN == 0 && BKt % TK == 0 && NT % 32 == 0, "tile sizes");
  __shared__ Acc xs[kBI][BN + 1];
  __shared__ Acc gs[kBI][BKt + 1];

  const int tid = threadIdx.x;
  const int tx = tid % NTX, ty = tid / NTX;
  const int dt = blockIdx.x % dim_tiles, kt = blockIdx.x / dim_tiles;
  const int k0 = kt * BKt, j0 = dt * BN;
  const int64_t split = blockIdx.y;
  const int64_t r_begin = split * rows_per_split;
  const int64_t r_end = min(B, r_begin + rows_per_split);

  Acc cr[TK][TN], am[TK][TN], av[TK][TN], gsum[TK];
#pragma unroll
  for (int kk = 0; kk < TK; ++kk) {
    const int k = k0 + ty + kk * NTY;
    gsum[kk] = 0;
#pragma unroll
    for (int jj = 0; jj < TN; ++jj) {
      const int j = j0 + tx + jj * NTX;
      cr[kk][jj] = (k < K && j < D) ? static_cast<Acc>(to_acc(means[static_cast<int64_t>(k) * D + j])) : Acc(0);
      am[kk][jj] = 0;
      av[kk][jj] = 0;
    }
  }

  for (int64_t i0 = r_begin; i0 < r_end; i0 += kBI) {
    const int in = static_cast<int>(min(static_cast<int64_t>(kBI), r_end - i0));
    __syncthreads();
    for (int idx = tid; idx < kBI * BN; idx += NT) {
      const int ii = idx / BN, n = idx % BN;
      const int j = j0 + n;
      xs[ii][n] = (ii < in && j < D) ? static_cast<Acc>(to_acc(x[(i0 + ii) * D + j])) : Acc(0);
    }
    for (int idx = tid; idx < kBI * BKt; idx += NT) {
      const int ii = idx / BKt, n = idx % BKt;
      const int k = k0 + n;
      Acc g = 0;
      if (ii < in && k < K) {
        const int64_t r = i0 + ii;
        const int64_t off = r * K + k;
        g = mog::grad_logit(static_cast<Acc>(to_acc(g_lr[off])), static_cast<Acc>(to_acc(lr[off])), coef[r]);
      }
      gs[ii][n] = g;
    }
    __syncthreads();
    for (int ii = 0; ii < in; ++ii) {
      Acc xr[TN], gr[TK];
#pragma unroll
      for (int jj = 0; jj < TN; ++jj) xr[jj] = xs[ii][tx + jj * NTX];
#pragma unroll
      for (int kk = 0; kk < TK; ++kk) {
        gr[kk] = gs[ii][ty + kk * NTY];
        gsum[kk] += gr[kk];
      }
#pragma unroll
      for (int kk = 0; kk < TK; ++kk)
#pragma unroll
        for (int jj = 0; jj < TN; ++jj) {
          const Acc t = xr[jj] - cr[kk][jj];
          const Acc u = gr[kk] * t;
          am[kk][jj] += u;
          av[kk][jj] = fma(u, t, av[kk][jj]);
        }
    }
  }

  const int64_t KD = static_cast<int64_t>(K) * D;
#pragma unroll
  for (int kk = 0; kk < TK; ++kk) {
    const int k = k0 + ty + kk * NTY;
    if (k >= K) continue;
#pragma unroll
    for (int jj = 0; jj < TN; ++jj) {
      const int j = j0 + tx + jj * NTX;
      if (j < D) {
        const int64_t off = split * KD + static_cast<int64_t>(k) * D + j;
        pm[off] = am[kk][jj];
        pv[off] = av[kk][jj];
      }
    }
    if (dt == 0 && tx == 0) pg[split * K + k] = gsum[kk];
  }
}

// Sum the partials over the splits in order; dmeans = w M, dlog_var = (w V - G) / 2, dlogpi = G.
// One block per component (grid-stride), threads over the dimensions.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256)
    mog_bwd_finalize_kernel(const Acc* __restrict__ pm, const Acc* __restrict__ pv, const Acc* __restrict__ pg,
                            const T* __restrict__ log_var, T* __restrict__ dmeans, T* __restrict__ dlog_var,
                            T* __restrict__ dlogpi, int D, int K, int splits) {
  const int64_t KD = static_cast<int64_t>(K) * D;
  for (int k = blockIdx.x; k < K; k += gridDim.x) {
    Acc G = 0;
    for (int s = 0; s < splits; ++s) G += pg[static_cast<int64_t>(s) * K + k];
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
      const int64_t idx = static_cast<int64_t>(k) * D + j;
      Acc M = 0, V = 0;
      for (int s = 0; s < splits; ++s) {
        M += pm[s * KD + idx];
        V += pv[s * KD + idx];
      }
      const Acc w = exp(-static_cast<Acc>(to_acc(log_var[idx])));
      store(&dmeans[idx], w * M);
      store(&dlog_var[idx], Acc(0.5) * (w * V - G));
    }
    if (threadIdx.x == 0) store(&dlogpi[k], G);
  }
}

// ------------------------------------------------------------------------------------------ host side
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_up(size_t n) { return (n + 255) & ~static_cast<size_t>(255); }

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat64:
      return f(double{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Forward tile configs: small K -> (BM=128, BK=16, TM=4, TN=2); else (64, 64, 4, 4). 256 threads each.
constexpr int kFwdSmallK = 16;
constexpr int kFwdBigK = 64;
inline int fwd_bk(int64_t K) { return K <= kFwdSmallK ? kFwdSmallK : kFwdBigK; }

// Backward parameter tile: (BKt, BN) = (16, 64) for K <= 16, (64, 16) for D <= 16, else (64, 64).
struct ParamTile {
  int bk, bn;
};
inline ParamTile param_tile(int64_t D, int64_t K) {
  if (K <= 16) return {16, 64};
  if (D <= 16) return {64, 16};
  return {64, 64};
}

inline int64_t rows_per_split(int64_t B, int splits) {
  const int64_t r = ceil_div(B > 0 ? B : 1, splits);
  return ceil_div(r, kBI) * kBI;
}

template <int BK, int BN, int TK, int TN, typename T, typename Acc>
void launch_param(const T* g_lr, const T* lr, const Acc* coef, const T* x, const T* means, Acc* pm, Acc* pv, Acc* pg,
                  int64_t B, int D, int K, int splits, cudaStream_t stream) {
  const int dim_tiles = static_cast<int>(ceil_div(D > 0 ? D : 1, BN));  // >= 1 so dlogpi is formed when D = 0
  const int64_t tiles = ceil_div(K, BK) * dim_tiles;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  mog_bwd_param_kernel<T, Acc, BK, BN, TK, TN><<<grid, (BK / TK) * (BN / TN), 0, stream>>>(
      g_lr, lr, coef, x, means, pm, pv, pg, B, D, K, rows_per_split(B, splits), dim_tiles);
}

}  // namespace

// ------------------------------------------------------------------------------------------ launchers
size_t mog_posterior_fwd_workspace_bytes(DType dtype, int64_t B, int64_t D, int64_t K) {
  (void)D;
  const size_t a = acc_size(dtype);
  size_t bytes = align_up(static_cast<size_t>(K) * a);  // bias
  const bool needs_scratch = K > fwd_bk(K) && dtype != DType::kFloat32 && dtype != DType::kFloat64;
  if (needs_scratch) bytes += align_up(static_cast<size_t>(B) * static_cast<size_t>(K) * a);
  return bytes;
}

cudaError_t mog_posterior_fwd_cuda(DType dtype, const void* x, const void* means, const void* log_var,
                                   const void* logpi, void* log_resp, void* lse, int64_t* assign, void* workspace,
                                   int64_t B, int64_t D, int64_t K, cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    const T* x_ = static_cast<const T*>(x);
    const T* m_ = static_cast<const T*>(means);
    const T* lv_ = static_cast<const T*>(log_var);
    const T* lp_ = static_cast<const T*>(logpi);
    T* lr_ = static_cast<T*>(log_resp);
    char* ws = static_cast<char*>(workspace);
    Acc* bias = reinterpret_cast<Acc*>(ws);
    Acc* raw = nullptr;
    if (K > fwd_bk(K)) {
      raw = std::is_same<T, Acc>::value ? reinterpret_cast<Acc*>(lr_)
                                        : reinterpret_cast<Acc*>(ws + align_up(static_cast<size_t>(K) * sizeof(Acc)));
    }
    mog_bias_kernel<T, Acc><<<static_cast<unsigned>(K), kBiasThreads, 0, stream>>>(lv_, lp_, bias,
                                                                                    static_cast<int>(D));
    const int Di = static_cast<int>(D), Ki = static_cast<int>(K);
    if (K <= kFwdSmallK) {
      constexpr int BM = 128, BK = kFwdSmallK, TM = 4, TN = 2;
      mog_posterior_fwd_kernel<T, Acc, BM, BK, TM, TN>
          <<<static_cast<unsigned>(ceil_div(B, BM)), (BM / TM) * (BK / TN), 0, stream>>>(
              x_, m_, lv_, bias, lr_, static_cast<T*>(lse), assign, raw, B, Di, Ki);
    } else {
      constexpr int BM = 64, BK = kFwdBigK, TM = 4, TN = 4;
      mog_posterior_fwd_kernel<T, Acc, BM, BK, TM, TN>
          <<<static_cast<unsigned>(ceil_div(B, BM)), (BM / TM) * (BK / TN), 0, stream>>>(
              x_, m_, lv_, bias, lr_, static_cast<T*>(lse), assign, raw, B, Di, Ki);
    }
    return cudaGetLastError();
  });
}

int mog_posterior_bwd_splits(DType dtype, int64_t B, int64_t D, int64_t K) {
  (void)dtype;
  if (B <= 0 || K <= 0) return 1;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // clear, fall back to a guess
    sms = 108;
  }
  const ParamTile pt = param_tile(D, K);
  const int64_t tiles = ceil_div(K, pt.bk) * ceil_div(D > 0 ? D : 1, pt.bn);
  const int64_t target = 4 * static_cast<int64_t>(sms);     // blocks wanted in flight
  int64_t splits = ceil_div(target, tiles);
  splits = splits < ceil_div(B, 64) ? splits : ceil_div(B, 64);  // at least 64 rows per split
  if (splits > 4096) splits = 4096;
  if (splits < 1) splits = 1;
  return static_cast<int>(splits);
}

size_t mog_posterior_bwd_workspace_bytes(DType dtype, int64_t B, int64_t D, int64_t K, int splits) {
  const size_t a = acc_size(dtype);
  const size_t S = static_cast<size_t>(splits > 0 ? splits : 1);
  return align_up(static_cast<size_t>(B) * a) + 2 * align_up(S * static_cast<size_t>(K) * static_cast<size_t>(D) * a) +
         align_up(S * static_cast<size_t>(K) * a);
}

cudaError_t mog_posterior_bwd_cuda(DType dtype, const void* g_log_resp, const void* g_lse, const void* x,
                                   const void* means, const void* log_var, const void* log_resp, void* dx,
                                   void* dmeans, void* dlog_var, void* dlogpi, void* workspace, int64_t B,
                                   int64_t D, int64_t K, int splits, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  if (splits < 1) splits = 1;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    const T* glr_ = static_cast<const T*>(g_log_resp);
    const T* glse_ = static_cast<const T*>(g_lse);
    const T* x_ = static_cast<const T*>(x);
    const T* m_ = static_cast<const T*>(means);
    const T* lv_ = static_cast<const T*>(log_var);
    const T* lr_ = static_cast<const T*>(log_resp);
    const size_t S = static_cast<size_t>(splits);
    const size_t KD = static_cast<size_t>(K) * static_cast<size_t>(D);
    char* ws = static_cast<char*>(workspace);
    Acc* coef = reinterpret_cast<Acc*>(ws);
    ws += align_up(static_cast<size_t>(B) * sizeof(Acc));
    Acc* pm = reinterpret_cast<Acc*>(ws);
    ws += align_up(S * KD * sizeof(Acc));
    Acc* pv = reinterpret_cast<Acc*>(ws);
    ws += align_up(S * KD * sizeof(Acc));
    Acc* pg = reinterpret_cast<Acc*>(ws);
    const int Di = static_cast<int>(D), Ki = static_cast<int>(K);

    if (B > 0) {
      mog_bwd_coef_kernel<T, Acc><<<static_cast<unsigned>(ceil_div(B, kCoefRows)), 32 * kCoefRows, 0, stream>>>(
          glr_, glse_, coef, B, Ki);
    }
    if (B > 0 && D > 0) {
      if (D <= 16) {
        constexpr int BM = 128, BN = 16, TM = 4, TN = 2;
        const dim3 grid(static_cast<unsigned>(ceil_div(B, BM)), static_cast<unsigned>(ceil_div(D, BN)));
        mog_bwd_dx_kernel<T, Acc, BM, BN, TM, TN><<<grid, (BM / TM) * (BN / TN), 0, stream>>>(
            glr_, lr_, coef, x_, m_, lv_, static_cast<T*>(dx), B, Di, Ki);
      } else {
        constexpr int BM = 64, BN = 64, TM = 4, TN = 4;
        const dim3 grid(static_cast<unsigned>(ceil_div(B, BM)), static_cast<unsigned>(ceil_div(D, BN)));
        mog_bwd_dx_kernel<T, Acc, BM, BN, TM, TN><<<grid, (BM / TM) * (BN / TN), 0, stream>>>(
            glr_, lr_, coef, x_, m_, lv_, static_cast<T*>(dx), B, Di, Ki);
      }
    }
    const ParamTile pt = param_tile(D, K);
    if (pt.bk == 16) {
      launch_param<16, 64, 1, 4>(glr_, lr_, coef, x_, m_, pm, pv, pg, B, Di, Ki, splits, stream);
    } else if (pt.bn == 16) {
      launch_param<64, 16, 4, 1>(glr_, lr_, coef, x_, m_, pm, pv, pg, B, Di, Ki, splits, stream);
    } else {
      launch_param<64, 64, 4, 4>(glr_, lr_, coef, x_, m_, pm, pv, pg, B, Di, Ki, splits, stream);
    }
    const int64_t blocks = K < 4096 ? K : 4096;
    const int threads = D >= 256 ? 256 : (D > 32 ? static_cast<int>(ceil_div(D, 32) * 32) : 32);
    mog_bwd_finalize_kernel<T, Acc><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        pm, pv, pg, lv_, static_cast<T*>(dmeans), static_cast<T*>(dlog_var), static_cast<T*>(dlogpi), Di, Ki,
        splits);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace moekernels
