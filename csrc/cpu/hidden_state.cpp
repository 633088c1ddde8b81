// CPU implementation of fastkd::hidden_state_forward (docs/spec.md §5.4):
// TinyBERT's MSE and DistilBERT's cosine loss per row of already projected
// student states h [N, D] against teacher states g [N, D], the row losses and
// the gradients in one call (formulas: csrc/common/hidden_state_op.h).
//
// One task per chunk of rows (at::parallel_for; each row's sums come from one
// thread, so the result does not depend on the thread count). MSE: one pass
// per row, the squared differences summed and the gradients written in it.
// Cosine: a first pass sums h·g, h·h and g·g, a second writes the gradients
// from the row just read (in L1 / L2 for hidden-state widths). The sums use
// eight independent partial sums, so the compiler vectorises them without
// reassociating. bfloat16 / float16 / float32 accumulate in float32, float64
// in float64. Excluded rows (row_mask false) get loss 0 and zero gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../common/hidden_state_op.h"
#include "allocation.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr int kLanes = 8;

template <typename scalar_t>
struct RowsView {
  const scalar_t* student;
  int64_t student_stride;
  const scalar_t* teacher;
  int64_t teacher_stride;
  const bool* row_mask;  // nullptr: every row kept
  int64_t rows, dim;
};

template <typename scalar_t, typename acc_t>
acc_t lane_total(const acc_t (&part)[kLanes], acc_t tail) {
  acc_t total = tail;
  for (int j = 0; j < kLanes; ++j) total += part[j];
  return total;
}

// ℓ = (1/D) Σ (h − g)², and dℓ/dh · grad_scale (and its negation for g).
template <typename scalar_t, typename acc_t>
acc_t mse_row(const scalar_t* h, const scalar_t* g, int64_t dim, acc_t grad_coef, scalar_t* grad_h,
              scalar_t* grad_g) {
  acc_t part[kLanes] = {};
  acc_t tail = 0;
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t diff = static_cast<acc_t>(h[d + j]) - static_cast<acc_t>(g[d + j]);
      part[j] += diff * diff;
    }
  }
  for (; d < dim; ++d) {
    const acc_t diff = static_cast<acc_t>(h[d]) - static_cast<acc_t>(g[d]);
    tail += diff * diff;
  }
  if (grad_h != nullptr || grad_g != nullptr) {
    for (int64_t k = 0; k < dim; ++k) {
      const acc_t step = grad_coef * (static_cast<acc_t>(h[k]) - static_cast<acc_t>(g[k]));
      if (grad_h != nullptr) grad_h[k] = static_cast<scalar_t>(step);
      if (grad_g != nullptr) grad_g[k] = static_cast<scalar_t>(-step);
    }
  }
  return lane_total<scalar_t>(part, tail) / static_cast<acc_t>(dim);
}

// ℓ = 1 − h·g / √((h·h + ε)(g·g + ε)) and its gradients · grad_scale.
template <typename scalar_t, typename acc_t>
acc_t cosine_row(const scalar_t* h, const scalar_t* g, int64_t dim, acc_t grad_scale, scalar_t* grad_h,
                 scalar_t* grad_g) {
  acc_t dot_part[kLanes] = {}, hh_part[kLanes] = {}, gg_part[kLanes] = {};
  acc_t dot_tail = 0, hh_tail = 0, gg_tail = 0;
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t x = static_cast<acc_t>(h[d + j]), y = static_cast<acc_t>(g[d + j]);
      dot_part[j] += x * y;
      hh_part[j] += x * x;
      gg_part[j] += y * y;
    }
  }
  for (; d < dim; ++d) {
    const acc_t x = static_cast<acc_t>(h[d]), y = static_cast<acc_t>(g[d]);
    dot_tail += x * y;
    hh_tail += x * x;
    gg_tail += y * y;
  }
  const acc_t eps = static_cast<acc_t>(hidden_state::kCosineEps);
  const acc_t dot = lane_total<scalar_t>(dot_part, dot_tail);
  const acc_t norm_h = lane_total<scalar_t>(hh_part, hh_tail) + eps;
  const acc_t norm_g = lane_total<scalar_t>(gg_part, gg_tail) + eps;
  // as the reference: the square root of the product of the guarded norms
  const acc_t denom = std::sqrt(norm_h * norm_g);
  const acc_t cosine = dot / denom;
  if (grad_h != nullptr || grad_g != nullptr) {
    const acc_t cross = grad_scale / denom;
    const acc_t self_h = grad_scale * cosine / norm_h, self_g = grad_scale * cosine / norm_g;
    for (int64_t k = 0; k < dim; ++k) {
      const acc_t x = static_cast<acc_t>(h[k]), y = static_cast<acc_t>(g[k]);
      if (grad_h != nullptr) grad_h[k] = static_cast<scalar_t>(self_h * x - cross * y);
      if (grad_g != nullptr) grad_g[k] = static_cast<scalar_t>(self_g * y - cross * x);
    }
  }
  return acc_t(1) - cosine;
}

template <typename scalar_t>
void hidden_state_rows(const RowsView<scalar_t>& v, bool cosine, double grad_scale,
                       at::opmath_type<scalar_t>* row_loss, scalar_t* grad_h, scalar_t* grad_g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = v.dim;
  const acc_t scale = static_cast<acc_t>(grad_scale);
  const acc_t mse_coef = static_cast<acc_t>(2.0 * grad_scale / static_cast<double>(dim));
  const int64_t grain = std::max<int64_t>(1, 16384 / dim);
  at::parallel_for(0, v.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* gh = grad_h != nullptr ? grad_h + i * dim : nullptr;
      scalar_t* gg = grad_g != nullptr ? grad_g + i * dim : nullptr;
      if (v.row_mask != nullptr && !v.row_mask[i]) {
        row_loss[i] = 0;
        if (gh != nullptr) std::fill(gh, gh + dim, scalar_t(0));
        if (gg != nullptr) std::fill(gg, gg + dim, scalar_t(0));
        continue;
      }
      const scalar_t* h = v.student + i * v.student_stride;
      const scalar_t* g = v.teacher + i * v.teacher_stride;
      row_loss[i] = cosine ? cosine_row<scalar_t, acc_t>(h, g, dim, scale, gh, gg)
                           : mse_row<scalar_t, acc_t>(h, g, dim, mse_coef, gh, gg);
    }
  });
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
    const RowsView<scalar_t> view{
        student.const_data_ptr<scalar_t>(), student.stride(0), teacher.const_data_ptr<scalar_t>(),
        teacher.stride(0), mask.defined() ? mask.const_data_ptr<bool>() : nullptr, rows, dim};
    hidden_state_rows<scalar_t>(view, cosine, grad_scale, row_loss.mutable_data_ptr<acc_t>(),
                                student_grad ? grad_s.mutable_data_ptr<scalar_t>() : nullptr,
                                teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {row_loss, grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("hidden_state_forward", &fastkd::cpu::hidden_state_forward_cpu);
}
