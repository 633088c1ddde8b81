// CPU implementation of fastkd::uld_forward (docs/spec.md §1.14, Universal
// Logit Distillation): per aligned row i, with p = softmax(s_i / T_s) over the
// student's V_s entries and q = softmax(t_i / T_t) over the teacher's V_t,
//   ℓ_i = Σ_k |a_k − b_k|,   a = sort↓(p), b = sort↓(q), zero-padded to max(V_s, V_t).
//
// One task per row (at::parallel_for; a row's result does not depend on the
// thread count), on per-thread scratch: float32 probabilities (their softmax
// lane-parallel, uld_kernel.cpp) through value buckets that sort only where
// the two rows cross (uld_buckets.h), float64 ones through std::sort. No
// sorted [N, V] tensor exists; the loss and the gradient come from the same
// pass and nothing is kept for the backward.
//
// Gradient. With sign(0) = 0 and ties sharing the mean of their ranks' signs,
// the gradient of ℓ_i with respect to an entry of p with value v > 0 is
//   g(v) = (clamp(A + n − B_ge, 0, n) − clamp(B_gt − A, 0, n)) / n,
//   A = #{p > v}, n = #{p = v}, B_gt = #{q > v}, B_ge = #{q ≥ v}
// (of the n ranks the run of v occupies, B_gt − A see a larger teacher value,
// A + n − B_ge a smaller one). The counts come from walking the two sorted
// rows together, run by run. An entry with p = 0 gets g = 0 by the same
// formula up to padding, which cannot matter: the softmax Jacobian multiplies
// it by p = 0. Through the softmax,
//   dℓ_i/ds_j = p_j (g_j − Σ_k p_k g_k) / T_s,
// and the teacher's gradient is the same with the roles swapped.
//
// Log-probability rows (student_is_logprob / teacher_is_logprob): that side's
// row x is used as given, p_j = exp(x_j), no softmax and no normalisation
// (temperature 1), and dℓ_i/dx_j = p_j g_j, no softmax Jacobian centring.
//
// Inputs: student [N, V_s], teacher [N, V_t] (one floating dtype, unit stride
// along V), row_mask [N] bool or None (false: loss 0, gradient 0). float32
// (float64 for float64 input) probabilities; row sums and the L1 sum in
// float64. A row with a NaN or infinite probability (NaN or +inf logits, all
// logits −inf, or a log-probability whose exp overflows) gets a NaN loss and
// NaN gradients; an all −inf log-probability row is the zero vector.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/uld_op.h"
#include "capability.h"
#include "uld_buckets.h"
#include "uld_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

// softmax(x / T) of one float64 row into out, the sum in float64; false when
// a probability is NaN. (Float32 rows go through uld_kernel.cpp.)
template <typename scalar_t, typename prob_t>
bool row_softmax(const scalar_t* x, int64_t n, double inv_temperature, prob_t* out) {
  prob_t m = -std::numeric_limits<prob_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, static_cast<prob_t>(x[j]));
  const prob_t inv_t = static_cast<prob_t>(inv_temperature);
  double total = 0;
  for (int64_t j = 0; j < n; ++j) {
    // (x − m) is NaN for an all −inf row or a +inf entry; NaN inputs stay NaN
    out[j] = std::exp((static_cast<prob_t>(x[j]) - m) * inv_t);
    total += static_cast<double>(out[j]);
  }
  const prob_t inv_total = static_cast<prob_t>(1.0 / total);
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) {
    out[j] *= inv_total;
    finite &= !std::isnan(out[j]);
  }
  return finite;
}

// exp(x) of one log-probability row into out, as given; false when a value
// is NaN or +inf.
template <typename scalar_t, typename prob_t>
bool row_exp(const scalar_t* x, int64_t n, prob_t* out) {
  bool finite = true;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = std::exp(static_cast<prob_t>(x[j]));
    finite &= std::isfinite(out[j]);
  }
  return finite;
}

using SoftmaxRow = bool (*)(const float*, int64_t, float, float*);

// uld_kernel.cpp's float32 row softmax for this CPU
SoftmaxRow simd_softmax_row() {
  return pick_variant<SoftmaxRow>(&AVX512::uld_softmax_row, &AVX2::uld_softmax_row, &DEFAULT::uld_softmax_row);
}

// One row's probabilities into out: float32 ones through the SIMD softmax
// (bf16 / fp16 rows widened into out first), float64 ones through row_softmax.
template <typename scalar_t, typename prob_t>
bool row_probabilities(const scalar_t* x, int64_t n, double inv_temperature, bool is_logprob, SoftmaxRow simd,
                       prob_t* out) {
  if (is_logprob) return row_exp(x, n, out);
  if constexpr (std::is_same_v<prob_t, float>) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return simd(x, n, static_cast<float>(inv_temperature), out);
    } else {
      at::vec::convert(x, out, n);
      return simd(out, n, static_cast<float>(inv_temperature), out);
    }
  } else {
    return row_softmax(x, n, inv_temperature, out);
  }
}

// One row's probabilities sorted by decreasing value, and the column each came from.
template <typename prob_t>
struct SortedRow {
  std::vector<prob_t> value;
  std::vector<int32_t> column;
};

// float64 rows: std::sort of the columns by value.
inline void sort_descending(const double* p, int64_t n, SortedRow<double>& row) {
  row.column.resize(n);
  std::iota(row.column.begin(), row.column.end(), 0);
  std::sort(row.column.begin(), row.column.end(),
            [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  row.value.resize(n);
  for (int64_t k = 0; k < n; ++k) row.value[k] = p[row.column[k]];
}

// coef[column] = g(value) (see the header) for the sorted row `self` against
// the sorted row `other`, run by run.
template <typename prob_t>
void sign_coefficients(const SortedRow<prob_t>& self, const SortedRow<prob_t>& other, prob_t* coef) {
  const int64_t n_self = static_cast<int64_t>(self.value.size());
  const int64_t n_other = static_cast<int64_t>(other.value.size());
  const prob_t* a = self.value.data();
  const prob_t* b = other.value.data();
  int64_t other_gt = 0, other_ge = 0;  // #{other > v}, #{other ≥ v}
  for (int64_t start = 0; start < n_self;) {
    const prob_t v = a[start];
    int64_t end = start + 1;
    while (end < n_self && a[end] == v) ++end;
    while (other_gt < n_other && b[other_gt] > v) ++other_gt;
    other_ge = std::max(other_ge, other_gt);
    while (other_ge < n_other && b[other_ge] >= v) ++other_ge;
    const int64_t run = end - start;
    const int64_t below = std::clamp<int64_t>(end - other_ge, 0, run);
    const int64_t above = std::clamp<int64_t>(other_gt - start, 0, run);
    const prob_t g = static_cast<prob_t>(static_cast<double>(below - above) / static_cast<double>(run));
    for (int64_t r = start; r < end; ++r) coef[self.column[r]] = g;
    start = end;
  }
}

// grad[j] = scale · p_j (g_j − Σ_k p_k g_k) through a softmax (centred), or
// scale · p_j g_j through exp alone (a log-probability row), in the output dtype.
template <typename scalar_t, typename prob_t>
void probability_backward(const prob_t* p, const prob_t* coef, int64_t n, double scale, bool centred,
                          scalar_t* grad) {
  double mean = 0;
  if (centred) {
    for (int64_t j = 0; j < n; ++j) mean += static_cast<double>(p[j]) * static_cast<double>(coef[j]);
  }
  for (int64_t j = 0; j < n; ++j) {
    grad[j] = static_cast<scalar_t>(scale * static_cast<double>(p[j]) * (static_cast<double>(coef[j]) - mean));
  }
}

template <typename scalar_t>
void uld_rows(const at::Tensor& student, const at::Tensor& teacher, const bool* row_mask, double inv_ts,
              double inv_tt, double grad_scale, bool student_is_logprob, bool teacher_is_logprob,
              at::Tensor& row_loss, at::Tensor* grad_s, at::Tensor* grad_t) {
  using prob_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using loss_t = prob_t;
  const int64_t rows = student.size(0), vs = student.size(1), vt = teacher.size(1);
  const int64_t width = std::max(vs, vt);
  const scalar_t* s_base = student.data_ptr<scalar_t>();
  const scalar_t* t_base = teacher.data_ptr<scalar_t>();
  const int64_t s_stride = student.stride(0), t_stride = teacher.stride(0);
  loss_t* loss = row_loss.data_ptr<loss_t>();
  scalar_t* gs = grad_s != nullptr ? grad_s->data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t != nullptr ? grad_t->data_ptr<scalar_t>() : nullptr;
  const prob_t nan = std::numeric_limits<prob_t>::quiet_NaN();
  const SoftmaxRow softmax_row = simd_softmax_row();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<prob_t> p(vs), q(vt), coef_p(vs), coef_q(vt);
    SortedRow<prob_t> sorted_p, sorted_q;   // float64 rows
    uld_buckets::Side side_p, side_q;        // float32 rows
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* gs_row = gs != nullptr ? gs + i * vs : nullptr;
      scalar_t* gt_row = gt != nullptr ? gt + i * vt : nullptr;
      if (row_mask != nullptr && !row_mask[i]) {
        loss[i] = 0;
        if (gs_row != nullptr) std::fill(gs_row, gs_row + vs, scalar_t(0));
        if (gt_row != nullptr) std::fill(gt_row, gt_row + vt, scalar_t(0));
        continue;
      }
      const bool finite_p =
          row_probabilities(s_base + i * s_stride, vs, inv_ts, student_is_logprob, softmax_row, p.data());
      const bool finite_q =
          row_probabilities(t_base + i * t_stride, vt, inv_tt, teacher_is_logprob, softmax_row, q.data());
      if (!finite_p || !finite_q) {
        loss[i] = nan;
        if (gs_row != nullptr) std::fill(gs_row, gs_row + vs, static_cast<scalar_t>(nan));
        if (gt_row != nullptr) std::fill(gt_row, gt_row + vt, static_cast<scalar_t>(nan));
        continue;
      }
      if constexpr (std::is_same_v<prob_t, float>) {
        loss[i] = static_cast<loss_t>(uld_buckets::sorted_l1(p.data(), vs, q.data(), vt, side_p, side_q,
                                                             gs_row != nullptr ? coef_p.data() : nullptr,
                                                             gt_row != nullptr ? coef_q.data() : nullptr));
      } else {
        sort_descending(p.data(), vs, sorted_p);
        sort_descending(q.data(), vt, sorted_q);
        double total = 0;
        for (int64_t k = 0; k < width; ++k) {
          const double a = k < vs ? static_cast<double>(sorted_p.value[k]) : 0.0;
          const double b = k < vt ? static_cast<double>(sorted_q.value[k]) : 0.0;
          total += std::abs(a - b);
        }
        loss[i] = static_cast<loss_t>(total);
        if (gs_row != nullptr) sign_coefficients(sorted_p, sorted_q, coef_p.data());
        if (gt_row != nullptr) sign_coefficients(sorted_q, sorted_p, coef_q.data());
      }
      if (gs_row != nullptr) {
        probability_backward(p.data(), coef_p.data(), vs, grad_scale * inv_ts, !student_is_logprob, gs_row);
      }
      if (gt_row != nullptr) {
        probability_backward(q.data(), coef_q.data(), vt, grad_scale * inv_tt, !teacher_is_logprob, gt_row);
      }
    }
  });
}

// Returns (row_loss [N] fp32 (fp64 for fp64 input), student_grad [N, V_s] or
// [0, 0], teacher_grad [N, V_t] or [0, 0]); the gradients are grad_scale ·
// d(row loss)/d(logits) in the input dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> uld_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& row_mask,
    double inv_student_temperature, double inv_teacher_temperature, double grad_scale, bool student_grad,
    bool teacher_grad, bool student_is_logprob, bool teacher_is_logprob) {
  uld::check_args(student, teacher, row_mask, inv_student_temperature, inv_teacher_temperature, grad_scale,
                  student_is_logprob, teacher_is_logprob, at::kCPU);
  uld::UldCall call(student, teacher, row_mask, student_grad, teacher_grad, accumulation_type(student));
  if (call.rows() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, call.student.scalar_type(), "uld_forward", [&] {
      uld_rows<scalar_t>(call.student, call.teacher, call.mask_ptr(), inv_student_temperature,
                         inv_teacher_temperature, grad_scale, student_is_logprob, teacher_is_logprob, call.row_loss,
                         student_grad ? &call.student_grad : nullptr,
                         teacher_grad ? &call.teacher_grad : nullptr);
    });
  }
  return call.outputs();
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("uld_forward", &fastkd::cpu::uld_forward_cpu); }
