// C entry points (ctypes) around the mog_posterior CUDA launchers compiled for the CPU emulator (emu.h).
// Every buffer is copied into a fresh allocation with NaN-filled guard zones on both sides: a write outside a
// buffer is reported (return code 2), a read outside one shows up as NaN in the results. The workspace is
// filled with NaN bytes so a read of scratch that was never written shows up too.
#include "emu.h"

#include EMU_KERNEL_SOURCE  // the rewritten csrc/cuda/mog_posterior_cuda.cu

namespace {

constexpr size_t kGuard = 4096;

struct Guarded {
  std::vector<unsigned char> mem;
  size_t n = 0;
  Guarded(const void* src, size_t bytes) : mem(bytes + 2 * kGuard, 0xff), n(bytes) {
    if (src && bytes) std::memcpy(mem.data() + kGuard, src, bytes);
  }
  void* ptr() { return mem.data() + kGuard; }
  bool intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (mem[i] != 0xff || mem[kGuard + n + i] != 0xff) return false;
    return true;
  }
  void copy_out(void* dst) const {
    if (dst && n) std::memcpy(dst, mem.data() + kGuard, n);
  }
};

size_t esize(int dtype) { return dtype == 1 ? 8 : dtype == 0 ? 4 : 2; }

}  // namespace

extern "C" {

void emu_set_sms(int sms) { emu::g_sms = sms; }

int emu_bwd_splits(int dtype, int64_t B, int64_t D, int64_t K) {
  return moekernels::cuda::mog_posterior_bwd_splits(static_cast<moekernels::cuda::DType>(dtype), B, D, K);
}

// Returns 0 ok, 1 CUDA error from the launcher, 2 a guard zone was overwritten.
int emu_fwd(int dtype, const void* x, const void* means, const void* log_var, const void* logpi, void* log_resp,
            void* lse, int64_t* assign, int64_t B, int64_t D, int64_t K) {
  using namespace moekernels::cuda;
  const DType dt = static_cast<DType>(dtype);
  const size_t e = esize(dtype);
  Guarded gx(x, B * D * e), gm(means, K * D * e), glv(log_var, K * D * e), glp(logpi, K * e);
  Guarded glr(nullptr, B * K * e), glse(nullptr, B * e), ga(nullptr, B * 8);
  Guarded gws(nullptr, mog_posterior_fwd_workspace_bytes(dt, B, D, K));
  const cudaError_t err = mog_posterior_fwd_cuda(dt, gx.ptr(), gm.ptr(), glv.ptr(), glp.ptr(), glr.ptr(), glse.ptr(),
                                                 static_cast<int64_t*>(ga.ptr()), gws.ptr(), B, D, K, nullptr);
  if (err != cudaSuccess) return 1;
  for (const Guarded* g : {&gx, &gm, &glv, &glp, &glr, &glse, &ga, &gws})
    if (!g->intact()) return 2;
  glr.copy_out(log_resp);
  glse.copy_out(lse);
  ga.copy_out(assign);
  return 0;
}

int emu_bwd(int dtype, const void* g_lr, const void* g_lse, const void* x, const void* means, const void* log_var,
            const void* log_resp, void* dx, void* dmeans, void* dlog_var, void* dlogpi, int64_t B, int64_t D,
            int64_t K) {
  using namespace moekernels::cuda;
  const DType dt = static_cast<DType>(dtype);
  const size_t e = esize(dtype);
  const int splits = mog_posterior_bwd_splits(dt, B, D, K);
  Guarded gg(g_lr, B * K * e), ggl(g_lse, B * e), gx(x, B * D * e), gm(means, K * D * e), glv(log_var, K * D * e),
      glr(log_resp, B * K * e);
  Guarded gdx(nullptr, B * D * e), gdm(nullptr, K * D * e), gdv(nullptr, K * D * e), gdp(nullptr, K * e);
  Guarded gws(nullptr, mog_posterior_bwd_workspace_bytes(dt, B, D, K, splits));
  const cudaError_t err =
      mog_posterior_bwd_cuda(dt, gg.ptr(), ggl.ptr(), gx.ptr(), gm.ptr(), glv.ptr(), glr.ptr(), gdx.ptr(), gdm.ptr(),
                             gdv.ptr(), gdp.ptr(), gws.ptr(), B, D, K, splits, nullptr);
  if (err != cudaSuccess) return 1;
  for (const Guarded* g : {&gg, &ggl, &gx, &gm, &glv, &glr, &gdx, &gdm, &gdv, &gdp, &gws})
    if (!g->intact()) return 2;
  gdx.copy_out(dx);
  gdm.copy_out(dmeans);
  gdv.copy_out(dlog_var);
  gdp.copy_out(dlogpi);
  return 0;
}

}  // extern "C"
