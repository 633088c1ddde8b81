// The CPU multi-teacher divergence kernel (csrc/cpu/mixture_kernel.cpp),
// compiled once per CPU capability; csrc/cpu/mixture.cpp checks
// the tensors and calls one.
#pragma once

#include "../common/mixture_args.h"

namespace fastkd {
namespace cpu {

#define FASTKD_DECLARE_MIXTURE_KERNEL(CAPABILITY) \
  namespace CAPABILITY {                          \
  void mixture_divergence_kernel(const MixtureDivergenceArgs& args); \
  }

FASTKD_DECLARE_MIXTURE_KERNEL(DEFAULT)
FASTKD_DECLARE_MIXTURE_KERNEL(AVX2)
FASTKD_DECLARE_MIXTURE_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
