// Raw-pointer interface of the top-k (sparse teacher) divergence kernel:
// csrc/cpu/topk.cpp checks the tensors and fills it;
// csrc/cpu/topk_kernel.cpp (compiled once per CPU capability) never sees an
// at::Tensor. Plain C++: no ATen here.
#pragma once

#include <cstdint>

#include "divergence_args.h"

namespace fastkd {

struct TopKDivergenceArgs {
  const void* student;         // [rows, vocab] logits, unit stride along vocab
  int64_t student_row_stride;  // elements between consecutive rows
  const int64_t* index;        // [rows, k] contiguous, distinct ids in [0, vocab) per row
                               // (on CUDA the kernel makes a row that is not NaN)
  const void* value;           // [rows, k] contiguous teacher logits (float; double for Float64)
  const bool* row_mask;        // [rows] or nullptr (all rows kept)
  void* row_loss;              // [rows] float (double for Float64 inputs)
  void* student_grad;          // [rows, vocab] contiguous, input dtype, or nullptr
  int64_t rows;
  int64_t vocab;
  int64_t k;
  DType dtype;
  int kind;                    // fastkd::divergence::Kind, never REVERSE_KL
  double inv_temperature;      // 1 / T, > 0
  double coef;                 // β (JSD, in (0, 1)) or α (skew, in (0, 1])
  double grad_scale;           // the gradient is grad_scale · d(row loss)/d(logits)
  // Hard-label cross-entropy in the same pass, exactly as DivergenceArgs's
  // labels / row_ce / hard_grad_scale (csrc/common/divergence_args.h):
  // row_ce[i] = log Σ_j exp(s_ij) − s_iy at temperature 1 for kept rows (0
  // for excluded ones), the student gradient gets
  // + hard_grad_scale · (softmax(s_i) − onehot(y)); a kept row with a label
  // outside [0, vocab) gets NaN row_ce and a NaN gradient row in the GPU
  // kernels (the CPU op rejects it), never an out-of-bounds access.
  const int64_t* labels;       // [rows] contiguous int64, or nullptr (no cross-entropy)
  void* row_ce;                // [rows] like row_loss, or nullptr (iff labels is)
  double hard_grad_scale;      // 0 when labels is nullptr
};

}  // namespace fastkd
