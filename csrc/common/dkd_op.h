// Argument checks of fastkd::dkd_forward, shared by the CPU and CUDA ops
// (csrc/cpu/dkd.cpp, csrc/cuda/dkd.cu). The labels' range is checked by each
// op: every label on the host by the CPU op, in the kernel on CUDA (a row
// with an out-of-range label gets a NaN loss and gradient).
#pragma once

#include "checks.h"

namespace fastkd {

// student, teacher [N, C] of one dtype, C >= 2, and labels [N] int64 on `device`.
inline void check_dkd_args(const at::Tensor& student, const at::Tensor& teacher,
                           const at::Tensor& labels, double alpha, double beta,
                           double inv_temperature, double grad_scale, c10::DeviceType device) {
  CHECK_DEVICE_TYPE(student, device);
  CHECK_DEVICE_TYPE(teacher, device);
  CHECK_DEVICE_TYPE(labels, device);
  CHECK_SAME_DEVICE(student, teacher);
  CHECK_SAME_DEVICE(student, labels);
  CHECK_DIM(student, 2);
  CHECK_DIM(teacher, 2);
  CHECK_DIM(labels, 1);
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student ", student.sizes(), " and teacher ",
              teacher.sizes(), " must have the same shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "student and teacher must have the same dtype");
  TORCH_CHECK(student.size(1) >= 2, "DKD needs at least 2 classes, got ", student.size(1));
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.size(0) == student.size(0), "labels must have one entry per row (",
              student.size(0), "), got ", labels.size(0));
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0, "alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK(std::isfinite(beta) && beta >= 0, "beta must be finite and >= 0, got ", beta);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(std::isfinite(grad_scale), "grad_scale must be finite");
}

}  // namespace fastkd
