// mog_posterior on CUDA tensors: the torch side of csrc/cuda/mog_posterior_cuda.cu (DESIGN.md 3.2).
// Registers moekernels::mog_posterior_fwd / mog_posterior_bwd (schemas in csrc/ops.cpp) for the CUDA dispatch
// key: checks the inputs, allocates outputs and the scratch workspace with the caching allocator, and launches
// on the current stream of the inputs' device. Only c10/cuda headers (no ATen/cuda/CUDAContext.h, which would
// pull in cuBLAS/cuSPARSE/cuSOLVER headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "mog_posterior_cuda.h"

namespace {

using moekernels::cuda::DType;

DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "mog_posterior (cuda): unsupported dtype ", st,
                  "; expected float32, float64, float16 or bfloat16");
  }
  return DType::kFloat32;  // unreachable
}

// Same device and dtype as x; returns a contiguous tensor (a no-op for the contiguous inputs the Python layer
// passes).
at::Tensor prep(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), "mog_posterior (cuda): ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "mog_posterior (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), "mog_posterior (cuda): ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "mog_posterior (cuda): ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  return t.contiguous();
}

void check_shapes(const at::Tensor& x, const at::Tensor& means, const at::Tensor& log_var) {
  TORCH_CHECK(x.dim() == 2, "mog_posterior (cuda): x must be (B, D), got ", x.sizes());
  TORCH_CHECK(means.dim() == 2 && means.size(1) == x.size(1) && means.size(0) >= 1,
              "mog_posterior (cuda): means must be (K, D) with D=", x.size(1), " and K >= 1, got ", means.sizes());
  TORCH_CHECK(log_var.sizes() == means.sizes(), "mog_posterior (cuda): log_var must be (K, D)=", means.sizes(),
              ", got ", log_var.sizes());
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(means.size(0) <= kMaxInt && x.size(1) <= kMaxInt,
              "mog_posterior (cuda): K and D must be < 2^31, got K=", means.size(0), ", D=", x.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mog_posterior_fwd_cuda_op(const at::Tensor& x_in,
                                                                         const at::Tensor& means_in,
                                                                         const at::Tensor& log_var_in,
                                                                         const at::Tensor& logpi_in) {
  TORCH_CHECK(x_in.is_cuda(), "mog_posterior (cuda): x must be a CUDA tensor, got ", x_in.device());
  const DType dt = to_dtype(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor means = prep(means_in, "means", x);
  const at::Tensor log_var = prep(log_var_in, "log_var", x);
  const at::Tensor logpi = prep(logpi_in, "logpi", x);
  check_shapes(x, means, log_var);
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0);
  TORCH_CHECK(logpi.dim() == 1 && logpi.size(0) == K, "mog_posterior (cuda): logpi must be (K,)=(", K, ",), got ",
              logpi.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor log_resp = at::empty({B, K}, x.options());
  at::Tensor lse = at::empty({B}, x.options());
  at::Tensor assign = at::empty({B}, x.options().dtype(at::kLong));
  if (B == 0) return {log_resp, lse, assign};

  const size_t ws_bytes = moekernels::cuda::mog_posterior_fwd_workspace_bytes(dt, B, D, K);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(moekernels::cuda::mog_posterior_fwd_cuda(
      dt, x.data_ptr(), means.data_ptr(), log_var.data_ptr(), logpi.data_ptr(), log_resp.data_ptr(), lse.data_ptr(),
      assign.data_ptr<int64_t>(), ws.data_ptr(), B, D, K, stream));
  return {log_resp, lse, assign};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mog_posterior_bwd_cuda_op(
    const at::Tensor& grad_log_resp_in, const at::Tensor& grad_lse_in, const at::Tensor& x_in,
    const at::Tensor& means_in, const at::Tensor& log_var_in, const at::Tensor& log_resp_in) {
  TORCH_CHECK(x_in.is_cuda(), "mog_posterior (cuda): x must be a CUDA tensor, got ", x_in.device());
  const DType dt = to_dtype(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor means = prep(means_in, "means", x);
  const at::Tensor log_var = prep(log_var_in, "log_var", x);
  check_shapes(x, means, log_var);
  const int64_t B = x.size(0), D = x.size(1), K = means.size(0);
  // Upstream grads may arrive in another float dtype (e.g. autocast); the kernels read x's dtype.
  TORCH_CHECK(grad_log_resp_in.defined() && grad_lse_in.defined(),
              "mog_posterior (cuda): grad_log_resp and grad_lse must be defined");
  const at::Tensor g_lr = prep(grad_log_resp_in.to(x.scalar_type()), "grad_log_resp", x);
  const at::Tensor g_lse = prep(grad_lse_in.to(x.scalar_type()), "grad_lse", x);
  const at::Tensor log_resp = prep(log_resp_in, "log_resp", x);
  TORCH_CHECK(g_lr.dim() == 2 && g_lr.size(0) == B && g_lr.size(1) == K,
              "mog_posterior (cuda): grad_log_resp must be (B, K)=(", B, ", ", K, "), got ", g_lr.sizes());
  TORCH_CHECK(log_resp.dim() == 2 && log_resp.size(0) == B && log_resp.size(1) == K,
              "mog_posterior (cuda): log_resp must be (B, K)=(", B, ", ", K, "), got ", log_resp.sizes());
  TORCH_CHECK(g_lse.dim() == 1 && g_lse.size(0) == B, "mog_posterior (cuda): grad_lse must be (B,)=(", B,
              ",), got ", g_lse.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({B, D}, x.options());
  at::Tensor dmeans = at::empty({K, D}, x.options());
  at::Tensor dlog_var = at::empty({K, D}, x.options());
  at::Tensor dlogpi = at::empty({K}, x.options());

  const int splits = moekernels::cuda::mog_posterior_bwd_splits(dt, B, D, K);
  const size_t ws_bytes = moekernels::cuda::mog_posterior_bwd_workspace_bytes(dt, B, D, K, splits);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(moekernels::cuda::mog_posterior_bwd_cuda(
      dt, g_lr.data_ptr(), g_lse.data_ptr(), x.data_ptr(), means.data_ptr(), log_var.data_ptr(), log_resp.data_ptr(),
      dx.data_ptr(), dmeans.data_ptr(), dlog_var.data_ptr(), dlogpi.data_ptr(), ws.data_ptr(), B, D, K, splits,
      stream));
  return {dx, dmeans, dlog_var, dlogpi};
}

}  // namespace

TORCH_LIBRARY_IMPL(moekernels, CUDA, m) {
  m.impl("mog_posterior_fwd", &mog_posterior_fwd_cuda_op);
  m.impl("mog_posterior_bwd", &mog_posterior_bwd_cuda_op);
}
