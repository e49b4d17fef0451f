// molr_mog_score (DESIGN.md 3.1): the CUDA implementations of moekernels::molr_mog_score_fwd / _bwd (schemas in
// csrc/ops.cpp). Torch glue only: checks, dtype conversions of the small inputs, workspace allocation, the launch
// on the current stream (kernels in molr_mog_score_cuda.cu), and the two batch reductions of the backward:
//   dA_cat = G^T C + X^T dZ   (D x K*d)  -- GEMMs (at::mm) over the (B x K*d) intermediates the kernel writes:
//   B x K*d is small next to the B x K*L*d the kernel never stores, and these long reductions over the batch are
//   what a GEMM library is for;
//   dmu, dlog_var, dlogpi      -- a sum over the kernel's per-block partials (grid x (2 K*L*d + K*L)).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "molr_mog_score_cuda.h"

namespace {

using moekernels::cuda::MolrBwdArgs;
using moekernels::cuda::MolrDType;
using moekernels::cuda::MolrFwdArgs;
using moekernels::cuda::MolrPlan;
using moekernels::cuda::MolrShape;

MolrDType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return MolrDType::kFloat32;
    case at::kDouble: return MolrDType::kFloat64;
    case at::kHalf: return MolrDType::kFloat16;
    case at::kBFloat16: return MolrDType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "molr_mog_score (cuda): unsupported dtype ", t.scalar_type(),
              " (float32, float64, float16, bfloat16)");
  return MolrDType::kFloat32;  // unreachable
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void cuda_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "molr_mog_score (cuda) ", what, ": ", cudaGetErrorString(err));
}

// Same device as x, contiguous; the big tensors (x, A, G, g_w) must also have x's dtype.
at::Tensor big(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "molr_mog_score (cuda): ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "molr_mog_score (cuda): ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  return t.contiguous();
}

// The small tensors (s, gamma, mu, log_var, logpi, g_lse) in the accumulation dtype.
at::Tensor small(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "molr_mog_score (cuda): ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.is_floating_point(), "molr_mog_score (cuda): ", name, " must be floating point");
  return t.to(acc_type(x.scalar_type())).contiguous();
}

struct Checked {
  MolrShape shape;
  at::Tensor x, A, s, gamma, mu, log_var, logpi;
};

Checked check_inputs(const at::Tensor& x, const at::Tensor& s, const at::Tensor& gamma,
                     const std::optional<at::Tensor>& A, const at::Tensor& mu, const at::Tensor& log_var,
                     const at::Tensor& logpi) {
  TORCH_CHECK(x.is_cuda(), "molr_mog_score (cuda): x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "molr_mog_score (cuda): x must be (B, D), got ", x.sizes());
  TORCH_CHECK(mu.dim() == 3 && mu.size(0) >= 1 && mu.size(1) >= 1 && mu.size(2) >= 1,
              "molr_mog_score (cuda): mu must be (K, L, d) with K, L, d >= 1, got ", mu.sizes());
  const int64_t B = x.size(0), D = x.size(1), K = mu.size(0), L = mu.size(1), d = mu.size(2);
  TORCH_CHECK(D >= 1, "molr_mog_score (cuda): x must have D >= 1");
  const bool has_A = A.has_value() && A->defined();
  if (has_A) {
    TORCH_CHECK(A->dim() == 3 && A->size(0) == K && A->size(1) == D && A->size(2) == d,
                "molr_mog_score (cuda): A must be (K, D, d) = (", K, ", ", D, ", ", d, "), got ", A->sizes());
  } else {
    TORCH_CHECK(d == D, "molr_mog_score (cuda): A = None (identity) needs d == D, got d=", d, ", D=", D);
  }
  TORCH_CHECK(log_var.sizes() == mu.sizes(), "molr_mog_score (cuda): log_var must be (K, L, d) = ", mu.sizes(),
              ", got ", log_var.sizes());
  TORCH_CHECK(logpi.dim() == 2 && logpi.size(0) == K && logpi.size(1) == L,
              "molr_mog_score (cuda): logpi must be (K, L) = (", K, ", ", L, "), got ", logpi.sizes());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == B, "molr_mog_score (cuda): s must be (B,) with B=", B, ", got ",
              s.sizes());
  TORCH_CHECK(gamma.dim() == 1 && gamma.size(0) == B, "molr_mog_score (cuda): gamma must be (B,) with B=", B,
              ", got ", gamma.sizes());
  dtype_of(x);
  // The kernels index with int64 but launch one 32-row tile loop per block and keep K*d, K*L in int64 too;
  // the only 32-bit quantity is the grid, which the plan caps at the resident block count.
  Checked c;
  c.shape = MolrShape{B, D, K, L, d, has_A};
  c.x = x.contiguous();
  c.A = has_A ? big(*A, x, "A") : at::Tensor();
  c.s = small(s, x, "s");
  c.gamma = small(gamma, x, "gamma");
  c.mu = small(mu, x, "mu");
  c.log_var = small(log_var, x, "log_var");
  c.logpi = small(logpi, x, "logpi");
  return c;
}

// Global scratch for the tile buffers when they do not fit in shared memory (plan.global_scratch).
at::Tensor scratch_for(const MolrPlan& plan, const at::Tensor& x) {
  if (!plan.global_scratch) return at::Tensor();
  return at::empty({static_cast<int64_t>(plan.scratch_bytes)}, x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> molr_mog_score_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& s_, const at::Tensor& gamma_, const std::optional<at::Tensor>& A_,
    const at::Tensor& mu_, const at::Tensor& log_var_, const at::Tensor& logpi_, bool return_weights) {
  const c10::cuda::CUDAGuard guard(x_.device());
  Checked c = check_inputs(x_, s_, gamma_, A_, mu_, log_var_, logpi_);
  const MolrShape& sh = c.shape;
  at::Tensor score = at::empty({sh.B, sh.D}, c.x.options());
  at::Tensor lse = at::empty({sh.B}, c.x.options());
  at::Tensor w = return_weights ? at::empty({sh.B, sh.K, sh.L}, c.x.options()) : at::empty({0}, c.x.options());
  if (sh.B == 0) return {score, lse, w};

  const MolrDType dt = dtype_of(c.x);
  MolrPlan plan;
  cuda_check(moekernels::cuda::molr_mog_score_fwd_plan(sh, dt, &plan), "forward plan");
  at::Tensor scratch = scratch_for(plan, c.x);

  MolrFwdArgs a{};
  a.shape = sh;
  a.dtype = dt;
  a.x = c.x.data_ptr();
  a.A = sh.has_A ? c.A.data_ptr() : nullptr;
  a.s = c.s.data_ptr();
  a.gamma = c.gamma.data_ptr();
  a.mu = c.mu.data_ptr();
  a.log_var = c.log_var.data_ptr();
  a.logpi = c.logpi.data_ptr();
  a.score = score.data_ptr();
  a.lse = lse.data_ptr();
  a.w = return_weights ? w.data_ptr() : nullptr;
  a.scratch = scratch.defined() ? scratch.data_ptr() : nullptr;
  cuda_check(moekernels::cuda::molr_mog_score_fwd_cuda(a, plan, c10::cuda::getCurrentCUDAStream().stream()),
             "forward launch");
  return {score, lse, w};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> molr_mog_score_bwd_cuda(
    const at::Tensor& G_, const at::Tensor& g_lse_, const std::optional<at::Tensor>& g_w_, const at::Tensor& x_,
    const at::Tensor& s_, const at::Tensor& gamma_, const std::optional<at::Tensor>& A_, const at::Tensor& mu_,
    const at::Tensor& log_var_, const at::Tensor& logpi_, const at::Tensor& lse_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  Checked c = check_inputs(x_, s_, gamma_, A_, mu_, log_var_, logpi_);
  const MolrShape& sh = c.shape;
  const int64_t B = sh.B, D = sh.D, K = sh.K, L = sh.L, d = sh.d, KL = K * L, KLd = KL * d, Kd = K * d;
  TORCH_CHECK(G_.sizes() == x_.sizes(), "molr_mog_score (cuda): G must be (B, D) = ", x_.sizes(), ", got ",
              G_.sizes());
  TORCH_CHECK(g_lse_.dim() == 1 && g_lse_.size(0) == B, "molr_mog_score (cuda): g_lse must be (B,), got ",
              g_lse_.sizes());
  TORCH_CHECK(lse_.dim() == 1 && lse_.size(0) == B, "molr_mog_score (cuda): lse must be (B,), got ", lse_.sizes());
  const bool has_gw = g_w_.has_value() && g_w_->defined();
  if (has_gw) {
    TORCH_CHECK(g_w_->dim() == 3 && g_w_->size(0) == B && g_w_->size(1) == K && g_w_->size(2) == L,
                "molr_mog_score (cuda): g_w must be (B, K, L) = (", B, ", ", K, ", ", L, "), got ", g_w_->sizes());
  }
  const at::Tensor G = big(G_, x_, "G");
  const at::Tensor g_w = has_gw ? big(*g_w_, x_, "g_w") : at::Tensor();
  const at::Tensor g_lse = small(g_lse_, x_, "g_lse");
  const at::ScalarType acc = acc_type(c.x.scalar_type());
  const at::TensorOptions acc_opts = c.x.options().dtype(acc);

  at::Tensor dx = at::empty({B, D}, c.x.options());
  const MolrDType dt = dtype_of(c.x);
  MolrPlan plan;
  cuda_check(moekernels::cuda::molr_mog_score_bwd_plan(sh, dt, &plan), "backward plan");
  // B == 0: grid 0, nothing launched; the partials sum to zeros and dA = 0 x ... products give zeros.
  at::Tensor partials = at::zeros({std::max<int64_t>(plan.grid, 1), 2 * KLd + KL}, acc_opts);
  at::Tensor C, dZ;
  if (sh.has_A) {
    C = at::empty({B, Kd}, acc_opts);
    dZ = at::empty({B, Kd}, acc_opts);
  }
  at::Tensor scratch = scratch_for(plan, c.x);

  if (B > 0) {
    MolrBwdArgs a{};
    a.shape = sh;
    a.dtype = dt;
    a.G = G.data_ptr();
    a.g_lse = g_lse.data_ptr();
    a.g_w = has_gw ? g_w.data_ptr() : nullptr;
    a.x = c.x.data_ptr();
    a.A = sh.has_A ? c.A.data_ptr() : nullptr;
    a.s = c.s.data_ptr();
    a.gamma = c.gamma.data_ptr();
    a.mu = c.mu.data_ptr();
    a.log_var = c.log_var.data_ptr();
    a.logpi = c.logpi.data_ptr();
    a.dx = dx.data_ptr();
    a.C = sh.has_A ? C.data_ptr() : nullptr;
    a.dZ = sh.has_A ? dZ.data_ptr() : nullptr;
    a.partials = partials.data_ptr();
    a.scratch = scratch.defined() ? scratch.data_ptr() : nullptr;
    cuda_check(moekernels::cuda::molr_mog_score_bwd_cuda(a, plan, c10::cuda::getCurrentCUDAStream().stream()),
               "backward launch");
  }

  const at::Tensor tot = partials.sum(0);  // (2 KLd + KL,), deterministic
  const at::ScalarType out = c.x.scalar_type();
  at::Tensor dmu = tot.narrow(0, 0, KLd).view({K, L, d}).to(out);
  at::Tensor dlog_var = tot.narrow(0, KLd, KLd).view({K, L, d}).to(out);
  at::Tensor dlogpi = tot.narrow(0, 2 * KLd, KL).view({K, L}).to(out).contiguous();
  dmu = dmu.contiguous();
  dlog_var = dlog_var.contiguous();

  std::optional<at::Tensor> dA;
  if (sh.has_A) {
    // dA_cat (D, K*d) = G^T C + X^T dZ in the accumulation dtype. Full fp32 unless the user allowed TF32 for
    // cuBLAS; then do it in fp64 so the op keeps its fp32 accuracy (these GEMMs are D x B x K*d, cheap).
    at::ScalarType mm_t = acc;
    if (acc == at::kFloat && at::globalContext().allowTF32CuBLAS()) mm_t = at::kDouble;
    const at::Tensor Gm = G.to(mm_t), Xm = c.x.to(mm_t), Cm = C.to(mm_t), dZm = dZ.to(mm_t);
    at::Tensor dA_cat = at::mm(Gm.t(), Cm);
    dA_cat.addmm_(Xm.t(), dZm);
    dA = dA_cat.view({D, K, d}).permute({1, 0, 2}).to(out).contiguous();
  }
  return {dx, dA, dmu, dlog_var, dlogpi};
}

}  // namespace

TORCH_LIBRARY_IMPL(moekernels, CUDA, m) {
  m.impl("molr_mog_score_fwd", &molr_mog_score_fwd_cuda);
  m.impl("molr_mog_score_bwd", &molr_mog_score_bwd_cuda);
}
