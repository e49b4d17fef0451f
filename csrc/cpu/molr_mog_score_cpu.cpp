// molr_mog_score (DESIGN.md 3.1) on the CPU: rows in blocks, blocks in parallel.
//
// Forward, per block of BS rows (general A):
//   Z = X_blk A_cat                      (BS x K*d: one GEMM into a thread-local buffer; single-threaded inside
//                                         at::parallel_for)
//   per row: logits, softmax, c_k        (cache-resident; the per-(k,l) constants 1/m, s mu, bias are recomputed
//                                         only when (s, gamma) differs from the previous row's)
//   score_blk = C A_cat^T - X / gamma^2  (one more GEMM, straight into the output)
// No B x K x L x d tensor exists. A = None (identity): no GEMM; score = -sum_kl w_kl e_kl / m_kl per row.
//
// Backward, per block: Z = X_blk A_cat and dC = G_blk A_cat (two GEMMs); per row the weights are recomputed
// (softmax of the recomputed logits, see molr_mog_score.h) and C, dZ formed; dX_blk = dZ A_cat^T - (G + dlse X)
// / gamma^2; dA_cat += G^T C + X^T dZ into a per-chunk accumulator (GEMMs with beta = 1), reduced at the end in a
// fixed order (deterministic for a given thread count). dmu, dlog_var, dlogpi: per-chunk accumulators.
//
// The per-row math runs either on the generic functions of molr_mog_score.h (float64; CPUs without AVX2; or
// MOEKERNELS_CPU_GENERIC=1) or on an AVX2+FMA version of the same formulas for float32 (runtime dispatch).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "molr_mog_score.h"

#include "cpu_simd.h"
#if defined(MOEKERNELS_HAVE_AVX2_PATH)
#define MOLR_HAVE_AVX2 1
#define MOLR_AVX2 MOEK_AVX2
#define MOLR_AVX2_INLINE MOEK_AVX2_INLINE
#endif

namespace moekernels {
namespace molr {
namespace {

constexpr int64_t kBlockRows = 128;  // rows per GEMM block (general A)
constexpr int64_t kIdentityRows = 32;  // rows per parallel task (identity: no GEMM)

struct Dims {
  int64_t D, K, L, d, KL, Kd, dp;  // dp: per-(k,l) stride of the padded constants (d rounded up to 8)
  bool identity;
};

// ------------------------------------------------------------------------------------------- per-(k,l) constants
// Padded (KL, dp) layout, zeros in the padding lanes (so a padded lane contributes exactly 0 everywhere).
template <typename T>
struct Consts {
  const Dims& dm;
  const T* mu_p;   // (KL, dp) mu
  const T* v_p;    // (KL, dp) exp(log_var)
  const T* logpi;  // (KL)
  std::vector<T> inv_m, smu, bias;
  mutable std::vector<T> scratch;  // (K) per-row scratch of the row kernels
  std::vector<int64_t> zoff;       // (KL) offset of z_k in a row for component kl: (kl / L) * d, 0 for the identity
  T s = std::numeric_limits<T>::quiet_NaN(), g = std::numeric_limits<T>::quiet_NaN();

  Consts(const Dims& dm_, const T* mu_p_, const T* v_p_, const T* logpi_)
      : dm(dm_), mu_p(mu_p_), v_p(v_p_), logpi(logpi_), inv_m(dm_.KL * dm_.dp, T(0)), smu(dm_.KL * dm_.dp, T(0)),
        bias(dm_.KL), scratch(dm_.K), zoff(dm_.KL) {
    for (int64_t kl = 0; kl < dm.KL; ++kl) zoff[kl] = dm.identity ? 0 : (kl / dm.L) * dm.d;
  }

  bool stale(T s_, T g_) const { return !(s_ == s && g_ == g); }

  void update_generic(T s_, T g_) {
    s = s_;
    g = g_;
    for (int64_t kl = 0; kl < dm.KL; ++kl)
      bias[kl] = kl_constants<T>(mu_p + kl * dm.dp, v_p + kl * dm.dp, logpi[kl], s, g * g, dm.d,
                                 inv_m.data() + kl * dm.dp, smu.data() + kl * dm.dp);
  }
};

template <typename T>
T sum_sq(const T* a, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * a[i];
  return acc;
}

// ------------------------------------------------------------------------------------------- generic rows
// The header's per-row functions, any floating type.
template <typename T>
struct GenericRows {
  // Logits l' (KL) of one row into w, then the softmax in place; returns logsumexp(l').
  static T weights(const T* x, const T* z, const Dims& dm, const Consts<T>& cs, T* w) {
    const T inv_g2 = T(1) / (cs.g * cs.g);
    const int64_t zs = dm.identity ? 0 : dm.d;
    const T xx = dm.identity ? T(0) : sum_sq(x, dm.D);
    for (int64_t k = 0; k < dm.K; ++k) {
      const T* zk = z + k * zs;
      const T proj = dm.identity ? T(0) : (sum_sq(zk, dm.d) - xx) * (T(0.5) * inv_g2);
      for (int64_t l = 0; l < dm.L; ++l) {
        const int64_t kl = k * dm.L + l;
        w[kl] = kl_logit<T>(zk, cs.smu.data() + kl * dm.dp, cs.inv_m.data() + kl * dm.dp, dm.d, cs.bias[kl], proj);
      }
    }
    return row_weights<T>(w, dm.KL);
  }

  // c (general: (K*d) c_k; identity: (d) the score row).
  static void expert_cs(const T* z, const T* w, const Dims& dm, const Consts<T>& cs, T* c) {
    const T inv_g2 = T(1) / (cs.g * cs.g);
    for (int64_t k = 0; k < dm.K; ++k) {
      const int64_t o = k * dm.L * dm.dp;
      if (dm.identity)
        expert_c<T>(z, w + k * dm.L, cs.smu.data() + o, cs.inv_m.data() + o, dm.L, dm.d, T(0), c, k > 0,
                    dm.dp);
      else
        expert_c<T>(z + k * dm.d, w + k * dm.L, cs.smu.data() + o, cs.inv_m.data() + o, dm.L, dm.d, inv_g2,
                    c + k * dm.d, false, dm.dp);
    }
  }

  static void update(Consts<T>& cs, T s, T g) { cs.update_generic(s, g); }

  static T forward_row(const T* x, const T* z, const Dims& dm, const Consts<T>& cs, T* w, T* c) {
    const T lse_rel = weights(x, z, dm, cs, w);
    expert_cs(z, w, dm, cs, c);
    return lse_rel;
  }

  // General: z, dc rows of Z, dC; writes C row (c) and dZ row (dz). Identity: z = x, dc = G; writes dx into dz.
  // Returns sum_kl dl_kl (= dlse up to rounding; the dx epilogue uses it, see molr_mog_score.h).
  static T backward_row(const T* x, const T* z, const T* dc, T dlse, const T* gw, const Dims& dm,
                           const Consts<T>& cs, T* w, T* dw, T* aW, T* c, T* dz, T* dmu_acc, T* dvar_acc,
                           T* dlp_acc) {
    const T inv_g2 = T(1) / (cs.g * cs.g);
    const T ig2 = dm.identity ? T(0) : inv_g2;
    const int64_t zs = dm.identity ? 0 : dm.d, L = dm.L, d = dm.d, dp = dm.dp;
    weights(x, z, dm, cs, w);
    T* a = aW;           // (K) a_k = dc_k . z_k / gamma^2
    T* Wk = aW + dm.K;   // (K) W_k
    for (int64_t k = 0; k < dm.K; ++k) {
      T t = 0;
      for (int64_t i = 0; i < d; ++i) t += dc[k * zs + i] * z[k * zs + i];
      a[k] = t * ig2;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t kl = k * L + l;
        dw[kl] = kl_dw<T>(dc + k * zs, z + k * zs, cs.smu.data() + kl * dp, cs.inv_m.data() + kl * dp, d, T(0),
                          gw ? gw[kl] : T(0));
      }
    }
    if (!dm.identity) expert_cs(z, w, dm, cs, c);
    row_dlogits_split<T>(w, a, dw, Wk, dm.K, L, dlse);  // dw -> dl
    std::fill(dz, dz + (dm.identity ? d : dm.Kd), T(0));
    for (int64_t k = 0; k < dm.K; ++k) {
      T* dzk = dz + k * zs;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t kl = k * L + l;
        kl_backward<T>(dc + k * zs, z + k * zs, cs.smu.data() + kl * dp, cs.inv_m.data() + kl * dp, d, w[kl],
                       dw[kl], cs.s, dzk, dmu_acc + kl * dp, dvar_acc + kl * dp);
        dlp_acc[kl] += dw[kl];
      }
      if (!dm.identity) {
        T W = 0, Dl = 0;
        for (int64_t l = 0; l < L; ++l) {
          W += w[k * L + l];
          Dl += dw[k * L + l];
        }
        const T* zk = z + k * d;
        const T* dck = dc + k * d;
        for (int64_t i = 0; i < d; ++i) dzk[i] += (W * dck[i] + Dl * zk[i]) * inv_g2;
      }
    }
    T dl_sum = 0;
    for (int64_t kl = 0; kl < dm.KL; ++kl) dl_sum += dw[kl];
    return dl_sum;
  }

  // out -= x * a   (score epilogue)          and   out -= (g + b x) * a   (dx epilogue)
  static void axpy_rows(T* out, const T* x, T a, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[j] -= x[j] * a;
  }
  static void dx_epilogue(T* out, const T* g, const T* x, T a, T b, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[j] -= (g[j] + b * x[j]) * a;
  }
};

// ------------------------------------------------------------------------------------------- AVX2 rows (float32)
#if defined(MOLR_HAVE_AVX2)
namespace simd {

using cpu::avx2::exp_ps;
using cpu::avx2::hsum8x8;
using cpu::avx2::log_ps;
using cpu::avx2::tail_mask;
MOLR_AVX2_INLINE float hsum(__m256 v) { return cpu::avx2::hsum_ps(v); }
MOLR_AVX2_INLINE float hmax(__m256 v) { return cpu::avx2::hmax_ps(v); }

// Chunks of 8 lanes over a length-d vector; the last one masked when d % 8 != 0.
struct Chunks {
  int64_t n;      // number of chunks (dp / 8)
  bool full;      // the last chunk is full
  __m256i mask;   // lanes of the last chunk

  MOLR_AVX2 explicit Chunks(int64_t d) : n((d + 7) / 8), full(d % 8 == 0), mask(tail_mask(d - 8 * ((d + 7) / 8 - 1))) {}
  MOLR_AVX2_INLINE bool partial(int64_t ch) const { return !full && ch + 1 == n; }
  MOLR_AVX2_INLINE __m256 load(const float* p, int64_t ch) const {
    return partial(ch) ? _mm256_maskload_ps(p + 8 * ch, mask) : _mm256_loadu_ps(p + 8 * ch);
  }
  MOLR_AVX2_INLINE void store(float* p, int64_t ch, __m256 v) const {
    if (partial(ch))
      _mm256_maskstore_ps(p + 8 * ch, mask, v);
    else
      _mm256_storeu_ps(p + 8 * ch, v);
  }
};

MOLR_AVX2_INLINE float sum_sq(const float* a, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 u = _mm256_loadu_ps(a + j), v = _mm256_loadu_ps(a + j + 8);
    a0 = _mm256_fmadd_ps(u, u, a0);
    a1 = _mm256_fmadd_ps(v, v, a1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 u = _mm256_loadu_ps(a + j);
    a0 = _mm256_fmadd_ps(u, u, a0);
  }
  if (j < n) {
    const __m256 u = _mm256_maskload_ps(a + j, tail_mask(n - j));
    a1 = _mm256_fmadd_ps(u, u, a1);
  }
  return hsum(_mm256_add_ps(a0, a1));
}

struct Avx2Rows {
  MOLR_AVX2 static void update(Consts<float>& cs, float s, float g) {
    const Dims& dm = cs.dm;
    cs.s = s;
    cs.g = g;
    const Chunks ch(dm.d);
    const __m256 S = _mm256_set1_ps(s), S2 = _mm256_set1_ps(s * s), G2 = _mm256_set1_ps(g * g);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 lastmask = _mm256_castsi256_ps(ch.mask);
    for (int64_t kl = 0; kl < dm.KL; ++kl) {
      const int64_t o = kl * dm.dp;
      __m256 sl = _mm256_setzero_ps();
      for (int64_t c = 0; c < ch.n; ++c) {
        const __m256 m = _mm256_fmadd_ps(S2, _mm256_loadu_ps(cs.v_p + o + 8 * c), G2);
        __m256 im = _mm256_div_ps(one, m), lm = log_ps(m);
        if (ch.partial(c)) {
          im = _mm256_and_ps(im, lastmask);
          lm = _mm256_and_ps(lm, lastmask);
        }
        _mm256_storeu_ps(cs.inv_m.data() + o + 8 * c, im);
        _mm256_storeu_ps(cs.smu.data() + o + 8 * c, _mm256_mul_ps(S, _mm256_loadu_ps(cs.mu_p + o + 8 * c)));
        sl = _mm256_add_ps(sl, lm);
      }
      cs.bias[kl] = cs.logpi[kl] - 0.5f * hsum(sl);
    }
  }

  MOLR_AVX2 static float weights(const float* x, const float* z, const Dims& dm, const Consts<float>& cs,
                                 float* w) {
    const Chunks ch(dm.d);
    const float inv_g2 = 1.0f / (cs.g * cs.g);
    const int64_t zs = dm.identity ? 0 : dm.d;
    const float xx = dm.identity ? 0.0f : sum_sq(x, dm.D);
    const float* smu = cs.smu.data();
    const float* im = cs.inv_m.data();
    float* proj = cs.scratch.data();  // (K) (||z_k||^2 - ||x||^2) / (2 gamma^2)
    for (int64_t k = 0; k < dm.K; ++k)
      proj[k] = dm.identity ? 0.0f : (sum_sq(z + k * zs, dm.d) - xx) * (0.5f * inv_g2);
    // quad_kl = sum_i e^2 / m, eight components at a time (one transposing reduction instead of eight hsums)
    const int64_t KL = dm.KL, L = dm.L;
    int64_t kl = 0;
    for (; kl + 8 <= KL; kl += 8) {
      __m256 q[8];
      for (int j = 0; j < 8; ++j) {
        const float* zk = z + cs.zoff[kl + j];
        const int64_t o = (kl + j) * dm.dp;
        q[j] = _mm256_setzero_ps();
        for (int64_t c = 0; c < ch.n; ++c) {
          const __m256 e = _mm256_sub_ps(ch.load(zk, c), _mm256_loadu_ps(smu + o + 8 * c));
          q[j] = _mm256_fmadd_ps(_mm256_mul_ps(e, _mm256_loadu_ps(im + o + 8 * c)), e, q[j]);
        }
      }
      _mm256_storeu_ps(w + kl, _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), hsum8x8(q), _mm256_loadu_ps(cs.bias.data() + kl)));
    }
    for (; kl < KL; ++kl) {
      const float* zk = z + cs.zoff[kl];
      const int64_t o = kl * dm.dp;
      __m256 q = _mm256_setzero_ps();
      for (int64_t c = 0; c < ch.n; ++c) {
        const __m256 e = _mm256_sub_ps(ch.load(zk, c), _mm256_loadu_ps(smu + o + 8 * c));
        q = _mm256_fmadd_ps(_mm256_mul_ps(e, _mm256_loadu_ps(im + o + 8 * c)), e, q);
      }
      w[kl] = cs.bias[kl] - 0.5f * hsum(q);
    }
    if (!dm.identity)
      for (int64_t k = 0; k < dm.K; ++k)
        for (int64_t l = 0; l < L; ++l) w[k * L + l] += proj[k];
    // softmax in place
    const int64_t n = dm.KL, n8 = n & ~int64_t(7);
    float mx = -std::numeric_limits<float>::infinity();
    if (n8) {
      __m256 vm = _mm256_loadu_ps(w);
      for (int64_t j = 8; j < n8; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(w + j));
      mx = hmax(vm);
    }
    for (int64_t j = n8; j < n; ++j) mx = std::max(mx, w[j]);
    const __m256 MX = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(w + j), MX));
      _mm256_storeu_ps(w + j, e);
      vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum(vs);
    for (int64_t j = n8; j < n; ++j) {
      w[j] = std::exp(w[j] - mx);
      sum += w[j];
    }
    const float inv = 1.0f / sum;
    const __m256 INV = _mm256_set1_ps(inv);
    for (int64_t j = 0; j < n8; j += 8) _mm256_storeu_ps(w + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), INV));
    for (int64_t j = n8; j < n; ++j) w[j] *= inv;
    return mx + std::log(sum);
  }

  MOLR_AVX2 static void expert_cs(const float* z, const float* w, const Dims& dm, const Consts<float>& cs,
                                  float* c) {
    const Chunks ch(dm.d);
    const float inv_g2 = dm.identity ? 0.0f : 1.0f / (cs.g * cs.g);
    const float* smu = cs.smu.data();
    const float* im = cs.inv_m.data();
    for (int64_t k = 0; k < dm.K; ++k) {
      const float* zk = dm.identity ? z : z + k * dm.d;
      float* ck = dm.identity ? c : c + k * dm.d;
      float W = 0;
      for (int64_t l = 0; l < dm.L; ++l) W += w[k * dm.L + l];
      const __m256 WG = _mm256_set1_ps(W * inv_g2);
      for (int64_t cc = 0; cc < ch.n; ++cc) {
        const __m256 zc = ch.load(zk, cc);
        __m256 acc = dm.identity ? (k == 0 ? _mm256_setzero_ps() : ch.load(ck, cc)) : _mm256_mul_ps(WG, zc);
        for (int64_t l = 0; l < dm.L; ++l) {
          const int64_t o = (k * dm.L + l) * dm.dp + 8 * cc;
          const __m256 e = _mm256_sub_ps(zc, _mm256_loadu_ps(smu + o));
          acc = _mm256_fnmadd_ps(_mm256_set1_ps(w[k * dm.L + l]), _mm256_mul_ps(e, _mm256_loadu_ps(im + o)), acc);
        }
        ch.store(ck, cc, acc);
      }
    }
  }

  MOLR_AVX2 static float forward_row(const float* x, const float* z, const Dims& dm, const Consts<float>& cs,
                                     float* w, float* c) {
    const float lse_rel = weights(x, z, dm, cs, w);
    expert_cs(z, w, dm, cs, c);
    return lse_rel;
  }

  MOLR_AVX2 static float backward_row(const float* x, const float* z, const float* dc, float dlse, const float* gw,
                                     const Dims& dm, const Consts<float>& cs, float* w, float* dw, float* aW,
                                     float* c, float* dz, float* dmu_acc, float* dvar_acc, float* dlp_acc) {
    const Chunks ch(dm.d);
    const float inv_g2 = 1.0f / (cs.g * cs.g);
    const int64_t zs = dm.identity ? 0 : dm.d, L = dm.L;
    const float* smu = cs.smu.data();
    const float* im = cs.inv_m.data();
    weights(x, z, dm, cs, w);
    float* a = aW;          // (K) a_k = dc_k . z_k / gamma^2
    float* Wk = aW + dm.K;  // (K) W_k
    for (int64_t k = 0; k < dm.K; ++k) {
      const float* zk = z + k * zs;
      const float* dck = dc + k * zs;
      __m256 acc_a = _mm256_setzero_ps();
      for (int64_t cc = 0; cc < ch.n; ++cc) acc_a = _mm256_fmadd_ps(ch.load(dck, cc), ch.load(zk, cc), acc_a);
      a[k] = dm.identity ? 0.0f : hsum(acc_a) * inv_g2;
    }
    // b_kl = g_w_kl - dc_k . e_kl / m_kl, eight components at a time
    int64_t kl = 0;
    for (; kl + 8 <= dm.KL; kl += 8) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) {
        const int64_t o = (kl + j) * dm.dp;
        const float* zk = z + cs.zoff[kl + j];
        const float* dck = dc + cs.zoff[kl + j];
        acc[j] = _mm256_setzero_ps();
        for (int64_t cc = 0; cc < ch.n; ++cc) {
          const __m256 e = _mm256_sub_ps(ch.load(zk, cc), _mm256_loadu_ps(smu + o + 8 * cc));
          acc[j] = _mm256_fmadd_ps(ch.load(dck, cc), _mm256_mul_ps(e, _mm256_loadu_ps(im + o + 8 * cc)), acc[j]);
        }
      }
      const __m256 g8 = gw ? _mm256_loadu_ps(gw + kl) : _mm256_setzero_ps();
      _mm256_storeu_ps(dw + kl, _mm256_sub_ps(g8, hsum8x8(acc)));
    }
    for (; kl < dm.KL; ++kl) {
      const int64_t o = kl * dm.dp;
      const float* zk = z + cs.zoff[kl];
      const float* dck = dc + cs.zoff[kl];
      __m256 acc = _mm256_setzero_ps();
      for (int64_t cc = 0; cc < ch.n; ++cc) {
        const __m256 e = _mm256_sub_ps(ch.load(zk, cc), _mm256_loadu_ps(smu + o + 8 * cc));
        acc = _mm256_fmadd_ps(ch.load(dck, cc), _mm256_mul_ps(e, _mm256_loadu_ps(im + o + 8 * cc)), acc);
      }
      dw[kl] = (gw ? gw[kl] : 0.0f) - hsum(acc);
    }
    if (!dm.identity) expert_cs(z, w, dm, cs, c);
    row_dlogits_split<float>(w, a, dw, Wk, dm.K, L, dlse);  // dw -> dl
    if (dm.identity) std::fill(dz, dz + dm.d, 0.0f);
    const __m256 S = _mm256_set1_ps(cs.s), S2 = _mm256_set1_ps(cs.s * cs.s), HALF = _mm256_set1_ps(0.5f);
    for (int64_t k = 0; k < dm.K; ++k) {
      const float* zk = z + k * zs;
      const float* dck = dc + k * zs;
      float W = 0, Dl = 0;
      for (int64_t l = 0; l < L; ++l) {
        W += w[k * L + l];
        Dl += dw[k * L + l];
        dlp_acc[k * L + l] += dw[k * L + l];
      }
      for (int64_t cc = 0; cc < ch.n; ++cc) {
        const __m256 zc = ch.load(zk, cc), dcc = ch.load(dck, cc);
        __m256 dzacc = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; ++l) {
          const int64_t o = (k * L + l) * dm.dp + 8 * cc;
          const __m256 imv = _mm256_loadu_ps(im + o);
          const __m256 e = _mm256_sub_ps(zc, _mm256_loadu_ps(smu + o));
          const __m256 ei = _mm256_mul_ps(e, imv);
          const __m256 DL = _mm256_set1_ps(dw[k * L + l]);
          const __m256 wdc = _mm256_mul_ps(_mm256_set1_ps(w[k * L + l]), dcc);
          const __m256 de = _mm256_fnmadd_ps(_mm256_fmadd_ps(DL, e, wdc), imv, _mm256_setzero_ps());
          const __m256 dmv = _mm256_fmsub_ps(_mm256_mul_ps(wdc, ei), imv,
                                             _mm256_mul_ps(_mm256_mul_ps(HALF, DL), _mm256_fnmadd_ps(ei, ei, imv)));
          dzacc = _mm256_add_ps(dzacc, de);
          _mm256_storeu_ps(dmu_acc + o, _mm256_fnmadd_ps(S, de, _mm256_loadu_ps(dmu_acc + o)));
          _mm256_storeu_ps(dvar_acc + o, _mm256_fmadd_ps(S2, dmv, _mm256_loadu_ps(dvar_acc + o)));
        }
        if (dm.identity) {
          ch.store(dz, cc, _mm256_add_ps(ch.load(dz, cc), dzacc));
        } else {
          dzacc = _mm256_fmadd_ps(_mm256_set1_ps(W * inv_g2), dcc, dzacc);
          dzacc = _mm256_fmadd_ps(_mm256_set1_ps(Dl * inv_g2), zc, dzacc);
          ch.store(dz + k * dm.d, cc, dzacc);
        }
      }
    }
    float dl_sum = 0;
    for (int64_t kl = 0; kl < dm.KL; ++kl) dl_sum += dw[kl];
    return dl_sum;
  }

  MOLR_AVX2 static void axpy_rows(float* out, const float* x, float a, int64_t n) {
    const __m256 A = _mm256_set1_ps(a);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(out + j, _mm256_fnmadd_ps(_mm256_loadu_ps(x + j), A, _mm256_loadu_ps(out + j)));
    for (; j < n; ++j) out[j] -= x[j] * a;
  }
  MOLR_AVX2 static void dx_epilogue(float* out, const float* g, const float* x, float a, float b, int64_t n) {
    const __m256 A = _mm256_set1_ps(a), Bv = _mm256_set1_ps(b);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 t = _mm256_fmadd_ps(Bv, _mm256_loadu_ps(x + j), _mm256_loadu_ps(g + j));
      _mm256_storeu_ps(out + j, _mm256_fnmadd_ps(t, A, _mm256_loadu_ps(out + j)));
    }
    for (; j < n; ++j) out[j] -= (g[j] + b * x[j]) * a;
  }
};

}  // namespace simd
#endif  // MOLR_HAVE_AVX2

// ------------------------------------------------------------------------------------------- drivers
struct Prepared {
  Dims dm;
  at::Tensor A_cat;  // (D, K*d) contiguous, undefined for the identity
  at::Tensor mu_p, v_p, v;  // padded (KL, dp) mu and exp(log_var); v (K, L, d)
};

Prepared prepare(const at::Tensor& x, const at::Tensor* A, const at::Tensor& mu, const at::Tensor& log_var) {
  Prepared p;
  const int64_t D = x.size(1), K = mu.size(0), L = mu.size(1), d = mu.size(2);
  p.dm = Dims{D, K, L, d, K * L, K * d, (d + 7) / 8 * 8, A == nullptr};
  if (A) p.A_cat = A->permute({1, 0, 2}).reshape({D, K * d}).contiguous();
  p.v = log_var.exp();
  p.mu_p = at::zeros({K * L, p.dm.dp}, x.options());
  p.v_p = at::zeros({K * L, p.dm.dp}, x.options());
  p.mu_p.narrow(1, 0, d).copy_(mu.reshape({K * L, d}));
  p.v_p.narrow(1, 0, d).copy_(p.v.reshape({K * L, d}));
  return p;
}

template <typename T, typename Rows>
void forward_run(const Prepared& p, const at::Tensor& x, const at::Tensor& s, const at::Tensor& gamma,
                 const at::Tensor& logpi, at::Tensor& score, at::Tensor& lse, T* wp) {
  const Dims& dm = p.dm;
  const int64_t B = x.size(0);
  const T* xp = x.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* gp = gamma.data_ptr<T>();
  T* outp = score.data_ptr<T>();
  T* lsep = lse.data_ptr<T>();
  const T* mup = p.mu_p.data_ptr<T>();
  const T* vp = p.v_p.data_ptr<T>();
  const T* lpp = logpi.data_ptr<T>();
  const int64_t BS = dm.identity ? kIdentityRows : kBlockRows;
  const int64_t nblocks = (B + BS - 1) / BS;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowAutograd no_autograd;  // thread-local: every worker needs it for the GEMMs below
    Consts<T> cs(dm, mup, vp, lpp);
    std::vector<T> wrow(dm.KL);
    at::Tensor Zb, Cb;
    if (!dm.identity) {
      Zb = at::empty({BS, dm.Kd}, x.options());
      Cb = at::empty({BS, dm.Kd}, x.options());
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * BS, nr = std::min(BS, B - r0);
      at::Tensor Z, C;
      if (!dm.identity) {
        Z = Zb.narrow(0, 0, nr);
        C = Cb.narrow(0, 0, nr);
        at::mm_out(Z, x.narrow(0, r0, nr), p.A_cat);
      }
      for (int64_t r = r0; r < r0 + nr; ++r) {
        if (cs.stale(sp[r], gp[r])) Rows::update(cs, sp[r], gp[r]);
        const T* xr = xp + r * dm.D;
        T* wr = wp ? wp + r * dm.KL : wrow.data();
        T lse_rel;
        if (dm.identity) {
          lse_rel = Rows::forward_row(xr, xr, dm, cs, wr, outp + r * dm.D);
        } else {
          const int64_t o = (r - r0) * dm.Kd;
          lse_rel = Rows::forward_row(xr, Z.data_ptr<T>() + o, dm, cs, wr, C.data_ptr<T>() + o);
        }
        const double g = static_cast<double>(cs.g);
        lsep[r] = static_cast<T>(static_cast<double>(lse_rel) + row_constant<double>(dm.D, dm.d, g * g));
      }
      if (!dm.identity) {
        at::Tensor out_blk = score.narrow(0, r0, nr);
        at::mm_out(out_blk, C, p.A_cat.t());
        for (int64_t r = r0; r < r0 + nr; ++r)
          Rows::axpy_rows(outp + r * dm.D, xp + r * dm.D, T(1) / (gp[r] * gp[r]), dm.D);
      }
    }
  });
}

template <typename T, typename Rows>
void backward_run(const Prepared& p, const at::Tensor& G, const at::Tensor& g_lse, const T* gwp, const at::Tensor& x,
                  const at::Tensor& s, const at::Tensor& gamma, const at::Tensor& logpi, at::Tensor& dx,
                  at::Tensor* dA, at::Tensor& dmu, at::Tensor& dlog_var, at::Tensor& dlogpi) {
  const Dims& dm = p.dm;
  const int64_t B = x.size(0), KLp = dm.KL * dm.dp;
  const T* xp = x.data_ptr<T>();
  const T* Gp = G.data_ptr<T>();
  const T* glp = g_lse.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* gp = gamma.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const T* mup = p.mu_p.data_ptr<T>();
  const T* vp = p.v_p.data_ptr<T>();
  const T* lpp = logpi.data_ptr<T>();
  const int64_t BS = dm.identity ? kIdentityRows : kBlockRows;
  const int64_t nblocks = (B + BS - 1) / BS;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  // Per-chunk accumulators (fixed chunking: reduced in chunk order, so the result does not depend on scheduling).
  at::Tensor acc_small = at::zeros({nchunks, 2 * KLp + dm.KL}, x.options());
  at::Tensor acc_A;
  if (!dm.identity) acc_A = at::zeros({nchunks, dm.D, dm.Kd}, x.options());

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowAutograd no_autograd;
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t blk0 = nblocks * chunk / nchunks, blk1 = nblocks * (chunk + 1) / nchunks;
      Consts<T> cs(dm, mup, vp, lpp);
      std::vector<T> w(dm.KL), dw(dm.KL), aW(2 * dm.K), dl_sum(BS);
      T* dmu_acc = acc_small[chunk].data_ptr<T>();
      T* dvar_acc = dmu_acc + KLp;
      T* dlp_acc = dvar_acc + KLp;
      at::Tensor Zb, dCb, Cb, dZb, dA_chunk;
      if (!dm.identity) {
        Zb = at::empty({BS, dm.Kd}, x.options());
        dCb = at::empty({BS, dm.Kd}, x.options());
        Cb = at::empty({BS, dm.Kd}, x.options());
        dZb = at::empty({BS, dm.Kd}, x.options());
        dA_chunk = acc_A[chunk];
      }
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t r0 = blk * BS, nr = std::min(BS, B - r0);
        at::Tensor Z, dC, C, dZ, Xb, Gb;
        if (!dm.identity) {
          Z = Zb.narrow(0, 0, nr);
          dC = dCb.narrow(0, 0, nr);
          C = Cb.narrow(0, 0, nr);
          dZ = dZb.narrow(0, 0, nr);
          Xb = x.narrow(0, r0, nr);
          Gb = G.narrow(0, r0, nr);
          at::mm_out(Z, Xb, p.A_cat);
          at::mm_out(dC, Gb, p.A_cat);
        }
        for (int64_t r = r0; r < r0 + nr; ++r) {
          if (cs.stale(sp[r], gp[r])) Rows::update(cs, sp[r], gp[r]);
          const T* xr = xp + r * dm.D;
          const T* gwr = gwp ? gwp + r * dm.KL : nullptr;
          if (dm.identity) {
            Rows::backward_row(xr, xr, Gp + r * dm.D, glp[r], gwr, dm, cs, w.data(), dw.data(), aW.data(), nullptr,
                               dxp + r * dm.D, dmu_acc, dvar_acc, dlp_acc);
          } else {
            const int64_t o = (r - r0) * dm.Kd;
            dl_sum[r - r0] = Rows::backward_row(xr, Z.data_ptr<T>() + o, dC.data_ptr<T>() + o, glp[r], gwr, dm, cs, w.data(),
                               dw.data(), aW.data(), C.data_ptr<T>() + o, dZ.data_ptr<T>() + o, dmu_acc, dvar_acc, dlp_acc);
          }
        }
        if (!dm.identity) {
          at::Tensor dx_blk = dx.narrow(0, r0, nr);
          at::mm_out(dx_blk, dZ, p.A_cat.t());
          for (int64_t r = r0; r < r0 + nr; ++r)
            Rows::dx_epilogue(dxp + r * dm.D, Gp + r * dm.D, xp + r * dm.D, T(1) / (gp[r] * gp[r]), dl_sum[r - r0],
                              dm.D);
          dA_chunk.addmm_(Gb.t(), C);
          dA_chunk.addmm_(Xb.t(), dZ);
        }
      }
    }
  });
  const int64_t K = dm.K, L = dm.L, d = dm.d;
  const at::Tensor small = acc_small.sum(0);
  dmu.copy_(small.narrow(0, 0, KLp).view({dm.KL, dm.dp}).narrow(1, 0, d).reshape({K, L, d}));
  dlog_var.copy_(small.narrow(0, KLp, KLp).view({dm.KL, dm.dp}).narrow(1, 0, d).reshape({K, L, d}) * p.v);
  dlogpi.copy_(small.narrow(0, 2 * KLp, dm.KL).view({K, L}));
  if (dA) dA->copy_(acc_A.sum(0).view({dm.D, K, d}).permute({1, 0, 2}));
}

bool generic_forced() {
  const char* e = std::getenv("MOEKERNELS_CPU_GENERIC");
  return e != nullptr && e[0] == '1';
}

template <typename T>
bool use_avx2() {
#if defined(MOLR_HAVE_AVX2)
  return std::is_same<T, float>::value && cpu::has_avx2_fma() && !generic_forced();
#else
  return false;
#endif
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& s, const at::Tensor& gamma, const at::Tensor* A,
                  const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& logpi, at::Tensor& score,
                  at::Tensor& lse, at::Tensor* w_out) {
  const Prepared p = prepare(x, A, mu, log_var);
  T* wp = w_out ? w_out->data_ptr<T>() : nullptr;
#if defined(MOLR_HAVE_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    if (use_avx2<T>()) return forward_run<float, simd::Avx2Rows>(p, x, s, gamma, logpi, score, lse, wp);
  }
#endif
  forward_run<T, GenericRows<T>>(p, x, s, gamma, logpi, score, lse, wp);
}

template <typename T>
void backward_impl(const at::Tensor& G, const at::Tensor& g_lse, const at::Tensor* g_w, const at::Tensor& x,
                   const at::Tensor& s, const at::Tensor& gamma, const at::Tensor* A, const at::Tensor& mu,
                   const at::Tensor& log_var, const at::Tensor& logpi, at::Tensor& dx, at::Tensor* dA,
                   at::Tensor& dmu, at::Tensor& dlog_var, at::Tensor& dlogpi) {
  const Prepared p = prepare(x, A, mu, log_var);
  const T* gwp = g_w ? g_w->data_ptr<T>() : nullptr;
#if defined(MOLR_HAVE_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    if (use_avx2<T>())
      return backward_run<float, simd::Avx2Rows>(p, G, g_lse, gwp, x, s, gamma, logpi, dx, dA, dmu, dlog_var,
                                                 dlogpi);
  }
#endif
  backward_run<T, GenericRows<T>>(p, G, g_lse, gwp, x, s, gamma, logpi, dx, dA, dmu, dlog_var, dlogpi);
}

// ------------------------------------------------------------------------------------------- op entry points
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& s, const at::Tensor& gamma,
                  const c10::optional<at::Tensor>& A, const at::Tensor& mu, const at::Tensor& log_var,
                  const at::Tensor& logpi) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be (B, D)");
  TORCH_CHECK(mu.dim() == 3, op, ": mu must be (K, L, d)");
  const int64_t B = x.size(0), D = x.size(1), K = mu.size(0), L = mu.size(1), d = mu.size(2);
  TORCH_CHECK(K >= 1 && L >= 1 && d >= 1, op, ": K, L, d must be >= 1");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", x.scalar_type());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype");
  };
  same(x, "x");
  same(s, "s");
  same(gamma, "gamma");
  same(mu, "mu");
  same(log_var, "log_var");
  same(logpi, "logpi");
  TORCH_CHECK(s.dim() == 1 && s.size(0) == B, op, ": s must be (B,)");
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == B, op, ": gamma must be (B,)");
  TORCH_CHECK(log_var.sizes() == mu.sizes(), op, ": log_var must be (K, L, d)");
  TORCH_CHECK(logpi.dim() == 2 && logpi.size(0) == K && logpi.size(1) == L, op, ": logpi must be (K, L)");
  if (A.has_value()) {
    same(*A, "A");
    TORCH_CHECK(A->dim() == 3 && A->size(0) == K && A->size(1) == D && A->size(2) == d, op, ": A must be (K, D, d)");
  } else {
    TORCH_CHECK(D == d, op, ": A=None (identity) needs D == d");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> molr_mog_score_fwd_cpu(
    const at::Tensor& x, const at::Tensor& s, const at::Tensor& gamma, const c10::optional<at::Tensor>& A,
    const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& logpi, bool return_weights) {
  check_inputs("molr_mog_score_fwd", x, s, gamma, A, mu, log_var, logpi);
  at::AutoDispatchBelowAutograd no_autograd;  // the internal GEMMs must not record (inputs may require grad)
  const int64_t B = x.size(0), K = mu.size(0), L = mu.size(1);
  at::Tensor score = at::empty_like(x);
  at::Tensor lse = at::empty({B}, x.options());
  at::Tensor w = return_weights ? at::empty({B, K, L}, x.options()) : at::empty({0}, x.options());
  if (B == 0) return {score, lse, w};
  // Non-contiguous inputs are copied (the Python layer already passes contiguous ones: no-ops then).
  const at::Tensor xc = x.contiguous(), sc = s.contiguous(), gc = gamma.contiguous(), muc = mu.contiguous(),
                   lvc = log_var.contiguous(), lpc = logpi.contiguous();
  const at::Tensor Ac = A.has_value() ? A->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "molr_mog_score_fwd_cpu", [&] {
    forward_impl<scalar_t>(xc, sc, gc, A.has_value() ? &Ac : nullptr, muc, lvc, lpc, score, lse,
                           return_weights ? &w : nullptr);
  });
  return {score, lse, w};
}

std::tuple<at::Tensor, c10::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> molr_mog_score_bwd_cpu(
    const at::Tensor& G, const at::Tensor& g_lse, const c10::optional<at::Tensor>& g_w, const at::Tensor& x,
    const at::Tensor& s, const at::Tensor& gamma, const c10::optional<at::Tensor>& A, const at::Tensor& mu,
    const at::Tensor& log_var, const at::Tensor& logpi, const at::Tensor& lse) {
  check_inputs("molr_mog_score_bwd", x, s, gamma, A, mu, log_var, logpi);
  at::AutoDispatchBelowAutograd no_autograd;
  (void)lse;  // the weights are recomputed from the logits (softmax), see molr_mog_score.h
  const int64_t B = x.size(0), K = mu.size(0), L = mu.size(1);
  TORCH_CHECK(G.sizes() == x.sizes() && G.scalar_type() == x.scalar_type() && G.device().is_cpu(),
              "molr_mog_score_bwd: G must be like x");
  TORCH_CHECK(g_lse.dim() == 1 && g_lse.size(0) == B && g_lse.scalar_type() == x.scalar_type() &&
                  g_lse.device().is_cpu(),
              "molr_mog_score_bwd: g_lse must be (B,) like x");
  if (g_w.has_value())
    TORCH_CHECK(g_w->dim() == 3 && g_w->size(0) == B && g_w->size(1) == K && g_w->size(2) == L &&
                    g_w->scalar_type() == x.scalar_type() && g_w->device().is_cpu(),
                "molr_mog_score_bwd: g_w must be (B, K, L) like x");
  at::Tensor dx = at::empty_like(x);
  c10::optional<at::Tensor> dA;
  if (A.has_value()) dA = at::zeros_like(*A);
  at::Tensor dmu = at::zeros_like(mu), dlog_var = at::zeros_like(log_var), dlogpi = at::zeros_like(logpi);
  if (B == 0) return {dx, dA, dmu, dlog_var, dlogpi};
  const at::Tensor xc = x.contiguous(), sc = s.contiguous(), gc = gamma.contiguous(), muc = mu.contiguous(),
                   lvc = log_var.contiguous(), lpc = logpi.contiguous(), Gc = G.contiguous(),
                   glc = g_lse.contiguous();
  const at::Tensor Ac = A.has_value() ? A->contiguous() : at::Tensor();
  const at::Tensor gwc = g_w.has_value() ? g_w->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "molr_mog_score_bwd_cpu", [&] {
    backward_impl<scalar_t>(Gc, glc, g_w.has_value() ? &gwc : nullptr, xc, sc, gc, A.has_value() ? &Ac : nullptr,
                            muc, lvc, lpc, dx, dA ? &*dA : nullptr, dmu, dlog_var, dlogpi);
  });
  return {dx, dA, dmu, dlog_var, dlogpi};
}

}  // namespace
}  // namespace molr
}  // namespace moekernels

TORCH_LIBRARY_IMPL(moekernels, CPU, m) {
  m.impl("molr_mog_score_fwd", &moekernels::molr::molr_mog_score_fwd_cpu);
  m.impl("molr_mog_score_bwd", &moekernels::molr::molr_mog_score_bwd_cpu);
}
