// The ULD row softmax (csrc/cpu/uld_kernel.cpp), compiled once per CPU
// capability; csrc/cpu/uld.cpp calls the variant chosen for this CPU on each
// float32 row before ordering it.
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

#define FASTKD_DECLARE_ULD_KERNEL(CAPABILITY)                                                     \
  namespace CAPABILITY {                                                                          \
  /* out = softmax(x · inv_temperature) of one row of n ≥ 1 entries (x may be out), the         \
     exponentials lane-parallel and their sum in float64; false when a probability is NaN. */    \
  bool uld_softmax_row(const float* x, int64_t n, float inv_temperature, float* out);             \
  }

FASTKD_DECLARE_ULD_KERNEL(DEFAULT)
FASTKD_DECLARE_ULD_KERNEL(AVX2)
FASTKD_DECLARE_ULD_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
