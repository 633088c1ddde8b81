// CPU implementation of fastkd::divergence_forward: checks the tensors, then
// hands raw pointers to the SIMD variant chosen for this CPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "allocation.h"
#include "capability.h"
#include "divergence_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

DType to_dtype(at::ScalarType t) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature,
    double coef, double grad_scale, bool student_grad, bool teacher_grad) {
  check_divergence_args(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale);
  CHECK_DEVICE_TYPE(student, at::kCPU);
  CHECK_DEVICE_TYPE(teacher, at::kCPU);

  const int64_t rows = student.size(0), vocab = student.size(1);
  const at::ScalarType loss_type =
      student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(loss_type));
  at::Tensor grad_s = empty_for_output({student_grad ? rows : 0, student_grad ? vocab : 0},
                                      student.options());
  at::Tensor grad_t = empty_for_output({teacher_grad ? rows : 0, teacher_grad ? vocab : 0},
                                      teacher.options());
  if (rows == 0) return {row_loss, grad_s, grad_t};

  at::Tensor mask;
  if (row_mask.has_value()) mask = row_mask->contiguous();

  DivergenceArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.student_row_stride = student.stride(0);
  args.teacher_row_stride = teacher.stride(0);
  args.row_mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  args.row_loss = row_loss.data_ptr();
  args.student_grad = student_grad ? grad_s.data_ptr() : nullptr;
  args.teacher_grad = teacher_grad ? grad_t.data_ptr() : nullptr;
  args.rows = rows;
  args.vocab = vocab;
  args.dtype = to_dtype(student.scalar_type());
  args.kind = static_cast<int>(kind);
  args.inv_temperature = inv_temperature;
  args.coef = coef;
  args.grad_scale = grad_scale;

  switch (active_capability()) {
    case Capability::AVX512: AVX512::divergence_kernel(args); break;
    case Capability::AVX2: AVX2::divergence_kernel(args); break;
    case Capability::Default: DEFAULT::divergence_kernel(args); break;
  }
  return {row_loss, grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("divergence_forward", &fastkd::cpu::divergence_forward_cpu);
}
