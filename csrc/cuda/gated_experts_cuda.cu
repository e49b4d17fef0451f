// gated_experts CUDA kernels (DESIGN.md 3.3). Torch-free: launched by gated_experts_bind.cpp through the
// launchers declared in gated_experts_cuda.h. Same algorithm as the Triton backend
// (moekernels/ops/triton/gated_experts.py): one grouped GEMM launch per layer with fused epilogues, a fused head
// (last expert layers + gate + mix) and a fused mix backward; the weight gradients are GEMMs done by the binding.
//
// gated_linear_kernel: cuBLAS-free shared-memory tiled GEMM, BM x BN = 64 x 64 output tile per block of 256
//   threads, each thread 4 x 4 outputs (rows ty + 16 i, columns tx + 16 j: conflict-free shared reads), K in
//   chunks of 16 staged in shared memory in the accumulation type (relu applied while staging, so relu(a) is
//   never written to global memory). Operands are addressed through element strides, and the staging loop
//   walks whichever of the two indices has unit stride fastest (coalesced loads for both W and W^T). Plain FMA
//   (no tensor cores, no TF32): float32 results are IEEE-accurate, as the tests against float64 need; this is a
//   simple kernel, not a cuBLAS competitor — its job is to fuse the epilogues and the expert grouping.
// gated_head_fwd_kernel: one warp per row (the head is thin: out and the gate width are tiny); lanes split the
//   reduction dimension, xor-shuffle sums; the gate (softmax over E <= 32 lanes, or the E == 2 sigmoid) and the
//   mix out = sum_e gate_e y_e never leave registers; y and the logits are written once (saved for backward).
// gated_mix_bwd_kernel: one thread per row.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "gated_experts_cuda.h"
#include "cuda_dtypes.cuh"

namespace moekernels {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;


template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v);
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
// value of lane `src`, broadcast to the warp (a sum with zeros from the other lanes: exact; xor shuffles only)
template <typename Acc>
__device__ __forceinline__ Acc warp_bcast(Acc v, int src) {
  return warp_sum(static_cast<int>(threadIdx.x & 31) == src ? v : Acc(0));
}
template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// ------------------------------------------------------------------------------------------ grouped linear
constexpr int kBM = 64, kBN = 64, kBK = 16, kLinThreads = 256, kTM = 4, kTN = 4;
static_assert((kBM / kTM) * (kBN / kTN) == kLinThreads, "one 4x4 micro-tile per thread");

template <typename T, typename Acc>
__global__ void __launch_bounds__(kLinThreads) gated_linear_kernel(GatedLinearArgs p) {
  __shared__ Acc As[kBK][kBM + 1];
  __shared__ Acc Bs[kBK][kBN];
  const T* __restrict__ X = static_cast<const T*>(p.X);
  const T* __restrict__ W = static_cast<const T*>(p.W);
  const int tid = threadIdx.x;
  const int tx = tid % (kBN / kTN), ty = tid / (kBN / kTN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int e = blockIdx.z;
  const bool a_k_fast = p.sxk == 1, b_n_fast = p.swn == 1;

  Acc acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = Acc(0);

  const int ngroups = p.group_sum ? p.groups : 1;
  for (int g = 0; g < ngroups; ++g) {
    const int64_t ge = p.group_sum ? g : e;
    const T* Xg = X + ge * p.sxe;
    const T* Wg = W + ge * p.swe;
    for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
#pragma unroll
      for (int i = 0; i < (kBM * kBK) / kLinThreads; ++i) {
        const int idx = tid + i * kLinThreads;
        const int mm = a_k_fast ? idx / kBK : idx % kBM;
        const int kk = a_k_fast ? idx % kBK : idx / kBM;
        const int64_t m = m0 + mm, k = k0 + kk;
        Acc v = Acc(0);
        if (m < p.M && k < p.K) v = to_acc(Xg[m * p.sxm + k * p.sxk]);
        if (p.pre_relu) v = v > Acc(0) ? v : Acc(0);
        As[kk][mm] = v;
      }
#pragma unroll
      for (int i = 0; i < (kBN * kBK) / kLinThreads; ++i) {
        const int idx = tid + i * kLinThreads;
        const int nn = b_n_fast ? idx % kBN : idx / kBK;
        const int kk = b_n_fast ? idx / kBN : idx % kBK;
        const int64_t n = n0 + nn, k = k0 + kk;
        Bs[kk][nn] = (n < p.N && k < p.K) ? to_acc(Wg[k * p.swk + n * p.swn]) : Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        Acc a[kTM], b[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = As[kk][ty + i * (kBM / kTM)];
#pragma unroll
        for (int j = 0; j < kTN; ++j) b[j] = Bs[kk][tx + j * (kBN / kTN)];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
  }

  // epilogue: + bias ; * (mask > 0), U = relu(mask) ; + residual X[e](m, n) ; + Y
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  const T* __restrict__ mask = static_cast<const T*>(p.mask);
  T* __restrict__ Y = static_cast<T*>(p.Y);
  T* __restrict__ U = static_cast<T*>(p.U);
  const int64_t eo = p.group_sum ? 0 : e;
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty + i * (kBM / kTM);
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t n = n0 + tx + j * (kBN / kTN);
      if (n >= p.N) continue;
      const int64_t yoff = eo * p.sye + m * p.sym + n;
      Acc v = acc[i][j];
      if (bias != nullptr) v += to_acc(bias[eo * p.sbe + n]);
      if (mask != nullptr) {
        const Acc mk = to_acc(mask[yoff]);
        if (!(mk > Acc(0))) v = Acc(0);
        if (U != nullptr) U[yoff] = from_acc<T>(mk > Acc(0) ? mk : Acc(0));
      }
      if (p.residual) v += to_acc(X[eo * p.sxe + m * p.sxm + n * p.sxk]);
      if (p.accum) v += to_acc(Y[yoff]);
      Y[yoff] = from_acc<T>(v);
    }
  }
}

// ------------------------------------------------------------------------------------------ head forward
constexpr int kHeadWarps = 8;
constexpr int kHeadOC = 4;  // output columns accumulated together (one read of the input row per chunk)

template <typename T, typename Acc>
__global__ void __launch_bounds__(kHeadWarps * 32) gated_head_fwd_kernel(GatedHeadArgs p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kHeadWarps + (threadIdx.x >> 5);
  if (row >= p.B) return;  // whole warps leave together (no block-level barrier below)
  const T* __restrict__ XG = static_cast<const T*>(p.XG);
  const T* __restrict__ WG = static_cast<const T*>(p.WG);
  const T* __restrict__ BG = static_cast<const T*>(p.BG);
  const T* __restrict__ XE = static_cast<const T*>(p.XE);
  const T* __restrict__ WE = static_cast<const T*>(p.WE);
  const T* __restrict__ BE = static_cast<const T*>(p.BE);
  T* __restrict__ Y = static_cast<T*>(p.Y);
  T* __restrict__ LOGIT = static_cast<T*>(p.LOGIT);
  T* __restrict__ GATE = static_cast<T*>(p.GATE);
  T* __restrict__ OUT = static_cast<T*>(p.OUT);

  // gate logits: lane j keeps logit j (NL <= 32, checked by the binding)
  const T* xg = XG + row * p.KG;
  Acc my_logit = -static_cast<Acc>(INFINITY);
  for (int64_t j = 0; j < p.NL; ++j) {
    Acc s = Acc(0);
    for (int64_t k = lane; k < p.KG; k += 32) {
      Acc x = to_acc(xg[k]);
      if (p.g_pre_relu) x = x > Acc(0) ? x : Acc(0);
      s = fma(x, to_acc(WG[k * p.NL + j]), s);
    }
    s = warp_sum(s) + to_acc(BG[j]);
    if (lane == j) my_logit = s;
    if (lane == 0) LOGIT[row * p.NL + j] = from_acc<T>(s);
  }
  Acc my_gate;
  if (p.sigmoid) {  // E == 2: gate = (sigmoid(l), sigmoid(-l)), 1 - s without cancellation
    const Acc l0 = warp_bcast(my_logit, 0);
    my_gate = lane == 0 ? Acc(1) / (Acc(1) + exp(-l0)) : (lane == 1 ? Acc(1) / (Acc(1) + exp(l0)) : Acc(0));
  } else {
    const Acc mx = warp_max(my_logit);
    const Acc pr = lane < p.NL ? exp(my_logit - mx) : Acc(0);
    my_gate = pr / warp_sum(pr);
  }
  if (lane < p.E) GATE[row * p.E + lane] = from_acc<T>(my_gate);

  // every expert's last layer, in chunks of kHeadOC output columns, and the mix
  for (int64_t o0 = 0; o0 < p.O; o0 += kHeadOC) {
    Acc out[kHeadOC];
#pragma unroll
    for (int c = 0; c < kHeadOC; ++c) out[c] = Acc(0);
    for (int64_t e = 0; e < p.E; ++e) {
      const T* xe = XE + e * p.sxe + row * p.sxm;
      const T* we = WE + e * p.KE * p.O;
      Acc part[kHeadOC];
#pragma unroll
      for (int c = 0; c < kHeadOC; ++c) part[c] = Acc(0);
      for (int64_t k = lane; k < p.KE; k += 32) {
        Acc x = to_acc(xe[k]);
        if (p.e_pre_relu) x = x > Acc(0) ? x : Acc(0);
#pragma unroll
        for (int c = 0; c < kHeadOC; ++c)
          if (o0 + c < p.O) part[c] = fma(x, to_acc(we[k * p.O + o0 + c]), part[c]);
      }
      const Acc ge = warp_bcast(my_gate, static_cast<int>(e));
#pragma unroll
      for (int c = 0; c < kHeadOC; ++c) {
        const Acc s = warp_sum(part[c]);
        if (o0 + c >= p.O) continue;
        Acc y = s + to_acc(BE[e * p.O + o0 + c]);
        if (p.e_residual) y += to_acc(xe[o0 + c]);  // KE == O
        const T yt = from_acc<T>(y);
        if (lane == 0) Y[(row * p.E + e) * p.O + o0 + c] = yt;
        out[c] = fma(ge, to_acc(yt), out[c]);  // the mix uses y as stored, consistent with the saved y
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < kHeadOC; ++c)
        if (o0 + c < p.O) OUT[row * p.O + o0 + c] = from_acc<T>(out[c]);
    }
  }
}

// ------------------------------------------------------------------------------------------ mix backward
constexpr int kMixThreads = 256;

template <typename T, typename Acc>
__device__ __forceinline__ Acc dgate_of(const GatedMixBwdArgs& p, int64_t row, int64_t e) {
  const T* GOUT = static_cast<const T*>(p.GOUT);
  const T* Y = static_cast<const T*>(p.Y);
  Acc d = p.GGATE != nullptr ? to_acc(static_cast<const T*>(p.GGATE)[row * p.E + e]) : Acc(0);
  for (int64_t o = 0; o < p.O; ++o) d = fma(to_acc(GOUT[row * p.O + o]), to_acc(Y[(row * p.E + e) * p.O + o]), d);
  return d;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kMixThreads) gated_mix_bwd_kernel(GatedMixBwdArgs p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMixThreads + threadIdx.x;
  if (row >= p.B) return;
  const T* __restrict__ GOUT = static_cast<const T*>(p.GOUT);
  const T* __restrict__ GATE = static_cast<const T*>(p.GATE);
  T* __restrict__ DY = static_cast<T*>(p.DY);
  T* __restrict__ DLOGIT = static_cast<T*>(p.DLOGIT);
  for (int64_t e = 0; e < p.E; ++e) {
    const Acc ge = to_acc(GATE[row * p.E + e]);
    for (int64_t o = 0; o < p.O; ++o) DY[(row * p.E + e) * p.O + o] = from_acc<T>(ge * to_acc(GOUT[row * p.O + o]));
  }
  if (p.sigmoid) {  // gate = (s, 1 - s): dl = (dgate_0 - dgate_1) s (1 - s)
    const Acc d0 = dgate_of<T, Acc>(p, row, 0), d1 = dgate_of<T, Acc>(p, row, 1);
    DLOGIT[row] = from_acc<T>((d0 - d1) * to_acc(GATE[row * 2]) * to_acc(GATE[row * 2 + 1]));
  } else {  // dl_e = gate_e (dgate_e - sum_e' gate_e' dgate_e')
    Acc s = Acc(0);
    for (int64_t e = 0; e < p.E; ++e) s = fma(to_acc(GATE[row * p.E + e]), dgate_of<T, Acc>(p, row, e), s);
    for (int64_t e = 0; e < p.E; ++e)
      DLOGIT[row * p.NL + e] = from_acc<T>(to_acc(GATE[row * p.E + e]) * (dgate_of<T, Acc>(p, row, e) - s));
  }
}

// ------------------------------------------------------------------------------------------ launch helpers
template <typename T>
cudaError_t launch_linear(const GatedLinearArgs& a, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((a.M + kBM - 1) / kBM), static_cast<unsigned>((a.N + kBN - 1) / kBN),
                  static_cast<unsigned>(a.group_sum ? 1 : a.groups));
  gated_linear_kernel<T, Acc><<<grid, kLinThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_head(const GatedHeadArgs& a, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (a.B == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((a.B + kHeadWarps - 1) / kHeadWarps);
  gated_head_fwd_kernel<T, Acc><<<grid, kHeadWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mix_bwd(const GatedMixBwdArgs& a, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (a.B == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>((a.B + kMixThreads - 1) / kMixThreads);
  gated_mix_bwd_kernel<T, Acc><<<grid, kMixThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gated_linear_cuda(GatedDType dtype, const GatedLinearArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case GatedDType::kFloat32:
      return launch_linear<float>(args, stream);
    case GatedDType::kFloat64:
      return launch_linear<double>(args, stream);
    case GatedDType::kFloat16:
      return launch_linear<__half>(args, stream);
    case GatedDType::kBFloat16:
      return launch_linear<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gated_head_fwd_cuda(GatedDType dtype, const GatedHeadArgs& args, cudaStream_t stream) {
  if (args.NL > 32 || args.E > 32) return cudaErrorInvalidValue;
  switch (dtype) {
    case GatedDType::kFloat32:
      return launch_head<float>(args, stream);
    case GatedDType::kFloat64:
      return launch_head<double>(args, stream);
    case GatedDType::kFloat16:
      return launch_head<__half>(args, stream);
    case GatedDType::kBFloat16:
      return launch_head<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gated_mix_bwd_cuda(GatedDType dtype, const GatedMixBwdArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case GatedDType::kFloat32:
      return launch_mix_bwd<float>(args, stream);
    case GatedDType::kFloat64:
      return launch_mix_bwd<double>(args, stream);
    case GatedDType::kFloat16:
      return launch_mix_bwd<__half>(args, stream);
    case GatedDType::kBFloat16:
      return launch_mix_bwd<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace moekernels
