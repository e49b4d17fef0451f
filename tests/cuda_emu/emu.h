// A tiny CPU emulator of the CUDA execution model, to run the *actual* kernel source of csrc/cuda/*.cu on a
// machine without a GPU (tests/test_cuda_build.py). Not a simulator of performance or of memory ordering:
//  * blocks run one after another; the threads of a block are ucontext fibers switched at __syncthreads() and
//    at warp shuffles, so __shared__ (= static) memory is shared by the block as on the GPU;
//  * __syncthreads() waits for every live thread of the block, __shfl_xor_sync(0xffffffff, v, o) for every live
//    lane of the warp; a barrier that cannot be released (divergent __syncthreads, lanes of a warp split between
//    a shuffle and a barrier) or a shuffle from an exited lane aborts with a message;
//  * math runs on the host (exact expf/logf: fast-math precision is not emulated).
// The .cu is rewritten before compilation: `kernel<...><<<grid, block, smem, stream>>>(args);` becomes
// `emu::launch(grid, block, smem, stream, [&] { kernel<...>(args); });` (tests/test_cuda_build.py does it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::exp;
using std::fma;
using std::log;
using std::max;
using std::min;

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

inline int g_sms = 132;  // what cudaDeviceGetAttribute(MultiProcessorCount) answers

enum State { kRunnable = 0, kWarpWait = 1, kBlockWait = 2, kDone = 3 };

struct Fiber {
  ucontext_t ctx;
  int state = kRunnable;
  unsigned tid = 0;
};

inline ucontext_t g_sched;
inline std::vector<Fiber> g_fibers;
inline std::vector<std::vector<char>> g_stacks;
inline std::vector<unsigned long long> g_slots;
inline Fiber* g_cur = nullptr;
inline std::function<void()>* g_body = nullptr;
inline const char* g_kernel = "";

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emu: %s (kernel launch %s, block %u,%u,%u)\n", what, g_kernel, blockIdx.x, blockIdx.y,
               blockIdx.z);
  std::abort();
}

inline void yield(int state) {
  Fiber* self = g_cur;
  self->state = state;
  swapcontext(&self->ctx, &g_sched);
}

inline void fiber_entry() {
  (*g_body)();
  g_cur->state = kDone;
  swapcontext(&g_cur->ctx, &g_sched);
}

template <typename T>
T shfl_xor(T v, int off) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
  const unsigned tid = g_cur->tid;
  std::memcpy(&g_slots[tid], &v, sizeof(T));
  yield(kWarpWait);
  const unsigned src = (tid & ~31u) | ((tid & 31u) ^ static_cast<unsigned>(off));
  if (src >= g_fibers.size() || g_fibers[src].state == kDone) fail("shuffle from an exited or missing lane");
  T r;
  std::memcpy(&r, &g_slots[src], sizeof(T));
  yield(kWarpWait);  // everyone has read before anyone writes the next value
  return r;
}

inline void launch_impl(const char* name, dim3 grid, dim3 block, std::function<void()> body) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024) fail("bad block size");
  if (block.y != 1 || block.z != 1) fail("emu supports 1-D blocks only");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid (a real launch fails with invalid configuration)");
  if (grid.y > 65535 || grid.z > 65535) fail("grid.y/z > 65535");
  constexpr size_t kStack = 256 * 1024;
  if (g_stacks.size() < nt) g_stacks.resize(nt, std::vector<char>(kStack));
  g_slots.assign(nt, 0);
  g_body = &body;
  g_kernel = name;
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        g_fibers.assign(nt, Fiber{});
        for (unsigned t = 0; t < nt; ++t) {
          Fiber& f = g_fibers[t];
          f.tid = t;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = g_stacks[t].data();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {
          for (unsigned t = 0; t < nt; ++t) {
            Fiber& f = g_fibers[t];
            if (f.state != kRunnable) continue;
            g_cur = &f;
            threadIdx = uint3{t, 0, 0};
            swapcontext(&g_sched, &f.ctx);
          }
          bool any_live = false, released = false;
          for (unsigned w = 0; w < (nt + 31) / 32; ++w) {
            bool live = false, all_warp = true;
            for (unsigned t = w * 32; t < std::min(nt, w * 32 + 32); ++t) {
              const int s = g_fibers[t].state;
              if (s == kDone) continue;
              live = true;
              if (s != kWarpWait) all_warp = false;
            }
            any_live |= live;
            if (live && all_warp) {
              for (unsigned t = w * 32; t < std::min(nt, w * 32 + 32); ++t)
                if (g_fibers[t].state == kWarpWait) g_fibers[t].state = kRunnable;
              released = true;
            }
          }
          if (!any_live) break;
          if (released) continue;
          bool all_block = true;
          for (unsigned t = 0; t < nt; ++t)
            if (g_fibers[t].state != kDone && g_fibers[t].state != kBlockWait) all_block = false;
          if (!all_block) fail("deadlock: threads wait at different barriers (divergent __syncthreads/shuffle)");
          for (unsigned t = 0; t < nt; ++t)
            if (g_fibers[t].state == kBlockWait) g_fibers[t].state = kRunnable;
        }
      }
  g_cur = nullptr;
}

template <typename F>
void launch(const char* name, dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/, F&& f) {
  launch_impl(name, grid, block, std::function<void()>(std::forward<F>(f)));
}

}  // namespace emu

inline void __syncthreads() { emu::yield(emu::kBlockWait); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int off) {
  if (mask != 0xffffffffu) emu::fail("emu supports full-warp shuffles only");
  return emu::shfl_xor(v, off);
}

#define cudaGetLastError() cudaSuccess
#define cudaGetDevice(p) ((*(p) = 0), cudaSuccess)
#define cudaDeviceGetAttribute(p, attr, dev) ((*(p) = emu::g_sms), cudaSuccess)
