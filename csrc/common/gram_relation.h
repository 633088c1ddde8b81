// Shared by the CPU and CUDA implementations of fastkd::pkt_forward,
// fastkd::sp_forward and fastkd::cc_forward (csrc/cpu/gram_relation.cpp,
// csrc/cuda/gram_relation.cu): the argument checks, the per-element
// Taylor series of CC, and PKT's row normalisation x̂ = x / (‖x‖ + eps) with
// its hand-written gradient (ATen tensor ops on the rows, O(N·D); no
// autograd graph).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "checks.h"

#if defined(__CUDACC__)
#define FASTKD_GRAM_HD __host__ __device__ __forceinline__
#else
#define FASTKD_GRAM_HD inline
#endif

namespace fastkd {
namespace gram {

constexpr double kNormalizeEps = 1e-12;  // F.normalize's eps (SP)

inline void check_pkt_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
}

// CC's largest Taylor order: the coefficient (2γ)^p / p! of the reference
// needs p! as a float64, which overflows beyond 170! (and every kernel's cost
// grows with the order).
constexpr int64_t kCcMaxOrder = 170;

inline void check_cc_params(double gamma, int64_t order) {
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0, "gamma must be finite and > 0, got ", gamma);
  TORCH_CHECK(order >= 1, "order must be >= 1, got ", order);
  TORCH_CHECK(order <= kCcMaxOrder, "order must be <= ", kCcMaxOrder,
              " (p! overflows float64 for p > ", kCcMaxOrder, "), got ", order);
}

// CC's Taylor series in g = x_i·x_j: (Σ_{p=0..P} (2γ g)^p / p!, its derivative
// in g, 2γ Σ_{q=0..P−1} (2γ g)^q / q!), both by Horner (kernels/gram_relation.py's
// _cc_taylor).
template <class T>
FASTKD_GRAM_HD void cc_taylor(T g, T two_gamma, int64_t order, T& k, T& dk) {
  k = T(1);
  dk = T(1);
  for (int64_t q = 0; q < order; ++q) {
    const T step = two_gamma * g / static_cast<T>(order - q);
    k = T(1) + step * k;
    if (q > 0) dk = T(1) + step * dk;
  }
  dk *= two_gamma;
  // g = −inf (an infinite input entry): the series' terms alternate ±inf, so
  // the sum is NaN for P >= 2 (Horner would give ±inf). Only −inf halves to
  // itself among negatives; g − g is that NaN (no <cmath> in device code).
  if (order >= 2 && g < T(0) && g * T(0.5) == g) k = dk = g - g;
}

// PKT's rows: x̂ = x / (‖x‖ + eps), the NaN that the division creates (inf /
// inf, from an infinite entry of a row without NaN) set to 0 as RepDistiller
// does; a NaN input stays NaN (docs/spec.md §6). `x`: [N, D] in the accumulation
// dtype. Returns (x̂, ‖x‖, the zeroed entries).
struct PktRows {
  at::Tensor xh, norm, made_nan;
};

inline PktRows pkt_rows(const at::Tensor& x, double eps) {
  at::Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, /*keepdim=*/true);
  const at::Tensor raw = x / (norm + eps);
  at::Tensor made_nan = raw.isnan().logical_and_(x.isnan().any(1, true).logical_not_());
  return {raw.masked_fill(made_nan, 0.0), std::move(norm), std::move(made_nan)};
}

// dx from dx̂, exactly as torch autograd differentiates the reference's
// expression (so NaN / inf cases agree): with a = ‖x‖ + eps,
//   ∂/∂x of x / a:  d / a,  ∂/∂a: −Σ d · (x / a) / a,
//   vector_norm:    x · (da / ‖x‖), 0 where ‖x‖ = 0,
// where d is dx̂ with the zeroed entries masked out.
inline at::Tensor pkt_rows_backward(const at::Tensor& x, const PktRows& rows, const at::Tensor& d_xh,
                                    double eps) {
  const at::Tensor d = d_xh.masked_fill(rows.made_nan, 0.0);
  const at::Tensor a = rows.norm + eps;
  const at::Tensor da = (d * ((x / a) / a)).sum(1, true).neg_();
  const at::Tensor per_norm = (da / rows.norm).masked_fill_(rows.norm == 0, 0.0);
  return (d / a).add_(x * per_norm);
}

// at::empty: how the Gram matrices are allocated unless the caller passes its
// own allocation (the CPU passes its cache of freed buffers, allocation.h:
// an n × n matrix faulted in afresh on every call costs as much as the
// product that fills it).
struct PlainEmpty {
  at::Tensor operator()(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::empty(sizes, options);
  }
};

// x xᵀ [n, n] for rows x [n, d], into a matrix from `empty`.
template <class Empty>
at::Tensor gram_of(const at::Tensor& x, Empty empty) {
  at::Tensor g = empty({x.size(0), x.size(0)}, x.options());
  at::mm_out(g, x, x.t());
  return g;
}

// Both sides' rows in the accumulation dtype `acc` (contiguous) and their
// Gram matrices G = X Xᵀ [N, N] (SP, CC). `gs` is the student's, written in
// place by the row passes.
struct GramPair {
  at::Tensor xs, xt, gs, gt;
};

template <class Empty = PlainEmpty>
GramPair gram_pair(const at::Tensor& student, const at::Tensor& teacher, at::ScalarType acc, Empty empty = {}) {
  GramPair g;
  g.xs = student.to(acc).contiguous();
  g.xt = teacher.to(acc).contiguous();
  g.gs = gram_of(g.xs, empty);
  g.gt = gram_of(g.xt, empty);
  return g;
}

// PKT's inputs: the student's rows and normalised rows, and both sides'
// cosine matrices H = x̂ x̂ᵀ [N, N]; `hs` is written in place by the row passes.
struct PktPair {
  at::Tensor xs;
  PktRows rows_s;
  at::Tensor hs, ht;
};

template <class Empty = PlainEmpty>
PktPair pkt_pair(const at::Tensor& student, const at::Tensor& teacher, at::ScalarType acc, double eps,
                 Empty empty = {}) {
  PktPair p;
  p.xs = student.to(acc).contiguous();
  const at::Tensor xt = teacher.to(acc).contiguous();
  p.rows_s = pkt_rows(p.xs, eps);
  const PktRows rows_t = pkt_rows(xt, eps);
  p.hs = gram_of(p.rows_s.xh, empty);
  p.ht = gram_of(rows_t.xh, empty);
  return p;
}

// The student's gradient from dx̂ = (dH + dHᵀ) x̂ (H = x̂ x̂ᵀ, `hs` holding dH),
// through the normalisation; in `dtype`. The CPU forms dx̂ itself, with a
// product whose rounding does not depend on the thread count.
inline at::Tensor pkt_student_grad_from(const PktPair& p, const at::Tensor& d_xh, double eps,
                                        at::ScalarType dtype) {
  return pkt_rows_backward(p.xs, p.rows_s, d_xh, eps).to(dtype);
}
inline at::Tensor pkt_student_grad(const PktPair& p, double eps, at::ScalarType dtype) {
  return pkt_student_grad_from(p, at::mm(p.hs + p.hs.t(), p.rows_s.xh), eps, dtype);
}

// The student's gradient once `gs` holds dG: G = X Xᵀ gives dX = (dG + dGᵀ) X; in `dtype`.
inline at::Tensor gram_student_grad(const GramPair& g, at::ScalarType dtype) {
  return at::mm(g.gs + g.gs.t(), g.xs).to(dtype);
}

}  // namespace gram
}  // namespace fastkd
