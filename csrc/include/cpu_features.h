// Runtime CPU feature detection for the CPU kernels' SIMD paths.
#pragma once

namespace moekernels {
namespace cpu {

inline bool has_avx2_fma() {
#if defined(MOEKERNELS_X86) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace moekernels
