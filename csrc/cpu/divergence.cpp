// CPU implementation of fastkd::divergence_forward: checks the tensors, then
// hands raw pointers to the SIMD variant chosen for this CPU.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../common/divergence_op.h"
#include "allocation.h"
#include "divergence_dispatch.h"
#include "divergence_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature,
    double coef, double grad_scale, bool student_grad, bool teacher_grad,
    const std::optional<at::Tensor>& labels, double hard_grad_scale) {
  CHECK_DEVICE_TYPE(student, at::kCPU);
  CHECK_DEVICE_TYPE(teacher, at::kCPU);
  const DivergenceCall call =
      prepare_divergence(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale,
                         student_grad, teacher_grad, labels, hard_grad_scale, &empty_for_output);
  return run_divergence_kernel(call, &AVX512::divergence_kernel, &AVX2::divergence_kernel,
                               &DEFAULT::divergence_kernel);
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("divergence_forward", &fastkd::cpu::divergence_forward_cpu);
}
