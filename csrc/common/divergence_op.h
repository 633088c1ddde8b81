// Host-side body of fastkd::divergence_forward shared by the CPU and CUDA ops:
// argument checks, outputs, and the raw-pointer arguments for the kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"
#include "divergence_args.h"

namespace fastkd {

// The outputs and kept inputs every divergence-family op call shares (see the
// schemas in csrc/fastkd.cpp): the row losses, the student's gradient and the
// cross-entropy rows, with the contiguous row mask and labels the kernel
// reads, kept alive while it runs.
struct RowLossTensors {
  at::Tensor row_loss, student_grad, row_ce, mask, labels;
};

// Allocates `out`'s outputs for the checked `student` [rows, vocab] (row
// losses in the accumulation dtype with at::empty, the gradient with
// `empty_gradient(sizes, options)`, the CPU op passing its caching allocator)
// and fills the fields of `a` that DivergenceArgs, TopKDivergenceArgs and
// MixtureDivergenceArgs share. `mask`: the checked row mask, contiguous, or
// undefined.
template <class Args, class EmptyGradient>
void prepare_row_loss_call(Args& a, RowLossTensors& out, const at::Tensor& student, DType dtype,
                           at::Tensor mask, int64_t kind, double inv_temperature, double coef,
                           double grad_scale, bool student_grad,
                           const std::optional<at::Tensor>& labels, double hard_grad_scale,
                           EmptyGradient empty_gradient) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto loss_options =
      student.options().dtype(dtype == DType::Float64 ? at::kDouble : at::kFloat);
  out.row_loss = at::empty({rows}, loss_options);
  out.row_ce = at::empty({labels.has_value() ? rows : 0}, loss_options);
  out.student_grad = empty_gradient(
      at::IntArrayRef{student_grad ? rows : 0, student_grad ? vocab : 0}, student.options());
  out.mask = std::move(mask);
  if (labels.has_value()) out.labels = labels->contiguous();

  a.student = student.data_ptr();
  a.student_row_stride = student.stride(0);
  a.row_mask = out.mask.defined() ? out.mask.data_ptr<bool>() : nullptr;
  a.row_loss = out.row_loss.data_ptr();
  a.student_grad = student_grad ? out.student_grad.data_ptr() : nullptr;
  a.rows = rows;
  a.vocab = vocab;
  a.dtype = dtype;
  a.kind = static_cast<int>(kind);
  a.inv_temperature = inv_temperature;
  a.coef = coef;
  a.grad_scale = grad_scale;
  a.labels = out.labels.defined() ? out.labels.data_ptr<int64_t>() : nullptr;
  a.row_ce = out.labels.defined() ? out.row_ce.data_ptr() : nullptr;
  a.hard_grad_scale = hard_grad_scale;
}

// The op's outputs (see the schema in csrc/fastkd.cpp) and the kernel's view of
// them.
struct DivergenceCall : RowLossTensors {
  at::Tensor teacher_grad;
  DivergenceArgs args;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {row_loss, student_grad, teacher_grad, row_ce};
  }
};

inline DType divergence_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: break;
  }
  TORCH_CHECK(false, "fastkd::divergence_forward: student must be float32, float64, "
                     "bfloat16 or float16, got ", t);
}

// The plain allocation of the gradients (the CUDA ops' `empty_gradient`).
inline at::Tensor empty_gradient_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// A [blocks, rows_per_block, vocab] tensor as the [rows, vocab] shape of its
// rows, for the checks and the output sizes: a zero-stride view of its first
// element (never read through; data_ptr, device and dtype are the tensor's).
// Other tensors unchanged.
inline at::Tensor as_row_shape(const at::Tensor& x) {
  if (x.dim() != 3) return x;
  return x.as_strided({x.size(0) * x.size(1), x.size(2)}, {0, x.stride(2)});
}

// Checks the arguments and allocates the outputs: the row losses with
// at::empty, the gradients with `empty_gradient(sizes, options)` (the CPU op
// passes its caching allocator).
template <class EmptyGradient>
DivergenceCall prepare_divergence(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& row_mask, int64_t kind,
                                  double inv_temperature, double coef, double grad_scale,
                                  bool student_grad, bool teacher_grad,
                                  const std::optional<at::Tensor>& labels, double hard_grad_scale,
                                  EmptyGradient empty_gradient) {
  // [blocks, rows_per_block, vocab] logits (a strided view, see
  // logit_row_offset) are checked and sized as the [rows, vocab] rows they hold
  TORCH_CHECK(student.dim() != 3 || student.sizes() == teacher.sizes(), "student ", student.sizes(),
              " and teacher ", teacher.sizes(), " must have the same shape");
  const at::Tensor student_rows = as_row_shape(student), teacher_rows = as_row_shape(teacher);
  check_divergence_args(student_rows, teacher_rows, row_mask, kind, inv_temperature, coef, grad_scale,
                        labels, hard_grad_scale);
  const int64_t rows = student_rows.size(0), vocab = student_rows.size(1);
  const DType dtype = divergence_dtype(student.scalar_type());
  DivergenceCall call;
  DivergenceArgs& a = call.args;
  prepare_row_loss_call(a, call, student_rows, dtype, row_mask.has_value() ? row_mask->contiguous() : at::Tensor(),
                        kind, inv_temperature, coef, grad_scale, student_grad, labels,
                        hard_grad_scale, empty_gradient);
  call.teacher_grad = empty_gradient(at::IntArrayRef{teacher_grad ? rows : 0, teacher_grad ? vocab : 0},
                                     teacher.options());
  a.teacher = teacher.data_ptr();
  const bool blocked = student.dim() == 3;
  a.student_row_stride = student.stride(blocked ? 1 : 0);
  a.teacher_row_stride = teacher.stride(blocked ? 1 : 0);
  a.rows_per_block = blocked ? std::max<int64_t>(student.size(1), 1) : std::max<int64_t>(rows, 1);
  a.student_block_stride = blocked ? student.stride(0) : 0;
  a.teacher_block_stride = blocked ? teacher.stride(0) : 0;
  a.teacher_grad = teacher_grad ? call.teacher_grad.data_ptr() : nullptr;
  return call;
}

}  // namespace fastkd
