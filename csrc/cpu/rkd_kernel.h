// The RKD angle kernel (csrc/cpu/rkd_kernel.cpp), compiled once per CPU
// capability; csrc/cpu/rkd.cpp prepares the Gram matrices and calls one.
#pragma once

#include <cstdint>
#include <utility>

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
  // [n]: 1 where anchor i has a sample near it (on either side) and needs
  // the exact pairing of numerator() with the lo halves; 0: hi halves only.
  const uint8_t* precise;
  bool grad;
  T* d_gram;
  T* row_sums;
  T* ang_sums;
};

// Row passes of the RKD distance op (rkd.cpp), one row of [n, n] each:
//   distance_row   d_k = sqrt(max(n_i + n_k − 2 g_k, 1e-12)) from Gram row g
//                  and squared norms; lanes where the Gram form is too close
//                  to its rounding (sq < factor · (n_i + n_k), or NaN) and
//                  the diagonal lane k = diag get near[k] = 1 (their d is
//                  left for the caller to set), others near[k] = 0. Returns
//                  the sum of the others' d. (The diagonal needs the explicit
//                  lane: a zero centred row, as when every row is equal, has
//                  sq = 0 >= factor · 0 there and would pass as a far pair.)
//   distance_loss_row  ρ = d_s · inv_s − d_t · inv_t; writes
//                  q = clamp(ρ, −1, 1) · inv_n2 over d_t; returns
//                  (Σ smooth_l1(ρ), Σ q · d_s).
//   distance_coef_row  overwrites d_s with c = 2 (q − shift) · inv_s / d_s
//                  where d_s > 1e-6 (0 elsewhere); returns Σ c.
#define FASTKD_DECLARE_RELATIONAL_KERNEL(CAPABILITY)                                          \
  namespace CAPABILITY {                                                                      \
  double rkd_angle_kernel(const AngleArgs<float>& args);                                      \
  double rkd_angle_kernel(const AngleArgs<double>& args);                                     \
  template <class T>                                                                          \
  double distance_row(const T* g, const T* norms, T n_i, T factor, T* d, uint8_t* near,       \
                      int64_t n, int64_t diag);                                               \
  template <class T>                                                                          \
  std::pair<double, double> distance_loss_row(const T* d_s, T* d_t, T inv_s, T inv_t,         \
                                              T inv_n2, int64_t n);                           \
  template <class T>                                                                          \
  double distance_coef_row(T* d_s, const T* q, T shift, T inv_s, int64_t n);                  \
  }

FASTKD_DECLARE_RELATIONAL_KERNEL(DEFAULT)
FASTKD_DECLARE_RELATIONAL_KERNEL(AVX2)
FASTKD_DECLARE_RELATIONAL_KERNEL(AVX512)

}  // namespace cpu
}  // namespace fastkd
