// mog_posterior CUDA launchers (DESIGN.md 3.2): the interface between the torch-free kernels
// (mog_posterior_cuda.cu, nvcc) and the torch binding (mog_posterior_bind.cpp, host compiler).
//
// Tensors are passed as raw device pointers to contiguous row-major storage of one dtype; the caller allocates
// the outputs and a scratch workspace of the size the *_workspace_bytes functions return (0 is allowed: pass
// nullptr). All work is enqueued on `stream`; the functions return the first CUDA error (cudaSuccess if none).
//   forward : x (B,D), means (K,D), log_var (K,D), logpi (K,) normalised
//             -> log_resp (B,K), lse (B,), assign (B,) int64
//   backward: g_log_resp (B,K), g_lse (B,), x, means, log_var, log_resp (saved)
//             -> dx (B,D), dmeans (K,D), dlog_var (K,D), dlogpi (K,)
// Accumulation is in float32 (float64 for float64 inputs); float16/bfloat16 are loaded and upcast.
// Deterministic: no atomics; cross-block sums are reduced in a fixed order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moekernels {
namespace cuda {

// Element type of every floating-point tensor of one call (the binding maps at::ScalarType onto it).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

size_t mog_posterior_fwd_workspace_bytes(DType dtype, int64_t B, int64_t D, int64_t K);

cudaError_t mog_posterior_fwd_cuda(DType dtype, const void* x, const void* means, const void* log_var,
                                   const void* logpi, void* log_resp, void* lse, int64_t* assign, void* workspace,
                                   int64_t B, int64_t D, int64_t K, cudaStream_t stream);

// How many row splits the backward's dmeans/dlog_var reduction uses on the *current* device (from its
// multiprocessor count); pass the same value to the two functions below. Returns >= 1.
int mog_posterior_bwd_splits(DType dtype, int64_t B, int64_t D, int64_t K);

size_t mog_posterior_bwd_workspace_bytes(DType dtype, int64_t B, int64_t D, int64_t K, int splits);

cudaError_t mog_posterior_bwd_cuda(DType dtype, const void* g_log_resp, const void* g_lse, const void* x,
                                   const void* means, const void* log_var, const void* log_resp, void* dx,
                                   void* dmeans, void* dlog_var, void* dlogpi, void* workspace, int64_t B,
                                   int64_t D, int64_t K, int splits, cudaStream_t stream);

}  // namespace cuda
}  // namespace moekernels
