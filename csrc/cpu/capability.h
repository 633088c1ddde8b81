// Run-time choice among the SIMD variants the CPU kernels are compiled for.
#pragma once

#include <string>

namespace fastkd {
namespace cpu {

enum class Capability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

// The best variant this CPU supports, lowered by the environment variable
// FASTKD_CPU_CAPABILITY (default | avx2 | avx512) when it is set; asking for
// more than the CPU supports is an error, not a silent downgrade.
Capability active_capability();

// Highest variant this CPU can run (ignores the environment variable).
Capability supported_capability();

std::string capability_name(Capability c);

// The one of a kernel's AVX512::, AVX2:: and DEFAULT:: builds (function
// pointers of one type F, or a struct of them) that active_capability() selects.
template <class F>
F pick_variant(F avx512, F avx2, F fallback) {
  switch (active_capability()) {
    case Capability::AVX512: return avx512;
    case Capability::AVX2: return avx2;
    case Capability::Default: break;
  }
  return fallback;
}

// Runs the variant of one kernel for active_capability() on `args`: `avx512`,
// `avx2` and `fallback` are its AVX512::, AVX2:: and DEFAULT:: builds.
template <class Args>
void run_kernel_variant(const Args& args, void (*avx512)(const Args&), void (*avx2)(const Args&),
                        void (*fallback)(const Args&)) {
  pick_variant(avx512, avx2, fallback)(args);
}

}  // namespace cpu
}  // namespace fastkd
