// CPU implementation of fastkd::hidden_state_forward (docs/spec.md §5.4):
// TinyBERT's MSE and DistilBERT's cosine loss per row of already projected
// student states h [N, D] against teacher states g [N, D], the row losses and
// the gradients in one call. This file checks the arguments and allocates
// the outputs; the row passes are csrc/cpu/hidden_state_kernel.cpp, in the
// variant for this CPU's capability.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/hidden_state_op.h"
#include "allocation.h"
#include "capability.h"
#include "hidden_state_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

template <class S, class A>
void run_rows(const HiddenStateRowsArgs<S, A>& args) {
  using Rows = void (*)(const HiddenStateRowsArgs<S, A>&);
  pick_variant<Rows>(&AVX512::hidden_state_rows, &AVX2::hidden_state_rows, &DEFAULT::hidden_state_rows)(args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hidden_state_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& row_mask,
    int64_t kind, double grad_scale, bool student_grad, bool teacher_grad) {
  hidden_state::check_args(student, teacher, row_mask, kind, grad_scale, at::kCPU);
  const int64_t rows = student.size(0), dim = student.size(1);
  const at::Tensor mask = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(accumulation_type(student)));
  at::Tensor grad_s = student_grad ? empty_for_output({rows, dim}, student.options())
                                   : at::empty({0, 0}, student.options());
  at::Tensor grad_t = teacher_grad ? empty_for_output({rows, dim}, teacher.options())
                                   : at::empty({0, 0}, teacher.options());
  if (rows == 0) return {row_loss, grad_s, grad_t};
  const bool cosine = kind == static_cast<int64_t>(hidden_state::HiddenStateKind::kCosine);
  const auto dtype = student.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "hidden_state_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HiddenStateRowsArgs<scalar_t, acc_t> args{
        student.const_data_ptr<scalar_t>(),
        student.stride(0),
        teacher.const_data_ptr<scalar_t>(),
        teacher.stride(0),
        mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
        rows,
        dim,
        cosine,
        grad_scale,
        row_loss.mutable_data_ptr<acc_t>(),
        student_grad ? grad_s.mutable_data_ptr<scalar_t>() : nullptr,
        teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr};
    run_rows(args);
  });
  return {row_loss, grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("hidden_state_forward", &fastkd::cpu::hidden_state_forward_cpu);
}
