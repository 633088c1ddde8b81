// The RKD angle kernel (csrc/cpu/relational_kernel.cpp), compiled once per CPU
// capability; csrc/cpu/relational.cpp prepares the Gram matrices and calls one.
#pragma once

#include <cstdint>

namespace fastkd {
namespace cpu {

// Raw pointers of one RKD angle evaluation; every matrix is [n, n], row-major.
//
//   g*_hi, g*_lo  the Gram matrix G = X Xᵀ of the centred embeddings, split
//                 G ≈ hi + lo (for float: hi = float(G64), lo = float(G64 − hi);
//                 for double: hi = G, lo = 0). With the split, the anchor-row
//                 differences G_jk − G_ik are exact for nearby rows j ≈ i
//                 (Sterbenz), which keeps the angle numerators accurate at
//                 small distances.
//   u*            signed inverse distances: u_ij = 1 / max(e_ij, 1e-12) for
//                 e_ij > 0; −1e12 for distinct samples that coincide
//                 (e_ij = 0: their normalised difference is 0, but F.normalize's
//                 gradient through it is 1 / eps); 0 on the diagonal.
//   s: student, t: teacher.
// Outputs (with `grad`; zero-initialised by the caller):
//   d_gram   [n, n]  Σ_i W^(i), the gradient w.r.t. G_jk of every angle term
//                    (the (k, j) half folded into (j, k): only dG + dGᵀ is used)
//   row_sums [n, n]  row i: R^(i)_m = Σ_k W^(i)_mk
//   ang_sums [n, n]  row i: S^(i)_m = Σ_k g^(i)_mk a^(i)_mk
// with W^(i)_jk = g · |u_ij| |u_ik| (0 for j = i or k = i, and when both j
// and k coincide with i: that term has no derivative) and g the
// smooth-L1 derivative clamp(a_s − a_t, −1, 1) (unscaled: no 1 / n³).
// Returns the sum of the smooth-L1 terms over all n³ angles.
template <class T>
struct AngleArgs {
  int64_t n;
  const T* gs_hi;
  const T* gs_lo;
  const T* us;
  const T* gt_hi;
  const T* gt_lo;
  const T* ut;
  bool grad;
  T* d_gram;
  T* row_sums;
  T* ang_sums;
};

#define FASTKD_DECLARE_RELATIONAL_KERNEL(CAPABILITY)       \
  namespace CAPABILITY {                                   \
  double rkd_angle_kernel(const AngleArgs<float>& args);   \
  double rkd_angle_kernel(const AngleArgs<double>& args);  \
  }

FASTKD_DECLARE_RELATIONAL_KERNEL(DEFAULT)
FASTKD_DECLARE_RELATIONAL_KERNEL(AVX2)
FASTKD_DECLARE_RELATIONAL_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
