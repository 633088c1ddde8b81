// Raw-pointer interface of the divergence kernels, shared by the CPU op
// (csrc/cpu/divergence.cpp → csrc/cpu/divergence_kernel.cpp, compiled once per
// CPU capability and never seeing an at::Tensor) and the CUDA op
// (csrc/cuda/divergence.cu). Plain C++: no ATen here.
#pragma once

#include <cstdint>

namespace fastkd {

enum class DType : int { Float32, Float64, BFloat16, Float16 };

// Row i of the logits starts (i / rows_per_block) · block_stride +
// (i % rows_per_block) · row_stride elements after the base pointer: a
// [blocks, rows_per_block, vocab] view such as the causal shift
// logits[:, :-1] of [B, T, vocab] logits, read in place. Plain [rows, vocab]
// logits have rows_per_block = rows (at least 1) and block strides 0.
inline int64_t logit_row_offset(int64_t i, int64_t rows_per_block, int64_t block_stride,
                                int64_t row_stride) {
  return (i / rows_per_block) * block_stride + (i % rows_per_block) * row_stride;
}

struct DivergenceArgs {
  const void* student;         // [rows, vocab], unit stride along vocab
  const void* teacher;         // [rows, vocab], unit stride along vocab
  int64_t student_row_stride;  // elements between consecutive rows of a block
  int64_t teacher_row_stride;
  int64_t rows_per_block;      // >= 1; see logit_row_offset
  int64_t student_block_stride;  // elements between consecutive blocks
  int64_t teacher_block_stride;
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
  // Hard-label cross-entropy at temperature 1 in the same pass (nullptr
  // labels: none). For a kept row i with label y = labels[i] in [0, vocab):
  //   row_ce[i] = log Σ_j exp(s_ij) − s_iy   (0 for excluded rows)
  // and the student gradient gets + hard_grad_scale · (softmax(s_i) − onehot(y)).
  // The kernels reuse the student normaliser when inv_temperature == 1. A
  // kept row with a label outside [0, vocab) (the ops check before launching;
  // this is the kernels' own guard) gets row_ce NaN and a NaN gradient row,
  // and nothing is read or written out of bounds.
  const int64_t* labels;       // [rows] contiguous int64, or nullptr
  void* row_ce;                // [rows] like row_loss, or nullptr (iff labels is)
  double hard_grad_scale;      // 0 when labels is nullptr
};

}  // namespace fastkd
