// Raw-pointer interface of the divergence kernels, shared by the CPU op
// (csrc/cpu/divergence.cpp → csrc/cpu/divergence_kernel.cpp, compiled once per
// CPU capability and never seeing an at::Tensor) and the CUDA op
// (csrc/cuda/divergence.cu). Plain C++: no ATen here.
#pragma once

#include <cstdint>

namespace fastkd {

enum class DType : int { Float32, Float64, BFloat16, Float16 };

struct DivergenceArgs {
  const void* student;         // [rows, vocab], unit stride along vocab
  const void* teacher;         // [rows, vocab], unit stride along vocab
  int64_t student_row_stride;  // elements between consecutive rows
  int64_t teacher_row_stride;
  const bool* row_mask;        // [rows] or nullptr (all rows kept)
  void* row_loss;              // [rows] float (float64 for Float64 inputs)
  void* student_grad;          // [rows, vocab] contiguous, input dtype, or nullptr
  void* teacher_grad;          // [rows, vocab] contiguous, input dtype, or nullptr
  int64_t rows;
  int64_t vocab;
  DType dtype;
  int kind;                    // fastkd::divergence::Kind
  double inv_temperature;      // 1 / T, > 0
  double coef;                 // β (JSD) or α (skew); see checks.h for the ranges
  double grad_scale;           // gradients are grad_scale · d(row loss)/d(logits)
};

}  // namespace fastkd
