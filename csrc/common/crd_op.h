// Argument checks of fastkd::crd_nce_forward, shared by the CPU and CUDA ops
// (csrc/cpu/crd.cpp, csrc/cuda/crd.cu).
#pragma once

#include "checks.h"

namespace fastkd {

// v [B, D] and bank [n_data, D] float32 / float64, contrast_idx [B, K + 1]
// int64 in [0, n_data) and z [] floating point on `device`. The indices' range is checked here, on
// the host, only for CPU tensors, before any gather (the CPU kernel reads bank
// rows at these indices unchecked). On a GPU that check would be a device →
// host synchronisation on every call: there the kernels guard instead (an
// index outside gives its sample a NaN loss and gradient, docs/spec.md §6).
// Z's value likewise: checked finite on the host for a CPU tensor only; on a
// GPU the kernels read it where it lies.
inline void check_crd_args(const at::Tensor& v, const at::Tensor& bank, const at::Tensor& contrast_idx,
                           const at::Tensor& z, double inv_temperature, c10::DeviceType device) {
  CHECK_DEVICE_TYPE(v, device);
  CHECK_DEVICE_TYPE(bank, device);
  CHECK_DEVICE_TYPE(contrast_idx, device);
  CHECK_SAME_DEVICE(v, bank);
  CHECK_SAME_DEVICE(v, contrast_idx);
  CHECK_DEVICE_TYPE(z, device);
  CHECK_SAME_DEVICE(v, z);
  CHECK_DIM(v, 2);
  CHECK_DIM(bank, 2);
  CHECK_DIM(contrast_idx, 2);
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble,
              "v must be float32 or float64, got ", v.scalar_type());
  TORCH_CHECK(bank.scalar_type() == v.scalar_type(), "bank and v must have the same dtype, got ",
              bank.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(bank.size(1) == v.size(1), "bank and v must have the same feature dim, got ",
              bank.size(1), " and ", v.size(1));
  TORCH_CHECK(bank.size(0) >= 1, "bank must have at least one row");
  CHECK_UNIT_LAST_STRIDE(bank);
  TORCH_CHECK(contrast_idx.scalar_type() == at::kLong, "contrast_idx must be int64, got ",
              contrast_idx.scalar_type());
  TORCH_CHECK(contrast_idx.size(0) == v.size(0), "contrast_idx must have one row per row of v (",
              v.size(0), "), got ", contrast_idx.size(0));
  TORCH_CHECK(contrast_idx.size(1) >= 1, "contrast_idx must have at least one column (the positive)");
  if (contrast_idx.is_cpu() && contrast_idx.numel() > 0) {
    const int64_t lo = contrast_idx.min().item<int64_t>();
    const int64_t hi = contrast_idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < bank.size(0), "contrast_idx must lie in [0, n_data) = [0, ",
                bank.size(0), "), got values in [", lo, ", ", hi, "]");
  }
  TORCH_CHECK(z.dim() == 0 && at::isFloatingType(z.scalar_type()),
              "z must be a 0-dim floating-point tensor, got ", z.scalar_type(), " of shape ", z.sizes());
  if (z.is_cpu()) {
    const double z_value = z.item<double>();
    TORCH_CHECK(std::isfinite(z_value), "z must be finite, got ", z_value);
  }
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
}

}  // namespace fastkd
