// CPU implementation of fastkd::mixture_divergence_forward: checks the
// tensors, allocates the outputs, and hands raw pointers to the SIMD variant
// chosen for this CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/divergence_op.h"
#include "../common/mixture_args.h"
#include "allocation.h"
#include "capability.h"
#include "mixture_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_divergence_forward_cpu(
    const at::Tensor& student, const at::Tensor& teachers, const at::Tensor& teacher_weights,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature, double coef,
    double grad_scale, bool student_grad, const std::optional<at::Tensor>& labels,
    double hard_grad_scale) {
  CHECK_DEVICE_TYPE(student, at::kCPU);
  CHECK_DIM(student, 2);
  CHECK_DIM(teachers, 3);
  CHECK_DIM(teacher_weights, 1);
  CHECK_SAME_DEVICE(student, teachers);
  TORCH_CHECK(teacher_weights.device().is_cpu(), "teacher_weights must be on the CPU");
  const int64_t rows = student.size(0), vocab = student.size(1), count = teachers.size(0);
  TORCH_CHECK(vocab > 0, "student must have at least one column (vocabulary entry)");
  TORCH_CHECK(teachers.size(1) == rows && teachers.size(2) == vocab, "teachers ", teachers.sizes(),
              " must be [K, ", rows, ", ", vocab, "]");
  TORCH_CHECK(count >= 1, "teachers must hold at least one teacher");
  TORCH_CHECK(teacher_weights.size(0) == count, "teacher_weights must have one entry per teacher");
  TORCH_CHECK(teacher_weights.scalar_type() == at::kDouble, "teacher_weights must be float64");
  TORCH_CHECK(student.scalar_type() == teachers.scalar_type(),
              "student and teachers must have the same dtype");
  CHECK_UNIT_LAST_STRIDE(student);
  CHECK_UNIT_LAST_STRIDE(teachers);
  // The student and the teachers are only read, so any outer strides are
  // fine (a permuted stack, one teacher expanded over K or a row expanded
  // over N with stride 0).
  TORCH_CHECK(kind >= 0 && kind < kNumDivergenceKinds, "kind must be in [0, ", kNumDivergenceKinds,
              "), got ", kind);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
  if (kind == 2) {
    TORCH_CHECK(coef > 0 && coef < 1, "coef (beta) must be in (0, 1) for JSD, got ", coef);
  } else if (kind == 3 || kind == 4) {
    TORCH_CHECK(coef > 0 && coef <= 1, "coef (alpha) must be in (0, 1] for skew divergences, got ", coef);
  }
  TORCH_CHECK(std::isfinite(grad_scale), "grad_scale must be finite");
  check_hard_label_args(student, labels, hard_grad_scale);

  const at::Tensor weights = teacher_weights.contiguous();
  std::vector<double> log_weights(count);
  double weight_sum = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    const double w = weights.data_ptr<double>()[k];
    TORCH_CHECK(std::isfinite(w) && w >= 0, "teacher_weights must be finite and >= 0, got ", w);
    weight_sum += w;
    log_weights[k] = w > 0 ? std::log(w) : -std::numeric_limits<double>::infinity();
  }
  TORCH_CHECK(std::abs(weight_sum - 1.0) <= 1e-6, "teacher_weights must sum to 1, got ", weight_sum);

  at::Tensor mask;
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->scalar_type() == at::kBool, "row_mask must be bool");
    TORCH_CHECK(row_mask->dim() == 1 && row_mask->size(0) == rows, "row_mask must be [rows]");
    CHECK_SAME_DEVICE(student, *row_mask);
    mask = row_mask->contiguous();
  }
  const DType dtype = divergence_dtype(student.scalar_type());
  const auto loss_options =
      student.options().dtype(dtype == DType::Float64 ? at::kDouble : at::kFloat);
  at::Tensor row_loss = at::empty({rows}, loss_options);
  at::Tensor grad = empty_for_output(
      at::IntArrayRef{student_grad ? rows : 0, student_grad ? vocab : 0}, student.options());
  at::Tensor row_ce = at::empty({labels.has_value() ? rows : 0}, loss_options);
  if (rows == 0) return {row_loss, grad, row_ce};
  // a contiguous copy kept alive while the kernel runs
  const at::Tensor label_ids = labels.has_value() ? labels->contiguous() : at::Tensor();
  const int64_t* label_ptr = label_ids.defined() ? label_ids.data_ptr<int64_t>() : nullptr;
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  // every kept row's label must be a class id: the kernel indexes the row with it
  check_kept_label_range(label_ptr, mask_ptr, rows, vocab);

  MixtureDivergenceArgs a;
  a.student = student.data_ptr();
  a.student_row_stride = student.stride(0);
  a.teacher = teachers.data_ptr();
  a.teacher_stride = teachers.stride(0);
  a.teacher_row_stride = teachers.stride(1);
  a.log_weights = log_weights.data();
  a.teachers = count;
  a.row_mask = mask_ptr;
  a.row_loss = row_loss.data_ptr();
  a.student_grad = student_grad ? grad.data_ptr() : nullptr;
  a.rows = rows;
  a.vocab = vocab;
  a.dtype = dtype;
  a.kind = static_cast<int>(kind);
  a.inv_temperature = inv_temperature;
  a.coef = coef;
  a.grad_scale = grad_scale;
  a.labels = label_ptr;
  a.row_ce = label_ptr != nullptr ? row_ce.data_ptr() : nullptr;
  a.hard_grad_scale = hard_grad_scale;
  switch (active_capability()) {
    case Capability::AVX512: AVX512::mixture_divergence_kernel(a); break;
    case Capability::AVX2: AVX2::mixture_divergence_kernel(a); break;
    case Capability::Default: DEFAULT::mixture_divergence_kernel(a); break;
  }
  return {row_loss, grad, row_ce};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("mixture_divergence_forward", &fastkd::cpu::mixture_divergence_forward_cpu);
}
