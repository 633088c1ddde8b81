// The hidden-state row losses (csrc/cpu/hidden_state_kernel.cpp), compiled
// once per CPU capability; csrc/cpu/hidden_state.cpp checks the arguments,
// allocates the outputs and calls the variant chosen for this CPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fastkd {
namespace cpu {

// Rows of student states h [rows, dim] and teacher states g [rows, dim]
// (unit stride along dim). A = the accumulation type: float for
// float / bfloat16 / float16, double for double.
template <class S, class A>
struct HiddenStateRowsArgs {
  const S* student;
  int64_t student_stride;
  const S* teacher;
  int64_t teacher_stride;
  const bool* row_mask;  // nullptr: every row kept; excluded rows get loss 0, zero gradients
  int64_t rows, dim;
  bool cosine;           // cosine loss (else MSE)
  double grad_scale;     // factor on both gradients
  A* row_loss;           // [rows]
  S* grad_student;       // [rows, dim] or nullptr
  S* grad_teacher;       // [rows, dim] or nullptr
};

#define FASTKD_DECLARE_HIDDEN_STATE_KERNEL(CAPABILITY)                          \
  namespace CAPABILITY {                                                        \
  void hidden_state_rows(const HiddenStateRowsArgs<float, float>& args);        \
  void hidden_state_rows(const HiddenStateRowsArgs<double, double>& args);      \
  void hidden_state_rows(const HiddenStateRowsArgs<c10::BFloat16, float>& args); \
  void hidden_state_rows(const HiddenStateRowsArgs<c10::Half, float>& args);    \
  }

FASTKD_DECLARE_HIDDEN_STATE_KERNEL(DEFAULT)
FASTKD_DECLARE_HIDDEN_STATE_KERNEL(AVX2)
FASTKD_DECLARE_HIDDEN_STATE_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
