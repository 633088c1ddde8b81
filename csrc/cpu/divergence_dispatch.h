// The last step of the divergence-family CPU ops (divergence.cpp, mixture.cpp,
// topk.cpp): the kept rows' labels checked, then the kernel's SIMD variant
// for this CPU run on the prepared call.
#pragma once

#include "../common/checks.h"
#include "capability.h"

namespace fastkd {
namespace cpu {

// Runs the kernel whose AVX512::, AVX2:: and DEFAULT:: builds are given on
// `call.args` (nothing for zero rows) and returns the op's outputs. Every
// kept row's label must be a class id: the kernels index the row with it.
template <class Call, class Args>
auto run_divergence_kernel(const Call& call, void (*avx512)(const Args&), void (*avx2)(const Args&),
                           void (*fallback)(const Args&)) {
  const Args& a = call.args;
  if (a.rows > 0) {
    check_kept_label_range(a.labels, a.row_mask, a.rows, a.vocab);
    run_kernel_variant(a, avx512, avx2, fallback);
  }
  return call.outputs();
}

}  // namespace cpu
}  // namespace fastkd
