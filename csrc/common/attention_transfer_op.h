// Shared by the CPU and CUDA implementations of
// fastkd::attention_transfer_forward / attention_transfer_backward
// (csrc/cpu/attention_transfer.cpp, csrc/cuda/attention_transfer.cu): the
// argument checks and the memory layouts the kernels read and write.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "checks.h"

namespace fastkd {
namespace attention {

// student [N, C_s, H, W] and teacher [N, C_t, H, W] of one floating dtype on
// `device`, non-empty; p >= 1, eps finite and > 0.
inline void check_args(const at::Tensor& student, const at::Tensor& teacher, int64_t p, double eps,
                       c10::DeviceType device) {
  check_student_teacher(student, teacher, 4, device);
  TORCH_CHECK(student.size(0) == teacher.size(0), "student and teacher must have the same batch size N, got ",
              student.size(0), " and ", teacher.size(0));
  TORCH_CHECK(student.size(2) == teacher.size(2) && student.size(3) == teacher.size(3),
              "student and teacher must have the same spatial size (pool the larger map first), got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.numel() > 0 && teacher.numel() > 0,
              "student and teacher must be non-empty, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(p >= 1, "p must be >= 1, got ", p);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
}

// The backward's extra inputs: the scalar upstream gradient and the forward's
// norms ‖v_s‖, ‖v_t‖ ([N], `norm_dtype`), on the student's device.
inline void check_backward_args(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& s_norm,
                                const at::Tensor& t_norm, at::ScalarType norm_dtype,
                                c10::DeviceType device) {
  CHECK_DEVICE_TYPE(grad, device);
  CHECK_SAME_DEVICE(grad, student);
  TORCH_CHECK(grad.numel() == 1, "grad must have one element, got ", grad.numel());
  const int64_t n = student.size(0);
  for (const at::Tensor* norm : {&s_norm, &t_norm}) {
    CHECK_DEVICE_TYPE(*norm, device);
    CHECK_SAME_DEVICE(*norm, student);
    TORCH_CHECK(norm->dim() == 1 && norm->size(0) == n, "norms must have shape [N] = [", n, "], got ",
                norm->sizes());
    TORCH_CHECK(norm->scalar_type() == norm_dtype, "norms must have dtype ", norm_dtype, ", got ",
                norm->scalar_type());
  }
}

// channels_last only when it is that and not also plain contiguous (C = 1 or
// HW = 1 make both true: then NCHW), as in the fake kernel.
inline bool reads_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The map as the kernels read it: itself if NCHW- or channels_last-
// contiguous, else an NCHW copy.
inline at::Tensor readable(const at::Tensor& x) {
  return x.is_contiguous() || reads_channels_last(x) ? x : x.contiguous();
}

// A map's gradient in the layout the map is read in, or an empty tensor when
// it is not wanted.
inline at::Tensor grad_buffer(const at::Tensor& x, bool wanted) {
  if (!wanted) return at::empty({0}, x.options());
  const auto layout = reads_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return at::empty(x.sizes(), x.options().memory_format(layout));
}

}  // namespace attention
}  // namespace fastkd
