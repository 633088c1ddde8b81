// Host-side body of fastkd::topk_divergence_forward shared by the CPU and CUDA
// ops (csrc/cpu/topk.cpp, csrc/cuda/topk.cu): argument checks, outputs, and
// the raw-pointer arguments for the kernel. The teacher ids' range and
// distinctness are checked by each op: on the host before the kernel runs on
// the CPU, by the kernel itself on CUDA (a row with a bad id comes out NaN,
// with no device → host synchronisation).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "divergence_op.h"
#include "topk_args.h"

namespace fastkd {

// The op's outputs (see the schema in csrc/fastkd.cpp) and the kernel's view
// of them; `index` and `value` keep the teacher's contiguous copies alive
// while the kernel runs.
struct TopKCall : RowLossTensors {
  at::Tensor index, value;
  TopKDivergenceArgs args;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {row_loss, student_grad, row_ce};
  }
};

// Checks the arguments for tensors on `device` and allocates the outputs: the
// row losses with at::empty, the gradient with `empty_gradient(sizes,
// options)` (the CPU op passes its caching allocator).
template <class EmptyGradient>
TopKCall prepare_topk(const at::Tensor& student, const at::Tensor& teacher_index,
                      const at::Tensor& teacher_value, const std::optional<at::Tensor>& row_mask,
                      int64_t kind, double inv_temperature, double coef, double grad_scale,
                      bool student_grad, const std::optional<at::Tensor>& labels,
                      double hard_grad_scale, c10::DeviceType device, EmptyGradient empty_gradient) {
  CHECK_DEVICE_TYPE(student, device);
  CHECK_DIM(student, 2);
  CHECK_DIM(teacher_index, 2);
  CHECK_DIM(teacher_value, 2);
  CHECK_SAME_DEVICE(student, teacher_index);
  CHECK_SAME_DEVICE(student, teacher_value);
  CHECK_UNIT_LAST_STRIDE(student);
  const int64_t vocab = student.size(1);
  TORCH_CHECK(vocab > 0, "student must have at least one column (vocabulary entry)");
  // Any row stride (0 for an expanded row): the student is only read.
  TORCH_CHECK(teacher_index.scalar_type() == at::kLong, "teacher_index must be int64");
  TORCH_CHECK(teacher_index.sizes() == teacher_value.sizes(), "teacher_index ",
              teacher_index.sizes(), " and teacher_value ", teacher_value.sizes(),
              " must have the same shape");
  TORCH_CHECK(teacher_index.size(0) == student.size(0), "teacher_index must have one row per student row");
  const int64_t k = teacher_index.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "k (teacher ids per row) must be in [1, ", vocab, "], got ", k);
  const DType dtype = divergence_dtype(student.scalar_type());
  const at::ScalarType accumulate = dtype == DType::Float64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(teacher_value.scalar_type() == accumulate, "teacher_value must be ", accumulate,
              " for ", student.scalar_type(), " student logits, got ", teacher_value.scalar_type());
  TORCH_CHECK(kind == 0 || (kind >= 2 && kind <= 5),
              "kind must be KL (0), JSD (2), skew KL (3), skew reverse KL (4) or TVD (5) for a top-k "
              "teacher (reverse KL is infinite off the teacher's ids), got ", kind);
  check_divergence_options(kind, inv_temperature, coef, grad_scale);
  check_hard_label_args(student, labels, hard_grad_scale);

  TopKCall call;
  TopKDivergenceArgs& a = call.args;
  prepare_row_loss_call(a, call, student, dtype, checked_row_mask(student, row_mask), kind,
                        inv_temperature, coef, grad_scale, student_grad, labels, hard_grad_scale,
                        empty_gradient);
  call.index = teacher_index.contiguous();
  call.value = teacher_value.contiguous();
  a.index = call.index.data_ptr<int64_t>();
  a.value = call.value.data_ptr();
  a.k = k;
  return call;
}

}  // namespace fastkd
