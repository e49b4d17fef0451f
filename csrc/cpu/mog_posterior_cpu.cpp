// CPU kernels of mog_posterior (DESIGN.md 3.2): torch.ops.moekernels.mog_posterior_fwd / _bwd on CPU tensors.
//
// Everything works on data centred on the mean of the means, xc = x - centre, cc = c - centre, so float32 stays
// accurate far from the origin (x - centre is exact near the centre).
// forward : the scaled-difference form of csrc/include/mog_posterior.h,
//               u_ikj = xc_ij s_kj - cc_kj s_kj,  s = exp(-log_var / 2),   l_ik = bias_k - 1/2 sum_j u_ikj^2,
//           one fused pass per register tile of 4 rows x 16 components (2 FMAs per element, like the GEMM it
//           replaces; the sum over j is blocked), then the epilogue of the 4 rows (max, exp-sum, log, argmax)
//           writes log_resp / lse / assign.
// backward: g_ik = dL/dl_ik from (grad_log_resp, grad_lse, log_resp) (row_grad_logits), then one fused pass
//           over e_ikj = xc_ij - cc_kj (the exact difference) with iv = exp(-log_var):
//               dx_ij       = -sum_k g_ik e_ikj iv_kj
//               dmeans_kj   =  iv_kj sum_i g_ik e_ikj
//               dlog_var_kj =  1/2 (iv_kj sum_i g_ik e_ikj^2 - sum_i g_ik)
//               dlogpi_k    =  sum_i g_ik
//           (per element: 1 sub, 1 mul, 2 FMAs, 1 add; the row sums are kept per thread in one interleaved
//           [j-chunk][k][M | V] buffer).
//
// Paths: float32 with AVX2+FMA (intrinsics, chosen at run time with cpu::has_avx2_fma()), and a portable path
// (plain loops the compiler vectorises) for float32 and float64. MOEKERNELS_CPU_GENERIC=1 in the environment
// forces the portable path (read at every call, so tests can switch it).
//
// Accumulation: float32 for float32 inputs (float64 for float64); the sums over rows of the backward are
// accumulated in float32 over blocks of at most kFlushRows rows and then added into float64 per thread.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_features.h"
#include "cpu_simd.h"
#include "mog_posterior.h"

namespace moekernels {
namespace {

constexpr int64_t kRows = 4;          // rows per register tile
constexpr int64_t kPrefetchRows = 4;  // forward: prefetch x this many rows ahead
constexpr int64_t kJBlock = 16;       // forward: sum over j blocked in kJBlock terms,
constexpr int64_t kJSuper = 128;      //          then in super-blocks of kJSuper terms (see fwd_tile)
constexpr int64_t kFlushRows = 128;   // backward: rows summed in Acc before adding into the float64 totals

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

bool force_generic() {
  const char* v = std::getenv("MOEKERNELS_CPU_GENERIC");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

bool use_avx2_float() {
#if defined(MOEKERNELS_HAVE_AVX2_PATH)
  return cpu::has_avx2_fma() && !force_generic();
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------------------ constants
// The centre (mean of the means) rounded to T, so that x - centre (done in Acc) is exact for x near it.
template <typename T, typename Acc>
std::vector<Acc> centre_of(const T* means, int64_t K, int64_t D) {
  std::vector<double> cen(D, 0.0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < D; ++j) cen[j] += static_cast<double>(means[k * D + j]);
  std::vector<Acc> out(D);
  for (int64_t j = 0; j < D; ++j) out[j] = static_cast<Acc>(static_cast<T>(cen[j] / static_cast<double>(K)));
  return out;
}

// Forward: s = exp(-lv/2), cs = (c - centre) s laid out S[j * Kp + k] (8 consecutive k contiguous; K padded to
// Kp with s = cs = 0) and bias (Kp), computed in float64 by the shared component_constants(), rounded to Acc.
template <typename T, typename Acc>
struct FwdConstants {
  std::vector<Acc> centre, S, CS, bias;
  int64_t ld = 0;  // Kp

  FwdConstants(const T* means, const T* log_var, const T* logpi, int64_t K, int64_t D, int64_t pad_k)
      : centre(centre_of<T, Acc>(means, K, D)) {
    const int64_t Kp = round_up(K, pad_k);
    ld = Kp;
    S.assign(static_cast<size_t>(Kp * D), Acc(0));
    CS.assign(static_cast<size_t>(Kp * D), Acc(0));
    bias.assign(static_cast<size_t>(Kp), Acc(0));
    std::vector<double> mc(D), lv(D), s(D), cs(D);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < D; ++j) {
        mc[j] = static_cast<double>(means[k * D + j]) - static_cast<double>(centre[j]);
        lv[j] = static_cast<double>(log_var[k * D + j]);
      }
      double b = 0;
      mog::component_constants<double, double>(mc.data(), lv.data(), static_cast<double>(logpi[k]), D, s.data(),
                                               cs.data(), &b);
      bias[k] = static_cast<Acc>(b);
      for (int64_t j = 0; j < D; ++j) {
        S[j * Kp + k] = static_cast<Acc>(s[j]);
        CS[j * Kp + k] = static_cast<Acc>(cs[j]);
      }
    }
  }
};

// Backward: iv = exp(-lv) and cc = c - centre laid out IV[k * Dp + j] (8 consecutive j contiguous; D padded to
// Dp = round_up(D, 8) with iv = cc = 0).
template <typename T, typename Acc>
struct BwdConstants {
  std::vector<Acc> centre, IV, CC;
  int64_t ld = 0;  // Dp

  BwdConstants(const T* means, const T* log_var, int64_t K, int64_t D) : centre(centre_of<T, Acc>(means, K, D)) {
    const int64_t Dp = round_up(D, 8);
    ld = Dp;
    IV.assign(static_cast<size_t>(K * Dp), Acc(0));
    CC.assign(static_cast<size_t>(K * Dp), Acc(0));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < D; ++j) {
        IV[k * Dp + j] = static_cast<Acc>(std::exp(-static_cast<double>(log_var[k * D + j])));
        CC[k * Dp + j] = static_cast<Acc>(static_cast<double>(means[k * D + j]) - static_cast<double>(centre[j]));
      }
  }
};

// Rows [0, n) split into contiguous chunks, one per task of at::parallel_for (deterministic: the split depends
// only on n and the thread count). grain: the fewest rows worth a task of their own.
template <typename F>
void parallel_rows(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(nt, n / std::max<int64_t>(grain, 1)));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, n * c / nchunks, n * (c + 1) / nchunks);
  });
}

// Rows [0, n) in chunks of `chunk` rows (a multiple of kRows) claimed dynamically by the tasks of
// at::parallel_for, so that a thread slowed by other load on its core takes fewer chunks. For passes whose
// result does not depend on the split (the forward: every row is independent).
template <typename F>
void parallel_rows_dynamic(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ntasks = std::max<int64_t>(1, std::min<int64_t>(nt, n / std::max<int64_t>(grain, 1)));
  if (ntasks == 1) {
    f(int64_t(0), n);
    return;
  }
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, kRows), round_up(n / (ntasks * 16), kRows));
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1))
        f(c * chunk, std::min<int64_t>(n, (c + 1) * chunk));
  });
}

// ================================================================================== portable path
template <typename T, typename Acc>
void fwd_generic(const T* x, int64_t B, int64_t D, int64_t K, const FwdConstants<T, Acc>& P, T* log_resp, T* lse,
                 int64_t* assign) {
  const int64_t Kp = P.ld;
  const int64_t grain = std::max<int64_t>(kRows, (int64_t(1) << 16) / std::max<int64_t>(1, K * D));
  parallel_rows_dynamic(B, grain, [&](int64_t i0, int64_t i1) {
    std::vector<Acc> xc(kRows * D), acc(kRows * Kp), mid(kRows * Kp), part(kRows * Kp);
    for (int64_t ib = i0; ib < i1; ib += kRows) {
      const int64_t nr = std::min<int64_t>(kRows, i1 - ib);
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t j = 0; j < D; ++j)
          xc[r * D + j] = r < nr ? static_cast<Acc>(x[(ib + r) * D + j]) - P.centre[j] : Acc(0);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (int64_t J0 = 0; J0 < D; J0 += kJSuper) {  // three-level blocked summation, as in the AVX2 tile
        std::fill(mid.begin(), mid.end(), Acc(0));
        for (int64_t j0 = J0; j0 < std::min<int64_t>(D, J0 + kJSuper); j0 += kJBlock) {
          std::fill(part.begin(), part.end(), Acc(0));
          for (int64_t j = j0; j < std::min<int64_t>({D, J0 + kJSuper, j0 + kJBlock}); ++j) {
            const Acc* s = P.S.data() + j * Kp;
            const Acc* cs = P.CS.data() + j * Kp;
            for (int64_t r = 0; r < kRows; ++r) {
              const Acc xv = xc[r * D + j];
              Acc* a = part.data() + r * Kp;
              for (int64_t k = 0; k < Kp; ++k) {
                const Acc d = xv * s[k] - cs[k];
                a[k] += d * d;
              }
            }
          }
          for (size_t t = 0; t < mid.size(); ++t) mid[t] += part[t];
        }
        for (size_t t = 0; t < acc.size(); ++t) acc[t] += mid[t];
      }
      for (int64_t r = 0; r < nr; ++r) {
        Acc* l = acc.data() + r * Kp;
        for (int64_t k = 0; k < K; ++k) l[k] = P.bias[k] - Acc(0.5) * l[k];
        int64_t am = 0;
        const Acc m = mog::row_log_softmax<Acc>(l, K, &am);
        const int64_t i = ib + r;
        for (int64_t k = 0; k < K; ++k) log_resp[i * K + k] = static_cast<T>(l[k]);
        lse[i] = static_cast<T>(m);
        assign[i] = am;
      }
    }
  });
}

// Sums over rows of the backward, per thread: M = sum_i g e, V = sum_i g e^2, G = sum_i g. M and V live in one
// interleaved layout MV[((j / 8) * K + k) * 16 + (j % 8)] = M_kj, [... + 8] = V_kj (one cache line per (k, 8 j):
// no aliasing between separate M and V arrays): running Acc sums, added every kFlushRows rows into the float64
// totals of the same layout. G is accumulated in float64 directly.
struct BwdTotals {
  std::vector<double> MV, G;
  BwdTotals(int64_t K, int64_t Dp) : MV(K * Dp * 2, 0.0), G(K, 0.0) {}
  double M(int64_t K, int64_t k, int64_t j) const { return MV[((j / 8) * K + k) * 16 + j % 8]; }
  double V(int64_t K, int64_t k, int64_t j) const { return MV[((j / 8) * K + k) * 16 + 8 + j % 8]; }
};

template <typename Acc>
inline void flush_loop(Acc* __restrict mv, double* __restrict tot, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    tot[t] += static_cast<double>(mv[t]);
    mv[t] = Acc(0);
  }
}

template <typename Acc>
void flush(std::vector<Acc>& MV, BwdTotals& tot) {
  flush_loop(MV.data(), tot.MV.data(), static_cast<int64_t>(MV.size()));
}

template <typename T, typename Acc>
void bwd_generic(const T* glr, const T* glse, const T* x, const T* lr, int64_t B, int64_t D, int64_t K,
                 const BwdConstants<T, Acc>& P, T* dx, std::vector<BwdTotals>& totals) {
  const int64_t Dp = P.ld;
  const int64_t grain = std::max<int64_t>(kRows, (int64_t(1) << 15) / std::max<int64_t>(1, K * D));
  parallel_rows(B, grain, [&](int64_t c, int64_t i0, int64_t i1) {
    BwdTotals& tot = totals[c];
    std::vector<Acc> MV(K * Dp * 2, Acc(0)), xc(Dp, Acc(0)), dxr(Dp), g(K);
    int64_t since_flush = 0;
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < D; ++j) xc[j] = static_cast<Acc>(x[i * D + j]) - P.centre[j];  // pads stay 0
      mog::row_grad_logits<T, Acc>(glr + i * K, static_cast<Acc>(glse[i]), lr + i * K, K, g.data());
      std::fill(dxr.begin(), dxr.end(), Acc(0));
      for (int64_t k = 0; k < K; ++k) {
        const Acc gk = g[k];
        tot.G[k] += static_cast<double>(gk);
        const Acc* iv = P.IV.data() + k * Dp;
        const Acc* cc = P.CC.data() + k * Dp;
        for (int64_t c8 = 0; c8 < Dp; c8 += 8) {
          Acc* mv = MV.data() + ((c8 / 8) * K + k) * 16;
          for (int64_t l = 0; l < 8; ++l) {
            const int64_t j = c8 + l;
            const Acc e = xc[j] - cc[j];
            const Acc ge = gk * e;
            dxr[j] += ge * iv[j];
            mv[l] += ge;
            mv[8 + l] += ge * e;
          }
        }
      }
      for (int64_t j = 0; j < D; ++j) dx[i * D + j] = static_cast<T>(-dxr[j]);
      if (++since_flush == kFlushRows) {
        flush(MV, tot);
        since_flush = 0;
      }
    }
    flush(MV, tot);
  });
}

// ================================================================================== AVX2 + FMA path (float32)
#if defined(MOEKERNELS_HAVE_AVX2_PATH)
namespace avx = cpu::avx2;

// Software prefetch of n floats (the next row block's inputs: the blocks are short bursts of reads separated by
// long computations, which the hardware prefetcher does not run ahead of).
MOEK_AVX2_INLINE void prefetch_floats(const float* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 16) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}

// a[r][v] += sum_{j0 <= j < j0 + nj} (xc_rj s_jk - cs_jk)^2 for the kRows rows of xc (kRows x D) and the 8V
// components starting at S / CS. NJ > 0: a compile-time block length (fully unrolled); NJ == 0: nj at run time.
template <int V, int NJ>
MOEK_AVX2_INLINE void fwd_block(const float* xc, int64_t D, const float* S, const float* CS, int64_t Kp, int64_t j0,
                                int64_t nj, __m256 (&a)[kRows][V]) {
  const int64_t n = NJ > 0 ? NJ : nj;
#pragma GCC unroll 16
  for (int64_t jj = 0; jj < n; ++jj) {
    const int64_t j = j0 + jj;
    __m256 s[V], cs[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      s[v] = _mm256_loadu_ps(S + j * Kp + 8 * v);
      cs[v] = _mm256_loadu_ps(CS + j * Kp + 8 * v);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xc + r * D + j);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        const __m256 d = _mm256_fmsub_ps(xb, s[v], cs[v]);
        a[r][v] = _mm256_fmadd_ps(d, d, a[r][v]);
      }
    }
  }
}

// acc[r * Kp + 8v ...] = sum_j (xc_rj s_jk - cs_jk)^2 for the kRows rows of xc and the 8V components starting at
// S / CS (already offset by the tile's first component). Three-level blocked summation: kJBlock terms in
// registers (a fully unrolled block), kJSuper / kJBlock blocks in `mid`, then the super-blocks in acc; the
// rounding error grows like (kJBlock + kJSuper / kJBlock + D / kJSuper) eps instead of D eps.
template <int V>
MOEK_AVX2_INLINE void fwd_tile(const float* xc, int64_t D, const float* S, const float* CS, int64_t Kp, float* acc) {
  alignas(32) float mid[kRows * 8 * V];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(acc + r * Kp + 8 * v, _mm256_setzero_ps());
  for (int64_t J0 = 0; J0 < D; J0 += kJSuper) {
    const int64_t J1 = std::min<int64_t>(D, J0 + kJSuper);
    for (int64_t j0 = J0; j0 < J1; j0 += kJBlock) {
      __m256 a[kRows][V];
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) a[r][v] = _mm256_setzero_ps();
      if (j0 + kJBlock <= J1)
        fwd_block<V, kJBlock>(xc, D, S, CS, Kp, j0, kJBlock, a);
      else
        fwd_block<V, 0>(xc, D, S, CS, Kp, j0, J1 - j0, a);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) {
          float* p = mid + (r * V + v) * 8;
          _mm256_store_ps(p, j0 == J0 ? a[r][v] : _mm256_add_ps(_mm256_load_ps(p), a[r][v]));
        }
    }
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) {
        float* p = acc + r * Kp + 8 * v;
        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_load_ps(mid + (r * V + v) * 8)));
      }
  }
}

// Epilogue of kRows rows (the first nr are written): l = bias - acc/2 (in place, Kp lanes per row), log-softmax
// over the first K, argmax (first maximum). The rows are interleaved phase by phase (independent dependency
// chains); the argmax is branch-free: per lane the first maximum's index, then the smallest index among the
// lanes holding the row maximum.
MOEK_AVX2_INLINE void fwd_epilogue(float* acc, const float* bias, int64_t K, int64_t Kp, int64_t nr, float* out,
                                   float* lse, int64_t* assign) {
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t Kfull = K / 8 * 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 mx[kRows];
  __m256i idx[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    mx[r] = ninf;
    idx[r] = _mm256_setzero_si256();
  }
  for (int64_t k = 0; k < Kp; k += 8) {
    const __m256 b = _mm256_loadu_ps(bias + k);
    const __m256i kk = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(k)));
    const __m256 valid = _mm256_castsi256_ps(avx::tail_mask(static_cast<int>(std::min<int64_t>(8, K - k))));
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      float* l = acc + r * Kp + k;
      __m256 v = _mm256_fnmadd_ps(half, _mm256_loadu_ps(l), b);
      if (k >= Kfull) v = _mm256_blendv_ps(ninf, v, valid);  // lanes >= K: -inf (exp -> 0, never the max)
      _mm256_storeu_ps(l, v);
      const __m256 gt = _mm256_cmp_ps(v, mx[r], _CMP_GT_OQ);
      mx[r] = _mm256_blendv_ps(mx[r], v, gt);
      idx[r] = _mm256_blendv_epi8(idx[r], kk, _mm256_castps_si256(gt));
    }
  }
  __m256 mb[kRows], sum[kRows];
  float m[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    m[r] = avx::hmax_ps(mx[r]);
    mb[r] = _mm256_set1_ps(m[r]);
    const __m256i at_max = _mm256_castps_si256(_mm256_cmp_ps(mx[r], mb[r], _CMP_EQ_OQ));
    const int am = avx::hmin_epi32(_mm256_blendv_epi8(_mm256_set1_epi32(0x7fffffff), idx[r], at_max));
    if (r < nr) assign[r] = (am >= 0 && am < K) ? am : 0;  // am out of range only for non-finite rows
    sum[r] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < Kp; k += 8) {
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r)
      sum[r] = _mm256_add_ps(sum[r], avx::exp_nonpos_ps(_mm256_sub_ps(_mm256_loadu_ps(acc + r * Kp + k), mb[r])));
  }
  __m256 lb[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const float ls = m[r] + std::log(avx::hsum_ps(sum[r]));
    if (r < nr) lse[r] = ls;
    lb[r] = _mm256_set1_ps(ls);
  }
  const __m256i tail = avx::tail_mask(static_cast<int>(K - Kfull));
  for (int64_t r = 0; r < nr; ++r) {
    const float* l = acc + r * Kp;
    float* o = out + r * K;
    int64_t k = 0;
    for (; k < Kfull; k += 8) _mm256_storeu_ps(o + k, _mm256_sub_ps(_mm256_loadu_ps(l + k), lb[r]));
    if (k < K) _mm256_maskstore_ps(o + k, tail, _mm256_sub_ps(_mm256_loadu_ps(l + k), lb[r]));
  }
}

MOEK_AVX2 void fwd_avx2_rows(const float* x, int64_t i0, int64_t i1, int64_t D, int64_t K,
                             const FwdConstants<float, float>& P, float* log_resp, float* lse, int64_t* assign) {
  const int64_t Kp = P.ld;
  std::vector<float> xc(kRows * D), acc(kRows * Kp);
  const float* cen = P.centre.data();
  for (int64_t ib = i0; ib < i1; ib += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, i1 - ib);
    if (ib + kPrefetchRows < i1) prefetch_floats(x + (ib + kPrefetchRows) * D, std::min<int64_t>(kRows, i1 - ib - kPrefetchRows) * D);
    for (int64_t r = 0; r < kRows; ++r) {
      float* dst = xc.data() + r * D;
      if (r < nr) {
        const float* src = x + (ib + r) * D;
        int64_t j = 0;
        for (; j + 8 <= D; j += 8)
          _mm256_storeu_ps(dst + j, _mm256_sub_ps(_mm256_loadu_ps(src + j), _mm256_loadu_ps(cen + j)));
        for (; j < D; ++j) dst[j] = src[j] - cen[j];
      } else {
        std::fill(dst, dst + D, 0.0f);
      }
    }
    int64_t k0 = 0;
    for (; k0 + 16 <= Kp; k0 += 16) fwd_tile<2>(xc.data(), D, P.S.data() + k0, P.CS.data() + k0, Kp, acc.data() + k0);
    if (k0 < Kp) fwd_tile<1>(xc.data(), D, P.S.data() + k0, P.CS.data() + k0, Kp, acc.data() + k0);
    fwd_epilogue(acc.data(), P.bias.data(), K, Kp, nr, log_resp + ib * K, lse + ib, assign + ib);
  }
}

void fwd_avx2(const float* x, int64_t B, int64_t D, int64_t K, const FwdConstants<float, float>& P, float* log_resp,
              float* lse, int64_t* assign) {
  const int64_t grain = std::max<int64_t>(kRows, (int64_t(1) << 16) / std::max<int64_t>(1, K * D));
  parallel_rows_dynamic(B, grain, [&](int64_t i0, int64_t i1) {
    fwd_avx2_rows(x, i0, i1, D, K, P, log_resp, lse, assign);
  });
}

// g (nr x K, rows >= nr zero) of kRows rows starting at row i: g = dlr + exp(lr) * (dlse - sum_k dlr).
MOEK_AVX2_INLINE void grad_logits_rows(const float* glr, const float* glse, const float* lr, int64_t i, int64_t nr,
                                       int64_t K, float* g, double* G) {
  const int64_t Kfull = K / 8 * 8;
  for (int64_t r = 0; r < kRows; ++r) {
    float* gr = g + r * K;
    if (r >= nr) {
      std::fill(gr, gr + K, 0.0f);
      continue;
    }
    const float* d = glr + (i + r) * K;
    const float* l = lr + (i + r) * K;
    __m256 t = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < Kfull; k += 8) t = _mm256_add_ps(t, _mm256_loadu_ps(d + k));
    float tot = avx::hsum_ps(t);
    for (; k < K; ++k) tot += d[k];
    const float c = glse[i + r] - tot;
    const __m256 cb = _mm256_set1_ps(c);
    for (k = 0; k < Kfull; k += 8) {
      const __m256 gv = _mm256_fmadd_ps(avx::exp_nonpos_ps(_mm256_loadu_ps(l + k)), cb, _mm256_loadu_ps(d + k));
      _mm256_storeu_ps(gr + k, gv);
      _mm256_storeu_pd(G + k, _mm256_add_pd(_mm256_loadu_pd(G + k), _mm256_cvtps_pd(_mm256_castps256_ps128(gv))));
      _mm256_storeu_pd(G + k + 4, _mm256_add_pd(_mm256_loadu_pd(G + k + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(gv, 1))));
    }
    for (; k < K; ++k) {
      gr[k] = d[k] + std::exp(l[k]) * c;
      G[k] += static_cast<double>(gr[k]);
    }
  }
}

MOEK_AVX2 void flush_avx2(float* mv, double* tot, int64_t n) { flush_loop(mv, tot, n); }

MOEK_AVX2 void bwd_avx2_rows(const float* glr, const float* glse, const float* x, const float* lr, int64_t i0,
                             int64_t i1, int64_t D, int64_t K, const BwdConstants<float, float>& P, float* dx,
                             BwdTotals& tot) {
  const int64_t Dp = P.ld;
  std::vector<float> MV(K * Dp * 2, 0.0f), xc(kRows * Dp, 0.0f), g(kRows * K);
  const float* cen = P.centre.data();
  const float* IV = P.IV.data();
  const float* CC = P.CC.data();
  const int64_t Dfull = D / 8 * 8;
  const __m256i dmask = avx::tail_mask(static_cast<int>(D - Dfull));
  int64_t since_flush = 0;
  for (int64_t ib = i0; ib < i1; ib += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, i1 - ib);
    if (ib + kRows < i1) {
      const int64_t nn = std::min<int64_t>(kRows, i1 - ib - kRows);
      prefetch_floats(x + (ib + kRows) * D, nn * D);
      prefetch_floats(glr + (ib + kRows) * K, nn * K);
      prefetch_floats(lr + (ib + kRows) * K, nn * K);
    }
    for (int64_t r = 0; r < kRows; ++r) {
      float* dst = xc.data() + r * Dp;
      if (r < nr) {
        const float* src = x + (ib + r) * D;
        for (int64_t j = 0; j < D; ++j) dst[j] = src[j] - cen[j];  // pad columns stay 0
      } else {
        std::fill(dst, dst + Dp, 0.0f);
      }
    }
    grad_logits_rows(glr, glse, lr, ib, nr, K, g.data(), tot.G.data());
    const float* g0 = g.data();
    const float* g1 = g0 + K;
    const float* g2 = g1 + K;
    const float* g3 = g2 + K;
    for (int64_t j = 0; j < Dp; j += 8) {
      const __m256 x0 = _mm256_loadu_ps(xc.data() + 0 * Dp + j);
      const __m256 x1 = _mm256_loadu_ps(xc.data() + 1 * Dp + j);
      const __m256 x2 = _mm256_loadu_ps(xc.data() + 2 * Dp + j);
      const __m256 x3 = _mm256_loadu_ps(xc.data() + 3 * Dp + j);
      __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
      float* mv = MV.data() + (j / 8) * K * 16;
      for (int64_t k = 0; k < K; ++k) {
        const __m256 iv = _mm256_loadu_ps(IV + k * Dp + j);
        const __m256 cc = _mm256_loadu_ps(CC + k * Dp + j);
        const __m256 e0 = _mm256_sub_ps(x0, cc);
        const __m256 e1 = _mm256_sub_ps(x1, cc);
        const __m256 e2 = _mm256_sub_ps(x2, cc);
        const __m256 e3 = _mm256_sub_ps(x3, cc);
        const __m256 ge0 = _mm256_mul_ps(_mm256_broadcast_ss(g0 + k), e0);
        const __m256 ge1 = _mm256_mul_ps(_mm256_broadcast_ss(g1 + k), e1);
        const __m256 ge2 = _mm256_mul_ps(_mm256_broadcast_ss(g2 + k), e2);
        const __m256 ge3 = _mm256_mul_ps(_mm256_broadcast_ss(g3 + k), e3);
        d0 = _mm256_fmadd_ps(ge0, iv, d0);
        d1 = _mm256_fmadd_ps(ge1, iv, d1);
        d2 = _mm256_fmadd_ps(ge2, iv, d2);
        d3 = _mm256_fmadd_ps(ge3, iv, d3);
        const __m256 msum = _mm256_add_ps(_mm256_add_ps(ge0, ge1), _mm256_add_ps(ge2, ge3));
        __m256 vsum = _mm256_mul_ps(ge0, e0);
        vsum = _mm256_fmadd_ps(ge1, e1, vsum);
        vsum = _mm256_fmadd_ps(ge2, e2, vsum);
        vsum = _mm256_fmadd_ps(ge3, e3, vsum);
        float* m = mv + k * 16;
        _mm256_storeu_ps(m, _mm256_add_ps(_mm256_loadu_ps(m), msum));
        _mm256_storeu_ps(m + 8, _mm256_add_ps(_mm256_loadu_ps(m + 8), vsum));
      }
      const __m256 dr[kRows] = {d0, d1, d2, d3};
      for (int64_t r = 0; r < nr; ++r) {
        const __m256 out = _mm256_sub_ps(_mm256_setzero_ps(), dr[r]);
        float* dst = dx + (ib + r) * D + j;
        if (j < Dfull)
          _mm256_storeu_ps(dst, out);
        else
          _mm256_maskstore_ps(dst, dmask, out);
      }
    }
    since_flush += kRows;
    if (since_flush >= kFlushRows) {
      flush_avx2(MV.data(), tot.MV.data(), static_cast<int64_t>(MV.size()));
      since_flush = 0;
    }
  }
  flush_avx2(MV.data(), tot.MV.data(), static_cast<int64_t>(MV.size()));
}

void bwd_avx2(const float* glr, const float* glse, const float* x, const float* lr, int64_t B, int64_t D, int64_t K,
              const BwdConstants<float, float>& P, float* dx, std::vector<BwdTotals>& totals) {
  const int64_t grain = std::max<int64_t>(kRows, (int64_t(1) << 15) / std::max<int64_t>(1, K * D));
  parallel_rows(B, grain, [&](int64_t c, int64_t i0, int64_t i1) {
    bwd_avx2_rows(glr, glse, x, lr, i0, i1, D, K, P, dx, totals[c]);
  });
}
#endif  // MOEKERNELS_HAVE_AVX2_PATH

// ================================================================================== ops
void check_inputs(const at::Tensor& x, const at::Tensor& means, const at::Tensor& log_var, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (B, D), got ", x.sizes());
  TORCH_CHECK(means.dim() == 2 && means.size(1) == x.size(1) && means.size(0) >= 1, op,
              ": means must be (K, D) with K >= 1 and D = ", x.size(1), ", got ", means.sizes());
  TORCH_CHECK(log_var.sizes() == means.sizes(), op, ": log_var must be (K, D) = ", means.sizes(), ", got ",
              log_var.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the cpu kernel supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(means.scalar_type() == x.scalar_type() && log_var.scalar_type() == x.scalar_type(), op,
              ": all inputs must have the same dtype");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mog_posterior_fwd_cpu(const at::Tensor& x_, const at::Tensor& means_,
                                                                     const at::Tensor& log_var_,
                                                                     const at::Tensor& logpi_) {
  check_inputs(x_, means_, log_var_, "mog_posterior_fwd");
  TORCH_CHECK(logpi_.dim() == 1 && logpi_.size(0) == means_.size(0) && logpi_.scalar_type() == x_.scalar_type(),
              "mog_posterior_fwd: logpi must be (K,) of the same dtype, got ", logpi_.sizes());
  const at::Tensor x = x_.contiguous(), means = means_.contiguous(), log_var = log_var_.contiguous(),
                   logpi = logpi_.contiguous();
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0);
  at::Tensor log_resp = at::empty({B, K}, x.options());
  at::Tensor lse = at::empty({B}, x.options());
  at::Tensor assign = at::empty({B}, x.options().dtype(at::kLong));
  if (B == 0) return {log_resp, lse, assign};
  if (x.scalar_type() == at::kFloat) {
    const FwdConstants<float, float> P(means.data_ptr<float>(), log_var.data_ptr<float>(), logpi.data_ptr<float>(), K,
                                       D, 8);
#if defined(MOEKERNELS_HAVE_AVX2_PATH)
    if (use_avx2_float()) {
      fwd_avx2(x.data_ptr<float>(), B, D, K, P, log_resp.data_ptr<float>(), lse.data_ptr<float>(),
               assign.data_ptr<int64_t>());
      return {log_resp, lse, assign};
    }
#endif
    fwd_generic<float, float>(x.data_ptr<float>(), B, D, K, P, log_resp.data_ptr<float>(), lse.data_ptr<float>(),
                              assign.data_ptr<int64_t>());
  } else {
    const FwdConstants<double, double> P(means.data_ptr<double>(), log_var.data_ptr<double>(),
                                         logpi.data_ptr<double>(), K, D, 4);
    fwd_generic<double, double>(x.data_ptr<double>(), B, D, K, P, log_resp.data_ptr<double>(),
                                lse.data_ptr<double>(), assign.data_ptr<int64_t>());
  }
  return {log_resp, lse, assign};
}

// dmeans = iv M, dlog_var = (iv V - G) / 2, dlogpi = G from the per-thread totals (iv recomputed in float64).
template <typename T>
void finish_bwd(const T* log_var, const std::vector<BwdTotals>& totals, int64_t K, int64_t D,
                at::Tensor& dmeans, at::Tensor& dlog_var, at::Tensor& dlogpi) {
  T* dm = dmeans.data_ptr<T>();
  T* dv = dlog_var.data_ptr<T>();
  T* dp = dlogpi.data_ptr<T>();
  for (int64_t k = 0; k < K; ++k) {
    double gk = 0;
    for (const auto& t : totals) gk += t.G[k];
    dp[k] = static_cast<T>(gk);
    for (int64_t j = 0; j < D; ++j) {
      double m = 0, v = 0;
      for (const auto& t : totals) {
        m += t.M(K, k, j);
        v += t.V(K, k, j);
      }
      const double iv = std::exp(-static_cast<double>(log_var[k * D + j]));
      dm[k * D + j] = static_cast<T>(iv * m);
      dv[k * D + j] = static_cast<T>(0.5 * (iv * v - gk));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mog_posterior_bwd_cpu(
    const at::Tensor& grad_log_resp_, const at::Tensor& grad_lse_, const at::Tensor& x_, const at::Tensor& means_,
    const at::Tensor& log_var_, const at::Tensor& log_resp_) {
  check_inputs(x_, means_, log_var_, "mog_posterior_bwd");
  const int64_t B = x_.size(0), D = x_.size(1), K = means_.size(0);
  TORCH_CHECK(grad_log_resp_.sizes() == at::IntArrayRef({B, K}) && log_resp_.sizes() == at::IntArrayRef({B, K}),
              "mog_posterior_bwd: grad_log_resp and log_resp must be (B, K) = (", B, ", ", K, ")");
  TORCH_CHECK(grad_lse_.dim() == 1 && grad_lse_.size(0) == B, "mog_posterior_bwd: grad_lse must be (B,) = (", B, ")");
  const auto st = x_.scalar_type();
  TORCH_CHECK(grad_log_resp_.scalar_type() == st && grad_lse_.scalar_type() == st && log_resp_.scalar_type() == st,
              "mog_posterior_bwd: all inputs must have the same dtype");
  const at::Tensor glr = grad_log_resp_.contiguous(), glse = grad_lse_.contiguous(), x = x_.contiguous(),
                   means = means_.contiguous(), log_var = log_var_.contiguous(), lr = log_resp_.contiguous();
  at::Tensor dx = at::empty({B, D}, x.options());
  at::Tensor dmeans = at::empty({K, D}, x.options());
  at::Tensor dlog_var = at::empty({K, D}, x.options());
  at::Tensor dlogpi = at::empty({K}, x.options());
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  if (st == at::kFloat) {
    const BwdConstants<float, float> P(means.data_ptr<float>(), log_var.data_ptr<float>(), K, D);
    std::vector<BwdTotals> totals(nt, BwdTotals(K, P.ld));
#if defined(MOEKERNELS_HAVE_AVX2_PATH)
    if (use_avx2_float())
      bwd_avx2(glr.data_ptr<float>(), glse.data_ptr<float>(), x.data_ptr<float>(), lr.data_ptr<float>(), B, D, K, P,
               dx.data_ptr<float>(), totals);
    else
#endif
      bwd_generic<float, float>(glr.data_ptr<float>(), glse.data_ptr<float>(), x.data_ptr<float>(),
                                lr.data_ptr<float>(), B, D, K, P, dx.data_ptr<float>(), totals);
    finish_bwd<float>(log_var.data_ptr<float>(), totals, K, D, dmeans, dlog_var, dlogpi);
  } else {
    const BwdConstants<double, double> P(means.data_ptr<double>(), log_var.data_ptr<double>(), K, D);
    std::vector<BwdTotals> totals(nt, BwdTotals(K, P.ld));
    bwd_generic<double, double>(glr.data_ptr<double>(), glse.data_ptr<double>(), x.data_ptr<double>(),
                                lr.data_ptr<double>(), B, D, K, P, dx.data_ptr<double>(), totals);
    finish_bwd<double>(log_var.data_ptr<double>(), totals, K, D, dmeans, dlog_var, dlogpi);
  }
  return {dx, dmeans, dlog_var, dlogpi};
}

}  // namespace
}  // namespace moekernels

TORCH_LIBRARY_IMPL(moekernels, CPU, m) {
  m.impl("mog_posterior_fwd", &moekernels::mog_posterior_fwd_cpu);
  m.impl("mog_posterior_bwd", &moekernels::mog_posterior_bwd_cpu);
}
