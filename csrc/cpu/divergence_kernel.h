// The CPU divergence kernel (csrc/cpu/divergence_kernel.cpp), compiled once per
// CPU capability; csrc/cpu/divergence.cpp checks the tensors and calls one.
#pragma once

#include "../common/divergence_args.h"

namespace fastkd {
namespace cpu {

// One definition per capability, in namespaces named after it.
#define FASTKD_DECLARE_DIVERGENCE_KERNEL(CAPABILITY) \
  namespace CAPABILITY {                             \
  void divergence_kernel(const DivergenceArgs& args); \
  }

FASTKD_DECLARE_DIVERGENCE_KERNEL(DEFAULT)
FASTKD_DECLARE_DIVERGENCE_KERNEL(AVX2)
FASTKD_DECLARE_DIVERGENCE_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
