// molr_mog_score (DESIGN.md 3.1): fused CUDA forward and backward. The per-element math is the shared
// host/device code of csrc/include/molr_mog_score.h (read its "Numerics" notes); this file adds the GPU layout.
//
// One block of 256 threads works on a tile of kBM = 32 rows at a time (persistent blocks loop over tiles).
//
// Forward, per tile:
//   pass 1   Z = X A_cat                (kBM x K*d; FMA through shared-memory tiles, fp32 for fp32/fp16/bf16
//                                        inputs, fp64 for double; no TF32 / tensor cores: the projection feeds
//                                        ||z_k||^2 - ||x||^2, which cancels, so it needs full fp32 precision)
//   rows     ||x||^2; the K*L logits l' (without the row constant R), max-shifted softmax -> w, lse = lse' + R;
//            c_k = W_k z_k / gamma^2 - sum_l w_kl e_kl / m_kl (in place over Z)
//   pass 2   score = -x / gamma^2 + C A_cat^T
// A == nullptr (identity, d == D): pass 1 copies x K times, the projection term is 0, c_k is computed without
// the z / gamma^2 part and pass 2 sums c_k over k: score = -sum_kl w e / m (no 1/gamma^2 cancellation).
//
// Backward, per tile (flash-attention style: Z and w are recomputed, nothing B x K x L x d is stored; w is
// re-normalised from the recomputed logits rather than exp(l - lse_saved), see the header):
//   pass 1   Z = X A_cat and dC = G A_cat in the same tile loop (identity: copies of x and G)
//   rows     logits -> w; dw = dc . u (+ g_w) split as a_k + b_kl; dl = w (dw - sum w dw) + w g_lse
//            (mm::row_dlogits_split: the ~1/gamma^2 part a_k enters only through differences a_k - a_k')
//   columns  dmu / dlog_var / dlogpi summed over the tile's rows into this block's row of `partials` (each
//            element owned by one thread of the block: no atomics, deterministic); the caller sums over blocks
//   rows     c_k and dz_k = (W_k dc_k + (sum_l dl_kl) z_k) / gamma^2 + sum_l de_kl; C and dZ are written to
//            global memory (B x K*d, small next to B x K*L*d) for dA = G^T C + X^T dZ, which the caller does
//            with two GEMMs (long-K reductions over the batch that a GEMM library does better than a
//            hand-written split-K here)
//   pass 2   dx = -G / gamma^2 + dZ A_cat^T - (sum_kl dl_kl) x / gamma^2   (identity: dx = sum_kl de_kl)
#include "molr_mog_score_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "molr_mog_score.h"

namespace moekernels {
namespace cuda {
namespace {

namespace mm = ::moekernels::molr;  // the shared per-element math

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 32;  // rows per tile
constexpr int kBN = 64;  // GEMM output columns per step (16 threads x 4)
constexpr int kBK = 16;  // GEMM reduction depth per step
static_assert(kThreads == 256 && kBM == 32 && kBN == 64, "the 16x16 thread grid computes 2x4 outputs each");

// ------------------------------------------------------------------------------------------------ dtype glue
// Explicit conversions only: torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
template <typename T>
struct Io;
template <>
struct Io<float> {
  using Acc = float;
  static __device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Io<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(double* p, int64_t i, double v) { p[i] = v; }
};
template <>
struct Io<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <>
struct Io<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float dexp(float v) { return expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------------------------------------------ parameters
struct Dims {
  int64_t B, D, K, L, d;
  int64_t KL, Kd, KLd;  // K*L, K*d, K*L*d
  int64_t ldz;          // row stride of the Z / C / dC tile buffers (K*d + 1: rows in different banks)
  bool has_A;
};

Dims make_dims(const MolrShape& s) {
  Dims d{};
  d.B = s.B;
  d.D = s.D;
  d.K = s.K;
  d.L = s.L;
  d.d = s.has_A ? s.d : s.D;
  d.KL = s.K * s.L;
  d.Kd = s.K * d.d;
  d.KLd = d.KL * d.d;
  d.ldz = d.Kd + 1;
  d.has_A = s.has_A;
  return d;
}

template <typename T, typename Acc>
struct FwdParams {
  Dims n;
  const T* x;
  const T* A;
  const Acc* s;
  const Acc* gamma;
  const Acc* mu;
  const Acc* log_var;
  const Acc* logpi;
  T* score;
  T* lse;
  T* w;
  Acc* scratch;  // non-null: tile buffers in global memory, one slice per block
};

template <typename T, typename Acc>
struct BwdParams {
  Dims n;
  const T* G;
  const Acc* g_lse;
  const T* g_w;
  const T* x;
  const T* A;
  const Acc* s;
  const Acc* gamma;
  const Acc* mu;
  const Acc* log_var;
  const Acc* logpi;
  T* dx;
  Acc* C;
  Acc* dZ;
  Acc* partials;
  int64_t partial_cols;
  Acc* scratch;
};

// Dynamic tile-buffer sizes (elements of Acc) per block.
__host__ __device__ __forceinline__ int64_t fwd_tile_elems(const Dims& n) { return int64_t(kBM) * (n.ldz + n.KL); }
__host__ __device__ __forceinline__ int64_t bwd_tile_elems(const Dims& n) {
  return int64_t(kBM) * 2 * (n.ldz + n.KL + n.K);
}
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------ GEMM tiles
// Z[r * ldz + q] = sum_j X[row0 + r, j] A_cat[j, q] for the tile's kBM rows and q < Kd, A_cat[j, k*d + i] =
// A[k, j, i]; with kTwo also dC = G A_cat from the same A tiles. Rows past B come out 0 (zero-padded loads).
template <typename T, typename Acc, bool kTwo>
__device__ void project_tile(const Dims& n, const T* __restrict__ X, const T* __restrict__ G,
                             const T* __restrict__ A, int64_t row0, Acc* Z, Acc* dC, Acc (*xs)[kBK],
                             Acc (*gs)[kBK], Acc (*as)[kBN + 1]) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t n0 = 0; n0 < n.Kd; n0 += kBN) {
    Acc acc[2][4], acc2[2][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = acc2[a][b] = Acc(0);
    for (int64_t k0 = 0; k0 < n.D; k0 += kBK) {
      for (int e = tid; e < kBM * kBK; e += kThreads) {
        const int r = e / kBK, c = e % kBK;
        const int64_t row = row0 + r, j = k0 + c;
        const bool ok = row < n.B && j < n.D;
        xs[r][c] = ok ? Io<T>::load(X, row * n.D + j) : Acc(0);
        if (kTwo) gs[r][c] = ok ? Io<T>::load(G, row * n.D + j) : Acc(0);
      }
      for (int e = tid; e < kBK * kBN; e += kThreads) {
        const int r = e / kBN, c = e % kBN;
        const int64_t j = k0 + r, q = n0 + c;
        Acc v = Acc(0);
        if (j < n.D && q < n.Kd) {
          const int64_t k = q / n.d, i = q - k * n.d;
          v = Io<T>::load(A, (k * n.D + j) * n.d + i);
        }
        as[r][c] = v;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        Acc av[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) av[b] = as[kk][tx + 16 * b];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const Acc xv = xs[ty + 16 * a][kk];
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] += xv * av[b];
          if (kTwo) {
            const Acc gv = gs[ty + 16 * a][kk];
#pragma unroll
            for (int b = 0; b < 4; ++b) acc2[a][b] += gv * av[b];
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int r = ty + 16 * a;
        const int64_t q = n0 + tx + 16 * b;
        if (q < n.Kd) {
          Z[r * n.ldz + q] = acc[a][b];
          if (kTwo) dC[r * n.ldz + q] = acc2[a][b];
        }
      }
  }
}

// Identity A: Z[r, k*D + i] = X[row0 + r, i] for every k (and dC from G). Rows past B are 0.
template <typename T, typename Acc, bool kTwo>
__device__ void copy_tile(const Dims& n, const T* __restrict__ X, const T* __restrict__ G, int64_t row0, Acc* Z,
                          Acc* dC) {
  for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.Kd; e += kThreads) {
    const int64_t r = e / n.Kd, q = e - r * n.Kd, i = q % n.d, row = row0 + r;
    const bool ok = row < n.B;
    Z[r * n.ldz + q] = ok ? Io<T>::load(X, row * n.D + i) : Acc(0);
    if (kTwo) dC[r * n.ldz + q] = ok ? Io<T>::load(G, row * n.D + i) : Acc(0);
  }
}

// out = Cb A_cat^T for the tile: for rows r < kBM (row0 + r < B) and columns j < D, calls
// epi(r, row, j, sum_q Cb[r * ldz + q] A[q / d, j, q % d]).
template <bool kFull, typename Acc>
__device__ __forceinline__ void expand_step(const Acc* Cb, int64_t ldz, int64_t k0, int kmax, int tx, int ty,
                                            Acc (*as)[kBN + 1], Acc (&acc)[2][4]) {
#pragma unroll
  for (int kk = 0; kk < (kFull ? kBK : kmax); ++kk) {
    Acc av[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) av[b] = as[kk][tx + 16 * b];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      const Acc cv = Cb[(ty + 16 * a) * ldz + k0 + kk];
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] += cv * av[b];
    }
  }
}

template <typename T, typename Acc, typename Epi>
__device__ void expand_tile(const Dims& n, const T* __restrict__ A, int64_t row0, const Acc* Cb,
                            Acc (*as)[kBN + 1], Epi epi) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t n0 = 0; n0 < n.D; n0 += kBN) {
    Acc acc[2][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = Acc(0);
    for (int64_t k0 = 0; k0 < n.Kd; k0 += kBK) {
      // as[r][c] = A_cat[n0 + c, k0 + r]; consecutive threads walk r, i.e. contiguous i within one expert.
      for (int e = tid; e < kBK * kBN; e += kThreads) {
        const int r = e % kBK, c = e / kBK;
        const int64_t q = k0 + r, j = n0 + c;
        Acc v = Acc(0);
        if (q < n.Kd && j < n.D) {
          const int64_t k = q / n.d, i = q - k * n.d;
          v = Io<T>::load(A, (k * n.D + j) * n.d + i);
        }
        as[r][c] = v;
      }
      __syncthreads();
      // Cb past column Kd is not initialised (the pad column, then the next row): never read it.
      const int kmax = int(imin(kBK, n.Kd - k0));
      if (kmax == kBK)
        expand_step<true>(Cb, n.ldz, k0, kmax, tx, ty, as, acc);
      else
        expand_step<false>(Cb, n.ldz, k0, kmax, tx, ty, as, acc);
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int r = ty + 16 * a;
        const int64_t row = row0 + r, j = n0 + tx + 16 * b;
        if (row < n.B && j < n.D) epi(r, row, j, acc[a][b]);
      }
  }
}

// Identity A: epi(r, row, j, sum_k Cb[r, k*D + j]).
template <typename Acc, typename Epi>
__device__ void sum_experts_tile(const Dims& n, int64_t row0, const Acc* Cb, Epi epi) {
  for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.D; e += kThreads) {
    const int64_t r = e / n.D, j = e - r * n.D, row = row0 + r;
    if (row >= n.B) continue;
    Acc acc = Acc(0);
    for (int64_t k = 0; k < n.K; ++k) acc += Cb[r * n.ldz + k * n.D + j];
    epi(int(r), row, j, acc);
  }
}

// ------------------------------------------------------------------------------------------------ row math
// Per-row scalars of one tile, in static shared memory.
template <typename Acc>
struct RowScalars {
  Acc s[kBM];
  Acc g2[kBM];   // gamma^2
  Acc ig2[kBM];  // 1 / gamma^2
  Acc ic2[kBM];  // 1 / gamma^2 in c_k and dw (with A), 0 for the identity (molr_mog_score.h)
  Acc xn[kBM];   // ||x||^2 (with A)
  Acc R[kBM];    // row constant -(D-d)/2 log gamma^2 - D/2 log 2 pi, kept out of the softmax
  Acc glse[kBM];
  Acc sdl[kBM];  // backward: sum_kl dl_kl as computed (= g_lse up to rounding), used in dx
};

// Warp per row.
template <typename T, typename Acc>
__device__ void row_scalars(const Dims& n, const T* __restrict__ X, const Acc* __restrict__ s,
                            const Acc* __restrict__ gamma, int64_t row0, RowScalars<Acc>& rs) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kBM; r += kWarps) {
    const int64_t row = row0 + r;
    if (row >= n.B) continue;  // warp-uniform
    Acc xn = Acc(0);
    if (n.has_A) {
      for (int64_t j = lane; j < n.D; j += 32) {
        const Acc v = Io<T>::load(X, row * n.D + j);
        xn += v * v;
      }
      xn = warp_sum(xn);
    }
    if (lane == 0) {
      const Acc g = gamma[row];
      const Acc g2 = g * g, ig2 = Acc(1) / g2;
      rs.s[r] = s[row];
      rs.g2[r] = g2;
      rs.ig2[r] = ig2;
      rs.ic2[r] = n.has_A ? ig2 : Acc(0);
      rs.xn[r] = xn;
      rs.R[r] = mm::row_constant<Acc>(n.D, n.d, g2);
    }
  }
}

// 1/m and s mu of one element: the same expressions as mm::kl_constants (which also returns the log m sum that
// only the logits need).
template <typename Acc>
struct ElemConst {
  Acc inv_m, smu;
};
template <typename Acc>
__device__ __forceinline__ ElemConst<Acc> elem_const(Acc mu, Acc v, Acc s, Acc g2) {
  const Acc s2 = s * s;
  return {Acc(1) / (s2 * v + g2), s * mu};
}

// Logits l'_kl (without R) of the tile's valid rows into Lg[r * KL + kl]: one thread per (row, component),
// the shared math applied element by element (d = 1 slices: every term is a sum over i).
template <typename Acc>
__device__ void tile_logits(const Dims& n, int64_t row0, const Acc* Z, const Acc* __restrict__ mu,
                            const Acc* __restrict__ lv, const Acc* __restrict__ logpi, const RowScalars<Acc>& rs,
                            Acc* Lg) {
  for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.KL; e += kThreads) {
    const int64_t r = e / n.KL, kl = e - r * n.KL;
    if (row0 + r >= n.B) continue;
    const Acc* zk = Z + r * n.ldz + (kl / n.L) * n.d;
    const Acc sr = rs.s[r], g2 = rs.g2[r];
    Acc l = Acc(0), zn = Acc(0);
    for (int64_t i = 0; i < n.d; ++i) {
      const int64_t idx = kl * n.d + i;
      const Acc v = dexp(lv[idx]);
      Acc inv_m, smu;
      const Acc half_neg_log_m = mm::kl_constants<Acc>(mu + idx, &v, Acc(0), sr, g2, 1, &inv_m, &smu);
      l += mm::kl_logit<Acc>(zk + i, &smu, &inv_m, 1, half_neg_log_m, Acc(0));
      zn += zk[i] * zk[i];
    }
    l += logpi[kl];
    if (n.has_A) l += (zn - rs.xn[r]) / (Acc(2) * g2);  // (||z_k||^2 - ||x||^2) formed before the scaling
    Lg[e] = l;
  }
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) molr_fwd_kernel(FwdParams<T, Acc> p) {
  __shared__ Acc xs[kBM][kBK];
  __shared__ Acc as[kBK][kBN + 1];
  __shared__ RowScalars<Acc> rs;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Dims& n = p.n;
  Acc* base = p.scratch ? p.scratch + int64_t(blockIdx.x) * fwd_tile_elems(n) : reinterpret_cast<Acc*>(smem_raw);
  Acc* Z = base;                          // [kBM][ldz]: z, then c
  Acc* Lg = base + int64_t(kBM) * n.ldz;  // [kBM][KL]: logits, then w
  const int64_t ntiles = (n.B + kBM - 1) / kBM;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t row0 = tile * kBM;
    // pass 1: Z = X A_cat
    if (n.has_A)
      project_tile<T, Acc, false>(n, p.x, nullptr, p.A, row0, Z, nullptr, xs, nullptr, as);
    else
      copy_tile<T, Acc, false>(n, p.x, nullptr, row0, Z, nullptr);
    row_scalars<T, Acc>(n, p.x, p.s, p.gamma, row0, rs);
    __syncthreads();
    tile_logits(n, row0, Z, p.mu, p.log_var, p.logpi, rs, Lg);
    __syncthreads();
    // max-shifted softmax, one thread per row (K*L is small): w in place, lse = lse' + R
    for (int r = threadIdx.x; r < kBM; r += kThreads) {
      const int64_t row = row0 + r;
      if (row >= n.B) continue;
      const Acc lse = mm::row_weights<Acc>(Lg + int64_t(r) * n.KL, n.KL) + rs.R[r];
      Io<T>::store(p.lse, row, lse);
    }
    __syncthreads();
    if (p.w) {
      for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.KL; e += kThreads)
        if (row0 + e / n.KL < n.B) Io<T>::store(p.w, row0 * n.KL + e, Lg[e]);
    }
    // c_k = W_k z_k / gamma^2 - sum_l w_kl e_kl / m_kl, element by element, in place over z
    for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.Kd; e += kThreads) {
      const int64_t r = e / n.Kd, q = e - r * n.Kd;
      if (row0 + r >= n.B) continue;
      const int64_t k = q / n.d, i = q - k * n.d;
      const Acc sr = rs.s[r], g2 = rs.g2[r], ic2 = rs.ic2[r];
      const Acc z = Z[r * n.ldz + q];
      const Acc* wk = Lg + r * n.KL + k * n.L;
      Acc c = Acc(0);
      for (int64_t l = 0; l < n.L; ++l) {
        const int64_t idx = (k * n.L + l) * n.d + i;
        const ElemConst<Acc> ec = elem_const(p.mu[idx], dexp(p.log_var[idx]), sr, g2);
        mm::expert_c<Acc>(&z, wk + l, &ec.smu, &ec.inv_m, 1, 1, ic2, &c, true);
      }
      Z[r * n.ldz + q] = c;
    }
    __syncthreads();
    // pass 2: score = -x / gamma^2 + C A_cat^T ; identity: score = sum_k c_k
    if (n.has_A) {
      expand_tile<T, Acc>(n, p.A, row0, Z, as, [&](int r, int64_t row, int64_t j, Acc acc) {
        const int64_t o = row * n.D + j;
        Io<T>::store(p.score, o, acc - Io<T>::load(p.x, o) * rs.ig2[r]);
      });
    } else {
      sum_experts_tile<Acc>(n, row0, Z, [&](int, int64_t row, int64_t j, Acc acc) {
        Io<T>::store(p.score, row * n.D + j, acc);
      });
    }
    __syncthreads();  // the next tile overwrites Z, Lg, rs
  }
}

// ------------------------------------------------------------------------------------------------ backward
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) molr_bwd_kernel(BwdParams<T, Acc> p) {
  __shared__ Acc xs[kBM][kBK];
  __shared__ Acc gs[kBM][kBK];
  __shared__ Acc as[kBK][kBN + 1];
  __shared__ RowScalars<Acc> rs;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Dims& n = p.n;
  Acc* base = p.scratch ? p.scratch + int64_t(blockIdx.x) * bwd_tile_elems(n) : reinterpret_cast<Acc*>(smem_raw);
  Acc* Z = base;                       // [kBM][ldz]: z
  Acc* dC = Z + int64_t(kBM) * n.ldz;  // [kBM][ldz]: dc = A^T G, then dz
  Acc* Wb = dC + int64_t(kBM) * n.ldz; // [kBM][KL]: logits, then w
  Acc* DL = Wb + int64_t(kBM) * n.KL;  // [kBM][KL]: b = dw - a, then dl
  Acc* Ab = DL + int64_t(kBM) * n.KL;  // [kBM][K]: a_k = dc_k . z_k / gamma^2 (0 for the identity)
  Acc* Wk = Ab + int64_t(kBM) * n.K;   // [kBM][K]: W_k = sum_l w_kl
  // This block's row of partials: [dmu (KLd) | dlog_var (KLd) | dlogpi (KL)]. Element e is only ever touched by
  // thread e % kThreads of this block, so plain read-modify-write is race-free (and deterministic).
  Acc* pmu = p.partials + int64_t(blockIdx.x) * p.partial_cols;
  Acc* plv = pmu + n.KLd;
  Acc* ppi = plv + n.KLd;
  const int64_t ntiles = (n.B + kBM - 1) / kBM;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t row0 = tile * kBM;
    const int64_t nvalid = imin(kBM, n.B - row0);
    // pass 1: Z = X A_cat, dC = G A_cat
    if (n.has_A)
      project_tile<T, Acc, true>(n, p.x, p.G, p.A, row0, Z, dC, xs, gs, as);
    else
      copy_tile<T, Acc, true>(n, p.x, p.G, row0, Z, dC);
    row_scalars<T, Acc>(n, p.x, p.s, p.gamma, row0, rs);
    for (int r = threadIdx.x; r < nvalid; r += kThreads) rs.glse[r] = p.g_lse[row0 + r];
    __syncthreads();
    tile_logits(n, row0, Z, p.mu, p.log_var, p.logpi, rs, Wb);
    __syncthreads();
    // w recomputed and renormalised from the logits, one thread per row
    for (int r = threadIdx.x; r < nvalid; r += kThreads) mm::row_weights<Acc>(Wb + int64_t(r) * n.KL, n.KL);
    __syncthreads();
    // dw_kl = a_k + b_kl, split as in mm::row_dlogits_split (the a_k ~ 1/gamma^2 part is the same for every l):
    //   b_kl = g_w_kl - dc_k . e_kl / m_kl   one thread per (row, component)
    //   a_k  = dc_k . z_k / gamma^2          one thread per (row, expert)
    for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.KL; e += kThreads) {
      const int64_t r = e / n.KL, kl = e - r * n.KL, row = row0 + r;
      if (row >= n.B) continue;
      const int64_t off = r * n.ldz + (kl / n.L) * n.d;
      const Acc sr = rs.s[r], g2 = rs.g2[r];
      Acc b = p.g_w ? Io<T>::load(p.g_w, row * n.KL + kl) : Acc(0);
      for (int64_t i = 0; i < n.d; ++i) {
        const int64_t idx = kl * n.d + i;
        const ElemConst<Acc> ec = elem_const(p.mu[idx], dexp(p.log_var[idx]), sr, g2);
        b += mm::kl_dw<Acc>(dC + off + i, Z + off + i, &ec.smu, &ec.inv_m, 1, Acc(0), Acc(0));
      }
      DL[e] = b;
    }
    for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.K; e += kThreads) {
      const int64_t r = e / n.K, k = e - r * n.K;
      if (row0 + r >= n.B) continue;
      const Acc* zk = Z + r * n.ldz + k * n.d;
      const Acc* dck = dC + r * n.ldz + k * n.d;
      Acc t = Acc(0);
      for (int64_t i = 0; i < n.d; ++i) t += dck[i] * zk[i];
      Ab[e] = t * rs.ic2[r];
    }
    __syncthreads();
    // softmax backward, one thread per row: dl = w (dw - sum w dw) + w g_lse, with the a_k part formed as
    // sum_k' W_k' (a_k - a_k') (mm::row_dlogits_split); also W_k
    for (int r = threadIdx.x; r < nvalid; r += kThreads) {
      Acc* dl = DL + int64_t(r) * n.KL;
      mm::row_dlogits_split<Acc>(Wb + int64_t(r) * n.KL, Ab + int64_t(r) * n.K, dl, Wk + int64_t(r) * n.K, n.K,
                                 n.L, rs.glse[r]);
      Acc sdl = Acc(0);
      for (int64_t kl = 0; kl < n.KL; ++kl) sdl += dl[kl];
      rs.sdl[r] = sdl;
    }
    __syncthreads();
    // partials over the tile's rows: dlogpi_kl = sum dl_kl; dmu = -s de; dlog_var = s^2 dm v
    for (int64_t kl = threadIdx.x; kl < n.KL; kl += kThreads) {
      Acc a = Acc(0);
      for (int64_t r = 0; r < nvalid; ++r) a += DL[r * n.KL + kl];
      ppi[kl] += a;
    }
    for (int64_t e = threadIdx.x; e < n.KLd; e += kThreads) {
      const int64_t kl = e / n.d, i = e - kl * n.d, q = (kl / n.L) * n.d + i;
      const Acc mu = p.mu[e], v = dexp(p.log_var[e]);
      Acc amu = Acc(0), avar = Acc(0), unused = Acc(0);
      for (int64_t r = 0; r < nvalid; ++r) {
        const Acc sr = rs.s[r];
        const ElemConst<Acc> ec = elem_const(mu, v, sr, rs.g2[r]);
        mm::kl_backward<Acc>(dC + r * n.ldz + q, Z + r * n.ldz + q, &ec.smu, &ec.inv_m, 1, Wb[r * n.KL + kl],
                             DL[r * n.KL + kl], sr, &unused, &amu, &avar);
      }
      pmu[e] += amu;
      plv[e] += avar * v;
    }
    __syncthreads();
    // c_k (with A) and dz_k = (W_k dc_k + (sum_l dl_kl) z_k) / gamma^2 + sum_l de_kl (identity: sum_l de_kl);
    // dz overwrites dc in place (each element read and written by the same thread)
    for (int64_t e = threadIdx.x; e < int64_t(kBM) * n.Kd; e += kThreads) {
      const int64_t r = e / n.Kd, q = e - r * n.Kd, row = row0 + r;
      if (row >= n.B) continue;
      const int64_t k = q / n.d, i = q - k * n.d;
      const Acc sr = rs.s[r], g2 = rs.g2[r], ic2 = rs.ic2[r];
      const Acc z = Z[r * n.ldz + q], dc = dC[r * n.ldz + q];
      const Acc* wk = Wb + r * n.KL + k * n.L;
      const Acc* dk = DL + r * n.KL + k * n.L;
      Acc c = Acc(0), dz = Acc(0), sdl = Acc(0), unused_mu = Acc(0), unused_var = Acc(0);
      for (int64_t l = 0; l < n.L; ++l) {
        const int64_t idx = (k * n.L + l) * n.d + i;
        const ElemConst<Acc> ec = elem_const(p.mu[idx], dexp(p.log_var[idx]), sr, g2);
        if (n.has_A) mm::expert_c<Acc>(&z, wk + l, &ec.smu, &ec.inv_m, 1, 1, ic2, &c, true);
        mm::kl_backward<Acc>(&dc, &z, &ec.smu, &ec.inv_m, 1, wk[l], dk[l], sr, &dz, &unused_mu, &unused_var);
        sdl += dk[l];
      }
      if (n.has_A) {
        dz += (Wk[r * n.K + k] * dc + sdl * z) * rs.ig2[r];
        p.C[row * n.Kd + q] = c;
        p.dZ[row * n.Kd + q] = dz;
      }
      dC[r * n.ldz + q] = dz;
    }
    __syncthreads();
    // pass 2: dx = -G / gamma^2 + dZ A_cat^T - (sum_kl dl_kl) x / gamma^2 ; identity: dx = sum_kl de_kl.
    // The computed sum of dl (= g_lse up to rounding) cancels the (sum_l dl_kl) z_k / gamma^2 parts of dz
    // consistently (molr_mog_score.h).
    if (n.has_A) {
      expand_tile<T, Acc>(n, p.A, row0, dC, as, [&](int r, int64_t row, int64_t j, Acc acc) {
        const int64_t o = row * n.D + j;
        const Acc v = acc - (Io<T>::load(p.G, o) + rs.sdl[r] * Io<T>::load(p.x, o)) * rs.ig2[r];
        Io<T>::store(p.dx, o, v);
      });
    } else {
      sum_experts_tile<Acc>(n, row0, dC, [&](int, int64_t row, int64_t j, Acc acc) {
        Io<T>::store(p.dx, row * n.D + j, acc);
      });
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------ host side
template <typename Kern>
cudaError_t make_plan(Kern kernel, size_t tile_bytes, int64_t B, MolrPlan* plan) {
  *plan = MolrPlan{};
  plan->block = kThreads;
  if (B <= 0) return cudaSuccess;
  cudaError_t err;
  int dev = 0, sms = 0, optin = 0;
  if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess) return err;
  cudaFuncAttributes fa;
  if ((err = cudaFuncGetAttributes(&fa, kernel)) != cudaSuccess) return err;
  bool global = fa.sharedSizeBytes + tile_bytes > size_t(optin);
  size_t smem = global ? 0 : tile_bytes;
  int per_sm = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (smem > 48 * 1024 &&
        (err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem))) != cudaSuccess)
      return err;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem)) != cudaSuccess)
      return err;
    if (per_sm >= 1 || global) break;
    global = true;  // the tile does not fit beside the kernel's own needs: keep it in global memory
    smem = 0;
  }
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  const int64_t ntiles = (B + kBM - 1) / kBM;
  plan->grid = int(imin(ntiles, int64_t(per_sm) * sms));
  plan->smem_bytes = smem;
  plan->global_scratch = global;
  plan->scratch_bytes = global ? size_t(plan->grid) * tile_bytes : 0;
  return cudaSuccess;
}

template <typename T>
cudaError_t fwd_plan_t(const MolrShape& shape, MolrPlan* plan) {
  using Acc = typename Io<T>::Acc;
  const Dims n = make_dims(shape);
  return make_plan(molr_fwd_kernel<T, Acc>, size_t(fwd_tile_elems(n)) * sizeof(Acc), n.B, plan);
}

template <typename T>
cudaError_t bwd_plan_t(const MolrShape& shape, MolrPlan* plan) {
  using Acc = typename Io<T>::Acc;
  const Dims n = make_dims(shape);
  cudaError_t err = make_plan(molr_bwd_kernel<T, Acc>, size_t(bwd_tile_elems(n)) * sizeof(Acc), n.B, plan);
  plan->partial_cols = 2 * n.KLd + n.KL;
  return err;
}

template <typename Kern>
cudaError_t prepare_launch(Kern kernel, const MolrPlan& plan, const void* scratch) {
  if (plan.block != kThreads) return cudaErrorInvalidValue;
  if (plan.global_scratch && scratch == nullptr) return cudaErrorInvalidValue;
  if (plan.smem_bytes > 48 * 1024)  // per device: set again in case the plan was made on another one
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_bytes));
  return cudaSuccess;
}

template <typename T>
cudaError_t fwd_launch_t(const MolrFwdArgs& a, const MolrPlan& plan, cudaStream_t stream) {
  using Acc = typename Io<T>::Acc;
  if (plan.grid == 0) return cudaSuccess;
  FwdParams<T, Acc> p;
  p.n = make_dims(a.shape);
  p.x = static_cast<const T*>(a.x);
  p.A = a.shape.has_A ? static_cast<const T*>(a.A) : nullptr;
  p.s = static_cast<const Acc*>(a.s);
  p.gamma = static_cast<const Acc*>(a.gamma);
  p.mu = static_cast<const Acc*>(a.mu);
  p.log_var = static_cast<const Acc*>(a.log_var);
  p.logpi = static_cast<const Acc*>(a.logpi);
  p.score = static_cast<T*>(a.score);
  p.lse = static_cast<T*>(a.lse);
  p.w = static_cast<T*>(a.w);
  p.scratch = plan.global_scratch ? static_cast<Acc*>(a.scratch) : nullptr;
  if (a.shape.has_A && p.A == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = prepare_launch(molr_fwd_kernel<T, Acc>, plan, a.scratch);
  if (err != cudaSuccess) return err;
  molr_fwd_kernel<T, Acc><<<plan.grid, kThreads, plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_launch_t(const MolrBwdArgs& a, const MolrPlan& plan, cudaStream_t stream) {
  using Acc = typename Io<T>::Acc;
  if (plan.grid == 0) return cudaSuccess;
  BwdParams<T, Acc> p;
  p.n = make_dims(a.shape);
  p.G = static_cast<const T*>(a.G);
  p.g_lse = static_cast<const Acc*>(a.g_lse);
  p.g_w = static_cast<const T*>(a.g_w);
  p.x = static_cast<const T*>(a.x);
  p.A = a.shape.has_A ? static_cast<const T*>(a.A) : nullptr;
  p.s = static_cast<const Acc*>(a.s);
  p.gamma = static_cast<const Acc*>(a.gamma);
  p.mu = static_cast<const Acc*>(a.mu);
  p.log_var = static_cast<const Acc*>(a.log_var);
  p.logpi = static_cast<const Acc*>(a.logpi);
  p.dx = static_cast<T*>(a.dx);
  p.C = static_cast<Acc*>(a.C);
  p.dZ = static_cast<Acc*>(a.dZ);
  p.partials = static_cast<Acc*>(a.partials);
  p.partial_cols = plan.partial_cols;
  p.scratch = plan.global_scratch ? static_cast<Acc*>(a.scratch) : nullptr;
  if (a.shape.has_A && (p.A == nullptr || p.C == nullptr || p.dZ == nullptr)) return cudaErrorInvalidValue;
  if (p.partials == nullptr || plan.partial_cols != 2 * p.n.KLd + p.n.KL) return cudaErrorInvalidValue;
  cudaError_t err = prepare_launch(molr_bwd_kernel<T, Acc>, plan, a.scratch);
  if (err != cudaSuccess) return err;
  molr_bwd_kernel<T, Acc><<<plan.grid, kThreads, plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t molr_mog_score_fwd_plan(const MolrShape& shape, MolrDType dtype, MolrPlan* plan) {
  switch (dtype) {
    case MolrDType::kFloat32: return fwd_plan_t<float>(shape, plan);
    case MolrDType::kFloat64: return fwd_plan_t<double>(shape, plan);
    case MolrDType::kFloat16: return fwd_plan_t<__half>(shape, plan);
    case MolrDType::kBFloat16: return fwd_plan_t<__nv_bfloat16>(shape, plan);
  }
  return cudaErrorInvalidValue;
}

cudaError_t molr_mog_score_bwd_plan(const MolrShape& shape, MolrDType dtype, MolrPlan* plan) {
  switch (dtype) {
    case MolrDType::kFloat32: return bwd_plan_t<float>(shape, plan);
    case MolrDType::kFloat64: return bwd_plan_t<double>(shape, plan);
    case MolrDType::kFloat16: return bwd_plan_t<__half>(shape, plan);
    case MolrDType::kBFloat16: return bwd_plan_t<__nv_bfloat16>(shape, plan);
  }
  return cudaErrorInvalidValue;
}

cudaError_t molr_mog_score_fwd_cuda(const MolrFwdArgs& args, const MolrPlan& plan, cudaStream_t stream) {
  switch (args.dtype) {
    case MolrDType::kFloat32: return fwd_launch_t<float>(args, plan, stream);
    case MolrDType::kFloat64: return fwd_launch_t<double>(args, plan, stream);
    case MolrDType::kFloat16: return fwd_launch_t<__half>(args, plan, stream);
    case MolrDType::kBFloat16: return fwd_launch_t<__nv_bfloat16>(args, plan, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t molr_mog_score_bwd_cuda(const MolrBwdArgs& args, const MolrPlan& plan, cudaStream_t stream) {
  switch (args.dtype) {
    case MolrDType::kFloat32: return bwd_launch_t<float>(args, plan, stream);
    case MolrDType::kFloat64: return bwd_launch_t<double>(args, plan, stream);
    case MolrDType::kFloat16: return bwd_launch_t<__half>(args, plan, stream);
    case MolrDType::kBFloat16: return bwd_launch_t<__nv_bfloat16>(args, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moekernels
