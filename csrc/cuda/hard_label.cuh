// The hard-label cross-entropy's per-row state and gradient term, shared by
// the CUDA divergence kernels that compute it in their pass (divergence.cu in
// float, mixture.cu in double).
#pragma once

#include <cstdint>

#include "../common/divergence_math.h"

namespace fastkd {
namespace cuda {

// The cross-entropy's row constants (rows with labels only). `scale` is
// hard_grad_scale, or NaN for a label outside [0, V): the kernels' own guard
// (the Python layer and the CPU ops check the range first) turns the whole
// gradient row NaN without a branch in the element loop.
template <class W>
struct HardLabel {
  int64_t y;  // the label
  W log_sum;  // log Σ_j exp(s_j − max_s), at temperature 1
  W scale;    // hard_grad_scale, or NaN
};

// hard_grad_scale · (softmax(s)_j − [j == y]) for the element s = s_j, whose
// student probability at temperature T is q (softmax(s)_j itself when unit_t,
// T == 1).
template <class W>
__device__ __forceinline__ W hard_label_grad(W s, int64_t j, W q, W max_s, bool unit_t,
                                             const HardLabel<W>& h) {
  const W softmax = unit_t ? q : divergence::fk_exp((s - max_s) - h.log_sum);
  return h.scale * (j == h.y ? softmax - W(1) : softmax);
}

}  // namespace cuda
}  // namespace fastkd
