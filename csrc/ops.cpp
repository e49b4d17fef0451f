// Operator schemas of moekernels (TORCH_LIBRARY) and the Python module `moekernels._C`.
// Kernels register their implementations with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*_bind.cpp;
// fake (Meta) implementations for torch.compile are registered from Python (moekernels/ops/*.py).
#include <torch/extension.h>

#include <string>

TORCH_LIBRARY(moekernels, m) {
  // DESIGN.md 3.2. log_var is (K, D) (the Python layer expands isotropic (K,) variances); logpi is the
  // *normalised* log weight (K,). Returns log_resp (B, K), lse (B,), assign (B,) int64.
  m.def("mog_posterior_fwd(Tensor x, Tensor means, Tensor log_var, Tensor logpi) -> (Tensor, Tensor, Tensor)");
  // Gradients w.r.t. x, means, log_var and the normalised logpi, from the saved forward output log_resp.
  m.def("mog_posterior_bwd(Tensor grad_log_resp, Tensor grad_lse, Tensor x, Tensor means, Tensor log_var, "
        "Tensor log_resp) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {
bool has_cuda() {
#ifdef MOEKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
std::string cuda_archs() {
#ifdef MOEKERNELS_CUDA_ARCHS
  return MOEKERNELS_CUDA_ARCHS;
#else
  return "";
#endif
}
std::string cpu_capability();  // defined below
}  // namespace

#include "cpu_features.h"

namespace {
std::string cpu_capability() { return moekernels::cpu::has_avx2_fma() ? "avx2+fma" : "generic"; }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moekernels compiled kernels (ops are registered under torch.ops.moekernels)";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for");
  m.def("cpu_capability", &cpu_capability, "the SIMD path the CPU kernels take on this machine");
}
