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
#include "../common/mixture_op.h"
#include "allocation.h"
#include "divergence_dispatch.h"
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
  TORCH_CHECK(teacher_weights.device().is_cpu(), "teacher_weights must be on the CPU");
  MixtureCall call = prepare_mixture(student, teachers, teacher_weights, row_mask, kind,
                                     inv_temperature, coef, grad_scale, student_grad, labels,
                                     hard_grad_scale, at::kCPU, &empty_for_output);
  MixtureDivergenceArgs& a = call.args;
  std::vector<double> log_weights(call.weights.size());
  for (size_t k = 0; k < log_weights.size(); ++k) {
    const double w = call.weights[k];
    log_weights[k] = w > 0 ? std::log(w) : -std::numeric_limits<double>::infinity();
  }
  a.log_weights = log_weights.data();
  return run_divergence_kernel(call, &AVX512::mixture_divergence_kernel,
                               &AVX2::mixture_divergence_kernel, &DEFAULT::mixture_divergence_kernel);
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("mixture_divergence_forward", &fastkd::cpu::mixture_divergence_forward_cpu);
}
