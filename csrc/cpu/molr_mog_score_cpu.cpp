// molr_mog_score (DESIGN.md 3.1) on the CPU: rows in blocks, blocks in parallel.
//
// Forward, per block of BS rows (general A):
//   Z = X_blk A_cat                      (BS x K*d, one GEMM into a thread-local buffer, single-threaded inside
//                                         at::parallel_for)
//   per row: logits, softmax, c_k        (stack / cache-resident; the per-(k,l) constants 1/m, s mu, bias are
//                                         recomputed only when (s, gamma) changes from the previous row)
//   score_blk = C A_cat^T - X / gamma^2  (one more GEMM, straight into the output)
// No B x K x L x d tensor exists. A = None (identity): no GEMM; score = -sum_kl w_kl e_kl / m_kl per row.
//
// Backward, per block: [Z, dC] = [X, G] A_cat (two GEMMs), per row the weights are recomputed (softmax of the
// recomputed logits, see molr_mog_score.h) and dZ, C formed; dX_blk = dZ A_cat^T - (G + dlse X)/gamma^2;
// dA_cat += G^T C + X^T dZ into a per-chunk accumulator (GEMMs with beta = 1), reduced at the end in a fixed
// order (deterministic). dmu, dlog_var, dlogpi: per-chunk accumulators.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_features.h"
#include "molr_mog_score.h"

namespace moekernels {
namespace molr {
namespace {

constexpr int64_t kBlockRows = 128;

// ------------------------------------------------------------------------------------------- per-(k,l) constants
template <typename T>
struct Consts {
  int64_t KL, d;
  const T* mu;     // (KL, d)
  const T* v;      // (KL, d) exp(log_var)
  const T* logpi;  // (KL)
  std::vector<T> inv_m, smu, bias;
  T s = std::numeric_limits<T>::quiet_NaN(), g = std::numeric_limits<T>::quiet_NaN();

  Consts(int64_t KL_, int64_t d_, const T* mu_, const T* v_, const T* logpi_)
      : KL(KL_), d(d_), mu(mu_), v(v_), logpi(logpi_), inv_m(KL_ * d_), smu(KL_ * d_), bias(KL_) {}

  // Recompute for (s_, g_) unless they are the row before's (the common case: one t for the whole batch).
  void update(T s_, T g_) {
    if (s_ == s && g_ == g) return;
    s = s_;
    g = g_;
    const T g2 = g * g;
    for (int64_t kl = 0; kl < KL; ++kl)
      bias[kl] = kl_constants<T>(mu + kl * d, v + kl * d, logpi[kl], s, g2, d, inv_m.data() + kl * d,
                                 smu.data() + kl * d);
  }
};

template <typename T>
T dot_self(const T* a, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * a[i];
  return acc;
}

// ------------------------------------------------------------------------------------------- per-row forward
// General A: z = Z row (K*d), writes c (K*d) and w (KL, scratch), returns lse.
// Identity: z = x row (d, shared by every k), writes the score row into c (d).
template <typename T>
T row_forward(const T* x, const T* z, int64_t D, int64_t K, int64_t L, int64_t d, bool identity, Consts<T>& cs,
              T* w, T* c) {
  const T g2 = cs.g * cs.g;
  const T inv_g2 = T(1) / g2;
  const int64_t zs = identity ? 0 : d;  // stride of z_k
  T xx = identity ? T(0) : dot_self(x, D);
  for (int64_t k = 0; k < K; ++k) {
    const T* zk = z + k * zs;
    const T proj = identity ? T(0) : (dot_self(zk, d) - xx) * (T(0.5) * inv_g2);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t kl = k * L + l;
      w[kl] = kl_logit<T>(zk, cs.smu.data() + kl * d, cs.inv_m.data() + kl * d, d, cs.bias[kl], proj);
    }
  }
  const T lse = row_weights<T>(w, K * L) + row_constant<T>(D, d, g2);
  for (int64_t k = 0; k < K; ++k)
    expert_c<T>(z + k * zs, w + k * L, cs.smu.data() + k * L * d, cs.inv_m.data() + k * L * d, L, d,
                identity ? T(0) : inv_g2, identity ? c : c + k * d, identity && k > 0);
  return lse;
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& s, const at::Tensor& gamma, const at::Tensor* A,
                  const at::Tensor& mu, const at::Tensor& log_var, const at::Tensor& logpi, at::Tensor& score,
                  at::Tensor& lse, at::Tensor* w_out) {
  const int64_t B = x.size(0), D = x.size(1), K = mu.size(0), L = mu.size(1), d = mu.size(2);
  const int64_t KL = K * L, Kd = K * d;
  const bool identity = A == nullptr;
  const at::Tensor v = log_var.exp();
  at::Tensor A_cat;
  if (!identity) A_cat = A->permute({1, 0, 2}).reshape({D, Kd}).contiguous();  // (D, K*d)
  const T* xp = x.data_ptr<T>();
  const T* sp = s.data_ptr<T>();
  const T* gp = gamma.data_ptr<T>();
  T* outp = score.data_ptr<T>();
  T* lsep = lse.data_ptr<T>();
  T* wp = w_out ? w_out->data_ptr<T>() : nullptr;
  const T* mup = mu.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* lpp = logpi.data_ptr<T>();
  const int64_t BS = identity ? 64 : kBlockRows;
  const int64_t nblocks = (B + BS - 1) / BS;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Consts<T> cs(KL, d, mup, vp, lpp);
    std::vector<T> wrow(KL);
    at::Tensor Zb, Cb;
    if (!identity) {
      Zb = at::empty({BS, Kd}, x.options());
      Cb = at::empty({BS, Kd}, x.options());
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * BS, nr = std::min(BS, B - r0);
      at::Tensor Z, C;
      if (!identity) {
        Z = Zb.narrow(0, 0, nr);
        C = Cb.narrow(0, 0, nr);
        at::mm_out(Z, x.narrow(0, r0, nr), A_cat);
      }
      for (int64_t r = r0; r < r0 + nr; ++r) {
        cs.update(sp[r], gp[r]);
        const T* xr = xp + r * D;
        T* wr = wp ? wp + r * KL : wrow.data();
        if (identity) {
          lsep[r] = row_forward<T>(xr, xr, D, K, L, d, true, cs, wr, outp + r * D);
        } else {
          lsep[r] = row_forward<T>(xr, Z.data_ptr<T>() + (r - r0) * Kd, D, K, L, d, false, cs, wr,
                                   C.data_ptr<T>() + (r - r0) * Kd);
        }
      }
      if (!identity) {
        at::Tensor out_blk = score.narrow(0, r0, nr);
        at::mm_out(out_blk, C, A_cat.t());
        for (int64_t r = r0; r < r0 + nr; ++r) {
          const T inv_g2 = T(1) / (gp[r] * gp[r]);
          const T* xr = xp + r * D;
          T* o = outp + r * D;
          for (int64_t j = 0; j < D; ++j) o[j] -= xr[j] * inv_g2;
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------- per-row backward
// General: z, dc = rows of Z and dC (K*d); writes c (K*d, for dA) and dz (K*d).
// Identity: z = x, dc = G (shared by every k); writes dx into dz (d); c unused.
// Accumulates dmu_acc, dvar_acc (KL*d; s^2 dm) and dlogpi_acc (KL).
template <typename T>
void row_backward(const T* x, const T* z, const T* dc, T dlse, const T* gw, int64_t D, int64_t K, int64_t L,
                  int64_t d, bool identity, Consts<T>& cs, T* w, T* dw, T* c, T* dz, T* dmu_acc, T* dvar_acc,
                  T* dlogpi_acc) {
  const int64_t KL = K * L;
  const T g2 = cs.g * cs.g;
  const T inv_g2 = T(1) / g2;
  const T ig2 = identity ? T(0) : inv_g2;
  const int64_t zs = identity ? 0 : d;
  const T xx = identity ? T(0) : dot_self(x, D);
  for (int64_t k = 0; k < K; ++k) {
    const T* zk = z + k * zs;
    const T proj = identity ? T(0) : (dot_self(zk, d) - xx) * (T(0.5) * inv_g2);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t kl = k * L + l;
      w[kl] = kl_logit<T>(zk, cs.smu.data() + kl * d, cs.inv_m.data() + kl * d, d, cs.bias[kl], proj);
    }
  }
  row_weights<T>(w, KL);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t kl = k * L + l;
      dw[kl] = kl_dw<T>(dc + k * zs, z + k * zs, cs.smu.data() + kl * d, cs.inv_m.data() + kl * d, d, ig2,
                        gw ? gw[kl] : T(0));
    }
    if (!identity)
      expert_c<T>(z + k * d, w + k * L, cs.smu.data() + k * L * d, cs.inv_m.data() + k * L * d, L, d, inv_g2,
                  c + k * d, false);
  }
  row_dlogits<T>(w, dw, KL, dlse);  // dw -> dl
  std::fill(dz, dz + (identity ? d : K * d), T(0));
  for (int64_t k = 0; k < K; ++k) {
    T* dzk = dz + k * zs;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t kl = k * L + l;
      kl_backward<T>(dc + k * zs, z + k * zs, cs.smu.data() + kl * d, cs.inv_m.data() + kl * d, d, w[kl], dw[kl],
                     cs.s, dzk, dmu_acc + kl * d, dvar_acc + kl * d);
      dlogpi_acc[kl] += dw[kl];
    }
    if (!identity) {
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
}

template <typename T>
void backward_impl(const at::Tensor& G, const at::Tensor& g_lse, const at::Tensor* g_w, const at::Tensor& x,
                   const at::Tensor& s, const at::Tensor& gamma, const at::Tensor* A, const at::Tensor& mu,
                   const at::Tensor& log_var, const at::Tensor& logpi, at::Tensor& dx, at::Tensor* dA,
                   at::Tensor& dmu, at::Tensor& dlog_var, at::Tensor& dlogpi) {
  const int64_t B = x.size(0), D = x.size(1), K = mu.size(0), L = mu.size(1), d = mu.size(2);
  const int64_t KL = K * L, Kd = K * d;
  const bool identity = A == nullptr;
  const at::Tensor v = log_var.exp();
  at::Tensor A_cat;
  if (!identity) A_cat = A->permute({1, 0, 2}).reshape({D, Kd}).contiguous();
  const T* xp = x.data_ptr<T>();
  const T* Gp = G.data_ptr<T>();
  const T* glp = g_lse.data_ptr<T>();
  const T* gwp = g_w ? g_w->data_ptr<T>() : nullptr;
  const T* sp = s.data_ptr<T>();
  const T* gp = gamma.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const T* mup = mu.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* lpp = logpi.data_ptr<T>();

  const int64_t BS = identity ? 64 : kBlockRows;
  const int64_t nblocks = (B + BS - 1) / BS;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  // Per-chunk accumulators, reduced in chunk order at the end.
  at::Tensor acc_small = at::zeros({nchunks, 2 * KL * d + KL}, x.options());
  at::Tensor acc_A;
  if (!identity) acc_A = at::zeros({nchunks, D, Kd}, x.options());

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t blk0 = nblocks * ch / nchunks, blk1 = nblocks * (ch + 1) / nchunks;
      Consts<T> cs(KL, d, mup, vp, lpp);
      std::vector<T> w(KL), dw(KL);
      T* dmu_acc = acc_small[ch].data_ptr<T>();
      T* dvar_acc = dmu_acc + KL * d;
      T* dlp_acc = dvar_acc + KL * d;
      at::Tensor Zb, dCb, Cb, dZb, dA_ch;
      if (!identity) {
        Zb = at::empty({BS, Kd}, x.options());
        dCb = at::empty({BS, Kd}, x.options());
        Cb = at::empty({BS, Kd}, x.options());
        dZb = at::empty({BS, Kd}, x.options());
        dA_ch = acc_A[ch];
      }
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t r0 = blk * BS, nr = std::min(BS, B - r0);
        at::Tensor Z, dC, C, dZ, Xb, Gb;
        if (!identity) {
          Z = Zb.narrow(0, 0, nr);
          dC = dCb.narrow(0, 0, nr);
          C = Cb.narrow(0, 0, nr);
          dZ = dZb.narrow(0, 0, nr);
          Xb = x.narrow(0, r0, nr);
          Gb = G.narrow(0, r0, nr);
          at::mm_out(Z, Xb, A_cat);
          at::mm_out(dC, Gb, A_cat);
        }
        for (int64_t r = r0; r < r0 + nr; ++r) {
          cs.update(sp[r], gp[r]);
          const T* xr = xp + r * D;
          const T* gwr = gwp ? gwp + r * KL : nullptr;
          if (identity) {
            row_backward<T>(xr, xr, Gp + r * D, glp[r], gwr, D, K, L, d, true, cs, w.data(), dw.data(), nullptr,
                            dxp + r * D, dmu_acc, dvar_acc, dlp_acc);
          } else {
            const int64_t o = (r - r0) * Kd;
            row_backward<T>(xr, Z.data_ptr<T>() + o, dC.data_ptr<T>() + o, glp[r], gwr, D, K, L, d, false, cs,
                            w.data(), dw.data(), C.data_ptr<T>() + o, dZ.data_ptr<T>() + o, dmu_acc, dvar_acc,
                            dlp_acc);
          }
        }
        if (!identity) {
          at::Tensor dx_blk = dx.narrow(0, r0, nr);
          at::mm_out(dx_blk, dZ, A_cat.t());
          for (int64_t r = r0; r < r0 + nr; ++r) {
            const T inv_g2 = T(1) / (gp[r] * gp[r]);
            const T a = glp[r];
            const T* xr = xp + r * D;
            const T* gr = Gp + r * D;
            T* o = dxp + r * D;
            for (int64_t j = 0; j < D; ++j) o[j] -= (gr[j] + a * xr[j]) * inv_g2;
          }
          dA_ch.addmm_(Gb.t(), C);
          dA_ch.addmm_(Xb.t(), dZ);
        }
      }
    }
  });
  const at::Tensor small = acc_small.sum(0);
  dmu.copy_(small.narrow(0, 0, KL * d).view({K, L, d}));
  dlog_var.copy_(small.narrow(0, KL * d, KL * d).view({K, L, d}) * v);
  dlogpi.copy_(small.narrow(0, 2 * KL * d, KL).view({K, L}));
  if (!identity) dA->copy_(acc_A.sum(0).view({D, K, d}).permute({1, 0, 2}));
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
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
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
  const int64_t B = x.size(0), K = mu.size(0), L = mu.size(1);
  at::Tensor score = at::empty_like(x);
  at::Tensor lse = at::empty({B}, x.options());
  at::Tensor w = return_weights ? at::empty({B, K, L}, x.options()) : at::empty({0}, x.options());
  if (B == 0) return {score, lse, w};
  const at::Tensor* Ap = A.has_value() ? &*A : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "molr_mog_score_fwd_cpu", [&] {
    forward_impl<scalar_t>(x, s, gamma, Ap, mu, log_var, logpi, score, lse, return_weights ? &w : nullptr);
  });
  return {score, lse, w};
}

std::tuple<at::Tensor, c10::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> molr_mog_score_bwd_cpu(
    const at::Tensor& G, const at::Tensor& g_lse, const c10::optional<at::Tensor>& g_w, const at::Tensor& x,
    const at::Tensor& s, const at::Tensor& gamma, const c10::optional<at::Tensor>& A, const at::Tensor& mu,
    const at::Tensor& log_var, const at::Tensor& logpi, const at::Tensor& lse) {
  check_inputs("molr_mog_score_bwd", x, s, gamma, A, mu, log_var, logpi);
  (void)lse;  // the weights are recomputed from the logits (softmax), see molr_mog_score.h
  const int64_t B = x.size(0), K = mu.size(0), L = mu.size(1);
  TORCH_CHECK(G.sizes() == x.sizes() && G.scalar_type() == x.scalar_type() && G.is_contiguous(),
              "molr_mog_score_bwd: G must be like x");
  TORCH_CHECK(g_lse.dim() == 1 && g_lse.size(0) == B && g_lse.scalar_type() == x.scalar_type() &&
                  g_lse.is_contiguous(),
              "molr_mog_score_bwd: g_lse must be (B,) like x");
  if (g_w.has_value())
    TORCH_CHECK(g_w->dim() == 3 && g_w->size(0) == B && g_w->size(1) == K && g_w->size(2) == L &&
                    g_w->scalar_type() == x.scalar_type() && g_w->is_contiguous(),
                "molr_mog_score_bwd: g_w must be (B, K, L) like x");
  at::Tensor dx = at::empty_like(x);
  c10::optional<at::Tensor> dA;
  if (A.has_value()) dA = at::zeros_like(*A);
  at::Tensor dmu = at::zeros_like(mu), dlog_var = at::zeros_like(log_var), dlogpi = at::zeros_like(logpi);
  if (B == 0) return {dx, dA, dmu, dlog_var, dlogpi};
  const at::Tensor* Ap = A.has_value() ? &*A : nullptr;
  const at::Tensor* gwp = g_w.has_value() ? &*g_w : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "molr_mog_score_bwd_cpu", [&] {
    backward_impl<scalar_t>(G, g_lse, gwp, x, s, gamma, Ap, mu, log_var, logpi, dx, dA ? &*dA : nullptr, dmu,
                            dlog_var, dlogpi);
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
