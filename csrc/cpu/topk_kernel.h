// The CPU top-k divergence kernel (csrc/cpu/topk_kernel.cpp), compiled once
// per CPU capability; csrc/cpu/topk.cpp checks the tensors and
// calls one.
#pragma once

#include "../common/topk_args.h"

namespace fastkd {
namespace cpu {

#define FASTKD_DECLARE_TOPK_KERNEL(CAPABILITY) \
  namespace CAPABILITY {                       \
  void topk_divergence_kernel(const TopKDivergenceArgs& args); \
  }

FASTKD_DECLARE_TOPK_KERNEL(DEFAULT)
FASTKD_DECLARE_TOPK_KERNEL(AVX2)
FASTKD_DECLARE_TOPK_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
