// The SP, PKT and CC row passes (csrc/cpu/gram_relation_kernel.cpp), compiled
// once per CPU capability; csrc/cpu/gram_relation.cpp forms the Gram
// matrices (at::mm) and calls the variant chosen for this CPU on each row.
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

// Each takes one row i of the student's and the teacher's [N, N] Gram
// (SP, CC) or cosine (PKT) matrices, returns the row's loss term in float64
// (SP, PKT: before the 1/N² of the mean; CC: the row's Σ_j (K_s − K_t)²), and,
// when student_grad, overwrites the student's row with ∂loss/∂G_i (SP),
// ∂loss/∂H_i (PKT, one side's half of the symmetric H = x̂ x̂ᵀ) or
// (K_s − K_t) ∂K_s/∂G_i (CC, before the norm's factor); docs/spec.md §2 and
// gram_relation.cpp's comments give the formulas.
#define FASTKD_DECLARE_GRAM_RELATION_KERNEL(CAPABILITY)                                                   \
  namespace CAPABILITY {                                                                                \
  double sp_row(float* gs_row, const float* gt_row, int64_t n, double inv_n2, bool student_grad);        \
  double sp_row(double* gs_row, const double* gt_row, int64_t n, double inv_n2, bool student_grad);      \
  double pkt_row(float* hs_row, const float* ht_row, int64_t n, double inv_n2, double eps, bool student_grad); \
  double pkt_row(double* hs_row, const double* ht_row, int64_t n, double inv_n2, double eps, bool student_grad); \
  double cc_row(float* gs_row, const float* gt_row, int64_t n, double gamma, int64_t order, bool student_grad);   \
  double cc_row(double* gs_row, const double* gt_row, int64_t n, double gamma, int64_t order, bool student_grad); \
  }

FASTKD_DECLARE_GRAM_RELATION_KERNEL(DEFAULT)
FASTKD_DECLARE_GRAM_RELATION_KERNEL(AVX2)
FASTKD_DECLARE_GRAM_RELATION_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
