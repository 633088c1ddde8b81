// Raw-pointer interface of the multi-teacher (mixture) divergence kernel:
// csrc/cpu/mixture_divergence.cpp checks the tensors and fills it;
// csrc/cpu/mixture_kernel.cpp (compiled once per CPU capability) never sees
// an at::Tensor. Plain C++: no ATen here.
#pragma once

#include <cstdint>

#include "divergence_args.h"

namespace fastkd {

struct MixtureDivergenceArgs {
  const void* student;         // [rows, vocab] logits, unit stride along vocab
  int64_t student_row_stride;  // elements between consecutive rows
  const void* teacher;         // [teachers, rows, vocab], unit stride along vocab, student's dtype
  int64_t teacher_stride;      // elements between consecutive teachers
  int64_t teacher_row_stride;  // elements between consecutive rows of one teacher
  const double* log_weights;   // [teachers] log w_k (−inf for a teacher of weight 0)
  int64_t teachers;
  const bool* row_mask;        // [rows] or nullptr (all rows kept)
  void* row_loss;              // [rows] float (double for Float64 inputs)
  void* student_grad;          // [rows, vocab] contiguous, input dtype, or nullptr
  int64_t rows;
  int64_t vocab;
  DType dtype;
  int kind;                    // fastkd::divergence::Kind
  double inv_temperature;      // 1 / T, > 0
  double coef;                 // β (JSD) or α (skew), interior as for divergence_forward
  double grad_scale;           // the gradient is grad_scale · d(row loss)/d(logits)
};

}  // namespace fastkd
