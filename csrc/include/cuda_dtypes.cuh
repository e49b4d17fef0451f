// Load-and-upcast helpers shared by the CUDA kernels: the accumulation type of each storage dtype (fp32 for
// fp32/fp16/bf16, fp64 for fp64) and the conversion into it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moekernels {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace cuda
}  // namespace moekernels
