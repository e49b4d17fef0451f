// molr_mog_score (DESIGN.md 3.1): CUDA launchers. A light header (CUDA runtime only, no torch): the kernels and
// launchers live in molr_mog_score_cuda.cu, the torch glue in molr_mog_score_bind.cpp.
//
// Dtypes: x, A, G, g_w and the outputs score, lse, w, dx are in the input dtype T (float, double, half, bfloat16).
// The small per-row / per-component inputs (s, gamma, mu, log_var, logpi, g_lse) and every intermediate written
// to global memory (C, dZ, block partials) are in the accumulation type Acc = double for double inputs, float
// otherwise; the bind file converts them (they are B- or K*L*d-sized). The backward does not read the saved lse:
// it recomputes and renormalises the weights (csrc/include/molr_mog_score.h, "Numerics").
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moekernels {
namespace cuda {

enum class MolrDType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// How one fused kernel is launched. The per-block row-tile buffers (Z, C or dZ, dC, logits, weights) live in
// dynamic shared memory when they fit the device's opt-in limit, else in a global scratch buffer the caller
// allocates (scratch_bytes) and the kernel addresses through the same generic pointers.
struct MolrPlan {
  int grid = 0;                 // persistent blocks (each loops over row tiles); 0 when B == 0
  int block = 0;                // threads per block
  size_t smem_bytes = 0;        // dynamic shared memory per block
  bool global_scratch = false;  // tile buffers in global memory instead of shared
  size_t scratch_bytes = 0;     // bytes of global scratch the caller must pass (0 unless global_scratch)
  int64_t partial_cols = 0;     // backward: columns of the (grid, partial_cols) Acc partials buffer
};

struct MolrShape {
  int64_t B, D, K, L, d;  // rows, data dims, experts, components per expert, latent dims (d == D when A is null)
  bool has_A;             // false: A = identity (latent-space case), K copies of z = x
};

// Forward: score (B, D) T, lse (B,) T, optional w (B, K, L) T.
struct MolrFwdArgs {
  MolrShape shape;
  MolrDType dtype;
  const void* x;        // (B, D) T
  const void* A;        // (K, D, d) T, or nullptr (identity)
  const void* s;        // (B,) Acc
  const void* gamma;    // (B,) Acc
  const void* mu;       // (K, L, d) Acc
  const void* log_var;  // (K, L, d) Acc
  const void* logpi;    // (K, L) Acc, normalised over all K*L
  void* score;          // (B, D) T
  void* lse;            // (B,) T
  void* w;              // (B, K, L) T, or nullptr (weights not requested)
  void* scratch;        // plan.scratch_bytes of global memory when plan.global_scratch, else unused
};

// Backward: dx (B, D) T; C and dZ (B, K*d) Acc for dA = G^T C + X^T dZ (done by the caller with two GEMMs);
// partials (grid, 2*K*L*d + K*L) Acc, ZERO-INITIALISED by the caller, laid out [dmu | dlog_var | dlogpi] per row;
// the caller sums them over the grid dimension.
struct MolrBwdArgs {
  MolrShape shape;
  MolrDType dtype;
  const void* G;        // (B, D) T = dL/dscore
  const void* g_lse;    // (B,) Acc
  const void* g_w;      // (B, K, L) T, or nullptr
  const void* x;        // (B, D) T
  const void* A;        // (K, D, d) T, or nullptr (identity)
  const void* s;        // (B,) Acc
  const void* gamma;    // (B,) Acc
  const void* mu;       // (K, L, d) Acc
  const void* log_var;  // (K, L, d) Acc
  const void* logpi;    // (K, L) Acc
  void* dx;             // (B, D) T
  void* C;              // (B, K*d) Acc, or nullptr when A is null
  void* dZ;             // (B, K*d) Acc, or nullptr when A is null
  void* partials;       // (plan.grid, plan.partial_cols) Acc, zero-initialised
  void* scratch;        // plan.scratch_bytes when plan.global_scratch
};

// Plans for the current device (cudaGetDevice). Errors (no device, bad attribute) come back as cudaError_t.
cudaError_t molr_mog_score_fwd_plan(const MolrShape& shape, MolrDType dtype, MolrPlan* plan);
cudaError_t molr_mog_score_bwd_plan(const MolrShape& shape, MolrDType dtype, MolrPlan* plan);

// Launch on `stream` with a plan from the matching *_plan call (same shape and dtype). Returns the launch error.
cudaError_t molr_mog_score_fwd_cuda(const MolrFwdArgs& args, const MolrPlan& plan, cudaStream_t stream);
cudaError_t molr_mog_score_bwd_cuda(const MolrBwdArgs& args, const MolrPlan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace moekernels
