// Shared by the CPU and CUDA implementations of
// fastkd::attention_relation_forward / attention_relation_backward
// (csrc/cpu/attention_relation.cpp, csrc/cuda/attention_relation.cu): the
// argument checks, the forward's statistics and the backward's outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "checks.h"

namespace fastkd {
namespace attention_relation {

// student [B, T, D_s] and teacher [B, T, D_t] of one floating dtype on
// `device`, each width a positive multiple of `heads`; temperature finite and
// > 0; mask [B, T] bool on the student's device, or none. The device-specific
// limits (dtypes, grid sizes) are the caller's.
inline void check_args(const at::Tensor& student, const at::Tensor& teacher, int64_t heads,
                       const std::optional<at::Tensor>& mask, double temperature, c10::DeviceType device) {
  CHECK_DIM(student, 3);
  CHECK_DIM(teacher, 3);
  CHECK_DEVICE_TYPE(student, device);
  CHECK_SAME_DEVICE(student, teacher);
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
              "teacher_states (B, T) must match student_states'");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "teacher_states dtype must match student_states'");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "student_states must be floating point");
  TORCH_CHECK(heads >= 1, "num_relation_heads must be >= 1, got ", heads);
  TORCH_CHECK(student.size(2) > 0 && student.size(2) % heads == 0,
              "student_states width must be a positive multiple of num_relation_heads");
  TORCH_CHECK(teacher.size(2) > 0 && teacher.size(2) % heads == 0,
              "teacher_states width must be a positive multiple of num_relation_heads");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be > 0 and finite, got ",
              temperature);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == student.size(0) && mask->size(1) == student.size(1),
                "mask must be [B, T]");
    CHECK_SAME_DEVICE(student, (*mask));
  }
}

// The backward's extra inputs for a checked `student` [B, T, D_s]: row_grad
// [B, T] and the forward's lse_s, lse_t, head_kl [B, A, T] in `stats_dtype`
// (the accumulation dtype), all on the student's device.
inline void check_backward_args(const at::Tensor& row_grad, const at::Tensor& student, int64_t heads,
                                const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& head_kl,
                                at::ScalarType stats_dtype) {
  const int64_t batch = student.size(0), length = student.size(1);
  TORCH_CHECK(row_grad.dim() == 2 && row_grad.size(0) == batch && row_grad.size(1) == length,
              "row_grad must be [B, T]");
  CHECK_SAME_DEVICE(student, row_grad);
  for (const at::Tensor* saved : {&lse_s, &lse_t, &head_kl}) {
    TORCH_CHECK(saved->dim() == 3 && saved->size(0) == batch && saved->size(1) == heads &&
                    saved->size(2) == length && saved->scalar_type() == stats_dtype,
                "the saved statistics must be [B, A, T] in the accumulation dtype (", stats_dtype, ")");
    CHECK_SAME_DEVICE(student, (*saved));
  }
}

// The forward's per-(b, a, row) statistics [B, A, T] in `stats_dtype`, zero
// for the rows the kernels skip (excluded rows, empty batches).
struct RelationStats {
  at::Tensor lse_s, lse_t, head_kl;

  RelationStats(const at::Tensor& student, int64_t heads, at::ScalarType stats_dtype)
      : lse_s(at::zeros({student.size(0), heads, student.size(1)}, student.options().dtype(stats_dtype))),
        lse_t(at::zeros_like(lse_s)),
        head_kl(at::zeros_like(lse_s)) {}

  // (rows [B, T]: head-mean KL, 0 for excluded rows; lse_student, lse_teacher, head_kl [B, A, T]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {head_kl.mean(1), lse_s, lse_t, head_kl};
  }
};

// A gradient buffer of `like`'s shape in the accumulation dtype, zeros, or
// undefined when not wanted.
inline at::Tensor zero_gradient(const at::Tensor& like, at::ScalarType acc, bool wanted) {
  return wanted ? at::zeros(like.sizes(), like.options().dtype(acc)) : at::Tensor();
}

// The backward's outputs (grad_student [B, T, D_s] or [0], grad_teacher
// [B, T, D_t] or [0]): each wanted gradient buffer in its input's dtype, an
// empty [0] tensor for the others.
inline std::tuple<at::Tensor, at::Tensor> backward_outputs(const at::Tensor& student, const at::Tensor& teacher,
                                                           const at::Tensor& grad_s, const at::Tensor& grad_t,
                                                           bool student_grad, bool teacher_grad) {
  auto finish = [](const at::Tensor& grad, const at::Tensor& like, bool wanted) {
    return wanted ? grad.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(grad_s, student, student_grad), finish(grad_t, teacher, teacher_grad)};
}

}  // namespace attention_relation
}  // namespace fastkd
