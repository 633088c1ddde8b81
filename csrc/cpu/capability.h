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

}  // namespace cpu
}  // namespace fastkd
