// The gaussian MMD block kernel (csrc/cpu/mmd_kernel.cpp), compiled once per
// CPU capability; csrc/cpu/mmd.cpp computes the dot products (a GEMM) and
// calls the variant chosen for this CPU.
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

// One block of the gaussian kernel k(a_i, b_j) = Σ_σ exp(−sq_ij / (2σ²)),
// sq_ij = ‖a_i‖² + ‖b_j‖² − 2 a_i·b_j clamped at 0, for rows i of a tile of
// one sample against every row j of a sample.
template <class T>
struct GaussianBlockArgs {
  T* dots;             // [rows, cols] a_i·b_j (row stride ld); becomes the
                       // gradient coefficients in gaussian_block_coef
  int64_t ld;
  const T* a_norm;     // [rows] ‖a_i‖²
  const T* b_norm;     // [cols] ‖b_j‖²
  int64_t rows, cols;
  int64_t diag;        // column of row 0's own sample in a within-sample block, else −1
  const T* exponents;  // [bandwidths] −1 / (2σ²)
  const T* slopes;     // [bandwidths] −1 / σ²  (d k_σ / d a_i = slope · k_σ · (a_i − b_j))
  int64_t bandwidths;
  bool unbiased;       // within-sample diagonal excluded (k = 0 there)
};

// One definition per capability, in namespaces named after it.
#define FASTKD_DECLARE_MMD_KERNEL(CAPABILITY)                                       \
  namespace CAPABILITY {                                                            \
  /* Σ_ij k(a_i, b_j), the diagonal exact (Σ_σ 1, or 0 when unbiased). */           \
  double gaussian_block_sum(const GaussianBlockArgs<float>& args);                  \
  double gaussian_block_sum(const GaussianBlockArgs<double>& args);                 \
  /* dots_ij ← C_ij = Σ_σ slope_σ exp(exponent_σ sq_ij), 0 on the diagonal. */      \
  void gaussian_block_coef(const GaussianBlockArgs<float>& args);                   \
  void gaussian_block_coef(const GaussianBlockArgs<double>& args);                  \
  }

FASTKD_DECLARE_MMD_KERNEL(DEFAULT)
FASTKD_DECLARE_MMD_KERNEL(AVX2)
FASTKD_DECLARE_MMD_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
