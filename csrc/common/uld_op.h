// Shared by the CPU and CUDA implementations of fastkd::uld_forward
// (csrc/cpu/uld.cpp, csrc/cuda/uld.cu): the argument checks and the outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"

namespace fastkd {
namespace uld {

// student [N, V_s] and teacher [N, V_t] of one floating dtype on `device`,
// rows aligned, 1 ≤ V < 2^31; inverse temperatures finite and > 0 (exactly 1
// on a log-probability side); grad_scale finite; row_mask [N] bool on the
// student's device, or none. The device-specific limits are the caller's.
inline void check_args(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& row_mask,
                       double inv_student_temperature, double inv_teacher_temperature, double grad_scale,
                       bool student_is_logprob, bool teacher_is_logprob, c10::DeviceType device) {
  CHECK_DIM(student, 2);
  CHECK_DIM(teacher, 2);
  CHECK_DEVICE_TYPE(student, device);
  CHECK_SAME_DEVICE(student, teacher);
  TORCH_CHECK(student.size(0) == teacher.size(0), "teacher has ", teacher.size(0), " rows but student has ",
              student.size(0), ": the rows must be aligned");
  TORCH_CHECK(student.size(1) > 0 && teacher.size(1) > 0,
              "student and teacher must have at least one column (vocabulary entry)");
  TORCH_CHECK(student.size(1) <= std::numeric_limits<int32_t>::max() &&
                  teacher.size(1) <= std::numeric_limits<int32_t>::max(),
              "student and teacher rows must have fewer than 2^31 entries");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "student must be floating point, got ",
              student.scalar_type());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "student and teacher must have the same dtype");
  TORCH_CHECK(std::isfinite(inv_student_temperature) && inv_student_temperature > 0,
              "inv_student_temperature must be finite and > 0, got ", inv_student_temperature);
  TORCH_CHECK(std::isfinite(inv_teacher_temperature) && inv_teacher_temperature > 0,
              "inv_teacher_temperature must be finite and > 0, got ", inv_teacher_temperature);
  // a log-probability row is used as given: no temperature to divide by
  TORCH_CHECK(!student_is_logprob || inv_student_temperature == 1.0,
              "inv_student_temperature must be 1 when student_is_logprob, got ", inv_student_temperature);
  TORCH_CHECK(!teacher_is_logprob || inv_teacher_temperature == 1.0,
              "inv_teacher_temperature must be 1 when teacher_is_logprob, got ", inv_teacher_temperature);
  TORCH_CHECK(std::isfinite(grad_scale), "grad_scale must be finite");
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->scalar_type() == at::kBool, "row_mask must be bool");
    TORCH_CHECK(row_mask->dim() == 1 && row_mask->size(0) == student.size(0), "row_mask must be [N]");
    CHECK_SAME_DEVICE(student, (*row_mask));
  }
}

// A checked row as the kernels read it: unit stride along V, any row stride.
inline at::Tensor unit_column_stride(const at::Tensor& x) {
  return x.stride(1) == 1 || x.size(1) == 1 ? x : x.contiguous();
}

// The op's inputs as the kernels read them and its outputs (see the schema in
// csrc/fastkd.cpp): the row losses [N] in `loss_dtype`, the gradients [N, V]
// in the input dtype (or [0, 0] when not wanted), the contiguous row mask.
struct UldCall {
  at::Tensor student, teacher, row_loss, student_grad, teacher_grad, mask;

  UldCall(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
          const std::optional<at::Tensor>& row_mask, bool want_student_grad, bool want_teacher_grad,
          at::ScalarType loss_dtype)
      : student(unit_column_stride(student_logits)),
        teacher(unit_column_stride(teacher_logits)),
        row_loss(at::empty({student.size(0)}, student.options().dtype(loss_dtype))),
        student_grad(at::empty({want_student_grad ? student.size(0) : 0, want_student_grad ? student.size(1) : 0},
                               student.options())),
        teacher_grad(at::empty({want_teacher_grad ? teacher.size(0) : 0, want_teacher_grad ? teacher.size(1) : 0},
                               teacher.options())),
        mask(row_mask.has_value() ? row_mask->contiguous() : at::Tensor()) {}

  int64_t rows() const { return student.size(0); }
  const bool* mask_ptr() const { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {row_loss, student_grad, teacher_grad}; }
};

}  // namespace uld
}  // namespace fastkd
