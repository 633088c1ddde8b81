#include "capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fastkd {
namespace cpu {

Capability supported_capability() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // The flag set PyTorch requires for its own AVX512 kernels.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Capability::AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Capability::AVX2;
  }
#endif
  return Capability::Default;
}

std::string capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    case Capability::Default: break;
  }
  return "default";
}

Capability active_capability() {
  const Capability supported = supported_capability();
  const char* forced = std::getenv("FASTKD_CPU_CAPABILITY");
  if (forced == nullptr || *forced == '\0') return supported;
  const std::string name(forced);
  Capability wanted;
  if (name == "default") {
    wanted = Capability::Default;
  } else if (name == "avx2") {
    wanted = Capability::AVX2;
  } else if (name == "avx512") {
    wanted = Capability::AVX512;
  } else {
    TORCH_CHECK(false, "FASTKD_CPU_CAPABILITY must be default, avx2 or avx512, got '", name, "'");
  }
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(supported),
              "FASTKD_CPU_CAPABILITY=", name, " but this CPU supports at most ",
              capability_name(supported));
  return wanted;
}

}  // namespace cpu
}  // namespace fastkd
