// CPU implementation of fastkd::dkd_forward: decoupled knowledge distillation
// (docs/spec.md §1, mdistiller dkd_loss), one row at a time, loss and student gradient
// in the same call.
//
// Per row, with a = s/T, b = t/T, target y, and the non-target log-sum-exps
// L_o = log Σ_{j≠y} e^{a_j} (teacher: M_o), L = logaddexp(a_y, L_o) (M):
//   TCKD = KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y]),
//          log q_y = a_y − L, log(1 − q_y) = L_o − L (log space: exact when q_y ≈ 1)
//   NCKD = KL(p' ‖ q'), p' = softmax(b − 1000·onehot(y)), q' = softmax(a − 1000·onehot(y))
//          (mdistiller's offset), L' = logaddexp(a_y − 1000, L_o);
//          the offset cancels in log p'_j − log q'_j = (b_j − M') − (a_j − L').
//   row_loss = α·TCKD + β·NCKD
// Gradient w.r.t. a (then × grad_scale / T):
//   dTCKD/da_y = q_y − p_y;  dTCKD/da_j = q_j − (1 − p_y)·q̂_j  (j ≠ y, q̂ = softmax over j ≠ y)
//   dNCKD/da_j = q'_j − p'_j
// Three passes over the row (max, sums, loss + gradient); everything is
// accumulated in double (inputs are float32 / float64 / bfloat16 / float16,
// rows of classification-sized C), rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common/dkd_op.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr double kTargetOffset = 1000.0;  // mdistiller: logits − 1000·onehot(y)
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double log_add_exp(double x, double y) {
  if (x == kNegInf) return y;
  if (y == kNegInf) return x;
  const double m = x > y ? x : y;
  return m + std::log1p(std::exp(-std::fabs(x - y)));
}

// p · (log p − log q) with 0 · anything = 0.
double xlogratio(double log_p, double log_q) {
  const double p = std::exp(log_p);
  return p == 0.0 ? 0.0 : p * (log_p - log_q);
}

// log Σ_{j≠y} e^{x_j · inv_t}, from the row's max over j ≠ y.
template <class T>
double non_target_lse(const T* x, int64_t classes, int64_t y, double inv_t) {
  double m = kNegInf;
  for (int64_t j = 0; j < classes; ++j) {
    const double v = static_cast<double>(x[j]) * inv_t;
    if (j != y && (v > m || std::isnan(v))) m = v;
  }
  if (m == kNegInf || std::isnan(m)) return m;
  double sum = 0.0;
  for (int64_t j = 0; j < classes; ++j) {
    if (j != y) sum += std::exp(static_cast<double>(x[j]) * inv_t - m);
  }
  return m + std::log(sum);
}

template <class T>
void dkd_rows(const T* student, const T* teacher, const int64_t* labels, int64_t rows,
              int64_t classes, double alpha, double beta, double inv_t, double grad_scale,
              void* row_loss_out, bool loss_is_double, T* grad) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(classes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* s = student + i * classes;
      const T* t = teacher + i * classes;
      const int64_t y = labels[i];
      const double a_y = static_cast<double>(s[y]) * inv_t;
      const double b_y = static_cast<double>(t[y]) * inv_t;
      const double ls_o = non_target_lse(s, classes, y, inv_t);
      const double lt_o = non_target_lse(t, classes, y, inv_t);
      const double ls = log_add_exp(a_y, ls_o), lt = log_add_exp(b_y, lt_o);
      const double ls_n = log_add_exp(a_y - kTargetOffset, ls_o);
      const double lt_n = log_add_exp(b_y - kTargetOffset, lt_o);

      const double tckd = xlogratio(b_y - lt, a_y - ls) + xlogratio(lt_o - lt, ls_o - ls);
      const double p_y = std::exp(b_y - lt), p_o = std::exp(lt_o - lt);
      double nckd = 0.0;
      const double g = grad_scale * inv_t;
      for (int64_t j = 0; j < classes; ++j) {
        const double offset = j == y ? kTargetOffset : 0.0;
        const double a = static_cast<double>(s[j]) * inv_t;
        const double log_p_n = static_cast<double>(t[j]) * inv_t - offset - lt_n;
        const double log_q_n = a - offset - ls_n;
        const double p_n = std::exp(log_p_n);
        nckd += p_n == 0.0 ? 0.0 : p_n * (log_p_n - log_q_n);
        if (grad != nullptr) {
          const double d_tckd =
              j == y ? std::exp(a - ls) - p_y : std::exp(a - ls) - p_o * std::exp(a - ls_o);
          const double d_nckd = std::exp(log_q_n) - p_n;
          grad[i * classes + j] = static_cast<T>(g * (alpha * d_tckd + beta * d_nckd));
        }
      }
      const double loss = alpha * tckd + beta * nckd;
      if (loss_is_double) {
        static_cast<double*>(row_loss_out)[i] = loss;
      } else {
        static_cast<float*>(row_loss_out)[i] = static_cast<float>(loss);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dkd_forward_cpu(const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const at::Tensor& labels, double alpha,
                                                   double beta, double inv_temperature,
                                                   double grad_scale, bool student_grad) {
  check_dkd_args(student, teacher, labels, alpha, beta, inv_temperature, grad_scale, at::kCPU);

  const int64_t rows = student.size(0), classes = student.size(1);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const at::Tensor y = labels.contiguous();
  const int64_t* y_ptr = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(y_ptr[i] >= 0 && y_ptr[i] < classes, "labels must lie in [0, ", classes,
                "), got ", y_ptr[i], " at row ", i);
  }
  const bool loss_is_double = s.scalar_type() == at::kDouble;
  at::Tensor row_loss = at::empty({rows}, s.options().dtype(loss_is_double ? at::kDouble : at::kFloat));
  at::Tensor grad = at::empty({student_grad ? rows : 0, student_grad ? classes : 0}, s.options());
  if (rows == 0) return {row_loss, grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "dkd_forward", [&] {
    dkd_rows<scalar_t>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), y_ptr, rows, classes, alpha,
                       beta, inv_temperature, grad_scale, row_loss.data_ptr(), loss_is_double,
                       student_grad ? grad.data_ptr<scalar_t>() : nullptr);
  });
  return {row_loss, grad};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dkd_forward", &fastkd::cpu::dkd_forward_cpu); }
