// gated_experts (DESIGN.md 3.3): CUDA launchers. A light header (CUDA runtime only, no torch): the kernels and
// launchers live in gated_experts_cuda.cu, the torch glue (layer loop, allocation, weight-gradient GEMMs) in
// gated_experts_bind.cpp.
//
// Three kernels, the same algorithm as the Triton backend (moekernels/ops/triton/gated_experts.py):
//   gated_linear   grouped tiled GEMM, one launch per layer for all E experts (group = blockIdx.z), operands
//                  through element strides (an expert stride of 0 shares h; W^T is W with swapped strides), relu
//                  fused on the operand load, epilogue: + bias, * (mask > 0) (+ write relu(mask)), + residual,
//                  + existing output; or the groups summed inside the reduction (dh = sum_e da_e W_e^T).
//   gated_head_fwd last layer of every expert + the gate's last layer + sigmoid/softmax + the mix, one warp per row.
//   gated_mix_bwd  dy_e = gate_e g_out, dgate_e = g_out . y_e + g_gate_e, dlogits (softmax / sigmoid backward).
// Element type T of every tensor of one call (float, double, half, bfloat16); accumulation in float (double for
// double). All work is enqueued on `stream`; each launcher returns the first CUDA error (cudaSuccess if none).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moekernels {
namespace cuda {

enum class GatedDType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Y[e] = epilogue(pre(X[e]) @ W[e]) for e < groups (or, group_sum: Y = sum_e pre(X[e]) @ W[e]).
// X element (e, m, k) at e*sxe + m*sxm + k*sxk; W element (e, k, n) at e*swe + k*swk + n*swn; bias (e, n) at
// e*sbe + n; Y, mask, U element (e, m, n) at e*sye + m*sym + n. Epilogue in order: + bias (if non-null);
// * (mask > 0) and U = relu(mask) (if mask / U non-null); + X[e](m, n) (residual, needs K == N); + Y (accum).
struct GatedLinearArgs {
  const void* X = nullptr;
  const void* W = nullptr;
  const void* bias = nullptr;
  const void* mask = nullptr;
  void* Y = nullptr;
  void* U = nullptr;
  int64_t M = 0, N = 0, K = 0;
  int groups = 1;
  int64_t sxe = 0, sxm = 0, sxk = 0, swe = 0, swk = 0, swn = 0, sbe = 0, sye = 0, sym = 0;
  bool pre_relu = false, residual = false, accum = false, group_sum = false;
};

cudaError_t gated_linear_cuda(GatedDType dtype, const GatedLinearArgs& args, cudaStream_t stream);

// Head: XE (e, b, k) at e*sxe + b*sxm + k, WE (E, KE, O), BE (E, O), XG (B, KG), WG (KG, NL), BG (NL,) ->
// Y (B, E, O) (the expert outputs, saved), LOGIT (B, NL) (saved), GATE (B, E), OUT (B, O).
struct GatedHeadArgs {
  const void *XE = nullptr, *WE = nullptr, *BE = nullptr, *XG = nullptr, *WG = nullptr, *BG = nullptr;
  void *Y = nullptr, *LOGIT = nullptr, *GATE = nullptr, *OUT = nullptr;
  int64_t B = 0, KE = 0, O = 0, E = 0, KG = 0, NL = 0, sxe = 0, sxm = 0;
  bool e_pre_relu = false, e_residual = false, g_pre_relu = false, sigmoid = false;
};

cudaError_t gated_head_fwd_cuda(GatedDType dtype, const GatedHeadArgs& args, cudaStream_t stream);

// Mix backward: GOUT (B, O), GGATE (B, E) or null, Y (B, E, O), GATE (B, E) -> DY (B, E, O), DLOGIT (B, NL).
struct GatedMixBwdArgs {
  const void *GOUT = nullptr, *GGATE = nullptr, *Y = nullptr, *GATE = nullptr;
  void *DY = nullptr, *DLOGIT = nullptr;
  int64_t B = 0, O = 0, E = 0, NL = 0;
  bool sigmoid = false;
};

cudaError_t gated_mix_bwd_cuda(GatedDType dtype, const GatedMixBwdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace moekernels
