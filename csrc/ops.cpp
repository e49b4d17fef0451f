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
  // DESIGN.md 3.1. A is (K, D, d) or None (identity, D == d); s, gamma are (B,); logpi (K, L) is *normalised*.
  // Returns score (B, D), lse (B,), w (B, K, L) (an empty tensor unless return_weights).
  m.def("molr_mog_score_fwd(Tensor x, Tensor s, Tensor gamma, Tensor? A, Tensor mu, Tensor log_var, Tensor logpi, "
        "bool return_weights) -> (Tensor, Tensor, Tensor)");
  // Gradients w.r.t. x, A (None when A is None), mu, log_var and the normalised logpi; g_w is None unless the
  // weights were returned and used. Recomputes z = A^T x and w per row (never stores B x K x L x d).
  m.def("molr_mog_score_bwd(Tensor G, Tensor g_lse, Tensor? g_w, Tensor x, Tensor s, Tensor gamma, Tensor? A, "
        "Tensor mu, Tensor log_var, Tensor logpi, Tensor lse) -> (Tensor, Tensor?, Tensor, Tensor, Tensor)");
  // DESIGN.md 3.3. Ws[l] (E, in_l, out_l), bs[l] (E, out_l): the E experts' stacked layers; gWs[j] (in_j, out_j),
  // gbs[j] (out_j,): the gate MLP (last out_j = E, or 1 = sigmoid gate when E == 2). Returns out (B, out),
  // gate (B, E) and saved = the pre-activation of every layer: expert layers as (B, E, out_l), then gate layers as
  // (B, out_j) (layout: moekernels/ops/gated_experts.py).
  m.def("gated_experts_fwd(Tensor h, Tensor[] Ws, Tensor[] bs, Tensor[] gWs, Tensor[] gbs, int n_residual) "
        "-> (Tensor, Tensor, Tensor[])");
  // Gradients w.r.t. h and every expert/gate weight and bias, from the saved pre-activations and the gate.
  m.def("gated_experts_bwd(Tensor g_out, Tensor g_gate, Tensor h, Tensor[] Ws, Tensor[] bs, Tensor[] gWs, "
        "Tensor[] gbs, int n_residual, Tensor[] saved, Tensor gate) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
  // Inference only (no gradients): (out, gate) without writing the activations out. Optional per backend (the
  // Python layer uses it under no_grad where a kernel is registered; CPU has one).
  m.def("gated_experts_infer(Tensor h, Tensor[] Ws, Tensor[] bs, Tensor[] gWs, Tensor[] gbs, int n_residual) "
        "-> (Tensor, Tensor)");
  // Optional too: gated_experts_bwd without dh (h does not require grad): (dWs, dbs, dgWs, dgbs).
  m.def("gated_experts_bwd_params(Tensor g_out, Tensor g_gate, Tensor h, Tensor[] Ws, Tensor[] bs, Tensor[] gWs, "
        "Tensor[] gbs, int n_residual, Tensor[] saved, Tensor gate) -> (Tensor[], Tensor[], Tensor[], Tensor[])");
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
