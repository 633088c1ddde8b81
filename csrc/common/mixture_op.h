// Host-side body of fastkd::mixture_divergence_forward shared by the CPU and
// CUDA ops (csrc/cpu/mixture.cpp, csrc/cuda/mixture.cu): argument checks,
// the teacher weights, outputs, and the raw-pointer arguments for the kernel.
// Each op sets `args.log_weights` in its own memory (host or device).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "divergence_op.h"
#include "mixture_args.h"

namespace fastkd {

// How far the teacher weights' sum may be from 1 (docs/spec.md §6; as
// fastkd/mixture.py): loose enough for float32 weights from a softmax.
constexpr double kWeightSumTolerance = 1e-6;

// The op's outputs (see the schema in csrc/fastkd.cpp) and the kernel's view
// of them. With `weights_on_host` (teacher_weights on the CPU), `weights`
// holds the checked teacher weights w_k and `weight_sum` their sum; weights
// on the GPU are never read on the host (that would synchronise with the
// device): the CUDA op guards them on the device (csrc/cuda/mixture.cu).
struct MixtureCall : RowLossTensors {
  bool weights_on_host = true;
  std::vector<double> weights;
  double weight_sum = 0.0;
  MixtureDivergenceArgs args;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {row_loss, student_grad, row_ce};
  }
};

// Checks the arguments for tensors on `device` (teacher_weights on the host,
// where their values are checked, or on the student's device, where only
// their shape and dtype are) and allocates the outputs: the
// row losses with at::empty, the gradient with `empty_gradient(sizes,
// options)` (the CPU op passes its caching allocator).
template <class EmptyGradient>
MixtureCall prepare_mixture(const at::Tensor& student, const at::Tensor& teachers,
                            const at::Tensor& teacher_weights,
                            const std::optional<at::Tensor>& row_mask, int64_t kind,
                            double inv_temperature, double coef, double grad_scale,
                            bool student_grad, const std::optional<at::Tensor>& labels,
                            double hard_grad_scale, c10::DeviceType device,
                            EmptyGradient empty_gradient) {
  CHECK_DEVICE_TYPE(student, device);
  CHECK_DIM(student, 2);
  CHECK_DIM(teachers, 3);
  CHECK_DIM(teacher_weights, 1);
  CHECK_SAME_DEVICE(student, teachers);
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
  check_divergence_kind(kind);
  check_divergence_options(kind, inv_temperature, coef, grad_scale);
  check_hard_label_args(student, labels, hard_grad_scale);
  const DType dtype = divergence_dtype(student.scalar_type());

  MixtureCall call;
  call.weights_on_host = teacher_weights.device().is_cpu();
  if (call.weights_on_host) {
    const at::Tensor weights = teacher_weights.contiguous();
    call.weights.assign(weights.data_ptr<double>(), weights.data_ptr<double>() + count);
    for (const double w : call.weights) {
      TORCH_CHECK(std::isfinite(w) && w >= 0, "teacher_weights must be finite and >= 0, got ", w);
      call.weight_sum += w;
    }
    TORCH_CHECK(std::abs(call.weight_sum - 1.0) <= kWeightSumTolerance,
                "teacher_weights must sum to 1, got ", call.weight_sum);
  } else {
    TORCH_CHECK(teacher_weights.device() == student.device(), "teacher_weights is on ",
                teacher_weights.device(), ": it must be on the CPU or on student's device (",
                student.device(), ")");
  }

  MixtureDivergenceArgs& a = call.args;
  prepare_row_loss_call(a, call, student, dtype, checked_row_mask(student, row_mask), kind,
                        inv_temperature, coef, grad_scale, student_grad, labels, hard_grad_scale,
                        empty_gradient);
  a.teacher = teachers.data_ptr();
  a.teacher_stride = teachers.stride(0);
  a.teacher_row_stride = teachers.stride(1);
  a.log_weights = nullptr;
  a.teachers = count;
  return call;
}

}  // namespace fastkd
