// The last step of the RKD angle gradient, shared by the CPU and CUDA ops
// (csrc/cpu/rkd.cpp, csrc/cuda/rkd.cu): from the angle kernel's per-pair sums
// to the student's gradient, in float64 with ATen (O(N²) memory, O(N² D) time).
#pragma once

#include <ATen/ATen.h>

namespace fastkd {
namespace rkd {

// F.normalize's eps on the difference vectors e_ij = x_j − x_i.
constexpr double kAngleNormalizeEps = 1e-12;

// d_g: [N, N] float64, Σ_i W^(i), the anchors' weights on the numerators
// (x_j − x_i)·(x_k − x_i) = G_jk − G_ij − G_ik + G_ii; row_sums: [N, N]
// R[i, m] = Σ_k W^(i)_mk; ang_sums: [N, N] c, the normalisers' weights;
// u: [N, N] 1 / e_ij (0 where e_ij <= eps); centred: [N, D] float64 student
// rows minus their mean; scale: the loss's 1 / N³. row_sums and ang_sums are
// released as soon as they are read. Returns dX [N, D] float64.
inline at::Tensor angle_student_grad(at::Tensor d_g, at::Tensor& row_sums, at::Tensor& ang_sums,
                                     const at::Tensor& u, const at::Tensor& centred, double scale) {
  // ∂loss/∂G (up to transposition), summed over anchors i:
  //   Σ_i W^(i) − 2 R + diag(rowsum R).
  {
    const at::Tensor r = row_sums.to(at::kDouble);
    row_sums.reset();
    d_g.sub_(r, 2.0);
    d_g.diagonal().add_(r.sum(1));
  }
  // dX = M X with M = dG + dGᵀ, whose rows sum to 0 (translation
  // invariance), written as Σ_m M_km (x_m − x_k): the rounding of the large
  // weights of nearby samples (~1 / e²) then multiplies x_m − x_k, not x_m.
  d_g.add_(d_g.t().clone());
  at::Tensor grad = at::mm(d_g, centred).sub_(centred * d_g.sum(1, true));
  d_g.reset();
  // The normalisers: ∂loss/∂e_ij = −2 u_ij S_ij, i.e. ∂loss/∂‖x_i − x_j‖² =
  // −S_ij u_ij² where e_ij > eps (F.normalize's max holds it constant below).
  // Both (i, j) and (j, i) act on x_i − x_j: x_i's gradient is
  // 2 Σ_j C_ij (x_i − x_j) with C = c + cᵀ, in float64 (near pairs cancel).
  at::Tensor c = ang_sums.to(at::kDouble);
  ang_sums.reset();
  {
    const at::Tensor u64 = u.to(at::kDouble);
    const at::Tensor live = (u64 > 0).logical_and_(u64 < 1.0 / kAngleNormalizeEps);
    c.mul_(u64.square()).neg_().mul_(live);
  }
  c.add_(c.t().clone());
  grad.addcmul_(centred, c.sum(1, true), 2.0).sub_(at::mm(c, centred), 2.0);
  grad.mul_(scale);
  // x enters through its centred copy: project out the mean (a no-op up to rounding).
  grad.sub_(grad.mean(0, true));
  return grad;
}

}  // namespace rkd
}  // namespace fastkd
