// The InfoNCE row kernels (csrc/cpu/info_nce_kernel.cpp), compiled once per
// CPU capability; csrc/cpu/info_nce.cpp computes the logits q_i·k_j / τ (a
// GEMM against k / τ) and calls the variant chosen for this CPU. Each kernel
// makes one pass through memory over a block of logits (a row of M floats
// stays in L1 between its sub-passes), where the ATen formulation made three
// to five.
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

// A block of rows of the logits. They come from the GEMM as they are (the
// temperature is folded into k), so the row maximum's own exponent is
// exactly exp(0) = 1: with one dominant key per row the gradient P − 1 is as
// exact as the reference's.
template <class T>
struct InfoNceRowsArgs {
  T* logits;               // [rows, cols], row stride ld; overwritten by softmax / logit_grad
  int64_t ld;
  int64_t rows, cols;
  const int64_t* labels;   // [rows] each row's positive column, in [0, cols)
  T* row_loss;             // [rows] out (lse and softmax): lse_i − logit_{i, y_i}
  T* row_lse;              // [rows] out (lse and softmax), in (logit_grad)
  const T* row_scale;      // [rows] in (logit_grad): ∂loss/∂row_loss_i / τ
};

// One definition per capability, in namespaces named after it. Rows are
// independent and each is reduced in a fixed order, so the results do not
// depend on the thread count.
#define FASTKD_DECLARE_INFO_NCE_KERNEL(CAPABILITY)                                         \
  namespace CAPABILITY {                                                                   \
  /* row_lse_i = log Σ_j exp(logit_ij), row_loss; logits untouched. */                     \
  void info_nce_rows_lse(const InfoNceRowsArgs<float>& args);                              \
  void info_nce_rows_lse(const InfoNceRowsArgs<double>& args);                             \
  /* As rows_lse, and logits_ij ← P_ij = exp(logit_ij − row_lse_i). */                     \
  void info_nce_rows_softmax(const InfoNceRowsArgs<float>& args);                          \
  void info_nce_rows_softmax(const InfoNceRowsArgs<double>& args);                         \
  /* logits_ij ← (exp(logit_ij − row_lse_i) − [j = y_i]) · row_scale_i. */                 \
  void info_nce_rows_logit_grad(const InfoNceRowsArgs<float>& args);                       \
  void info_nce_rows_logit_grad(const InfoNceRowsArgs<double>& args);                      \
  }

FASTKD_DECLARE_INFO_NCE_KERNEL(DEFAULT)
FASTKD_DECLARE_INFO_NCE_KERNEL(AVX2)
FASTKD_DECLARE_INFO_NCE_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
