// Shared by the CPU and CUDA implementations of fastkd::mmd_forward /
// fastkd::mmd_backward (csrc/cpu/mmd.cpp, csrc/cuda/mmd.cu): the kernel
// codes and the argument checks.
#pragma once

#include <c10/util/ArrayRef.h>

#include "checks.h"
#include "mmd_centre.h"

namespace fastkd {

// The `kernel` argument of the MMD ops (the Python layer's MMD kernel codes).
enum class MmdKernel : int {
  kGaussian = 0,
  kLaplacian = 1,
  kPolynomial = 2,
};

// x [N, D] and y [M, D] on `device`, and the kernel's parameters.
inline void check_mmd_args(const at::Tensor& x, const at::Tensor& y, int64_t kernel,
                           at::ArrayRef<double> bandwidths, int64_t degree, double c, bool unbiased,
                           int64_t tile_rows, c10::DeviceType device) {
  CHECK_DEVICE_TYPE(x, device);
  CHECK_DEVICE_TYPE(y, device);
  CHECK_SAME_DEVICE(x, y);
  CHECK_DIM(x, 2);
  CHECK_DIM(y, 2);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must have the same dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK(x.size(1) == y.size(1), "x and y must have the same feature dim D, got ", x.size(1),
              " and ", y.size(1));
  TORCH_CHECK(x.size(0) >= 1 && y.size(0) >= 1, "x and y must have at least one row, got ",
              x.size(0), " and ", y.size(0));
  TORCH_CHECK(kernel >= 0 && kernel <= 2, "kernel must be 0 (gaussian), 1 (laplacian) or 2 "
              "(polynomial), got ", kernel);
  if (kernel != static_cast<int64_t>(MmdKernel::kPolynomial)) {
    TORCH_CHECK(!bandwidths.empty(), "bandwidths must not be empty");
    for (double s : bandwidths) {
      TORCH_CHECK(std::isfinite(s), "bandwidths must be finite, got ", s);
      TORCH_CHECK(s >= mmd::kMinBandwidth, "bandwidths must be >= 1e-150, got ", s);
    }
  }
  TORCH_CHECK(degree >= 1, "degree must be >= 1, got ", degree);
  TORCH_CHECK(std::isfinite(c) && c > 0, "c must be finite and > 0, got ", c);
  if (unbiased) {
    TORCH_CHECK(x.size(0) >= 2 && y.size(0) >= 2,
                "unbiased needs at least 2 rows in x and in y, got ", x.size(0), " and ",
                y.size(0));
  }
  TORCH_CHECK(tile_rows >= 1, "tile_rows must be >= 1, got ", tile_rows);
}

}  // namespace fastkd
