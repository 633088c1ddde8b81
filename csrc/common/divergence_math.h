// Per-element mathematics of the softmax-divergence family (SPEC section 1),
// shared by the CPU kernel (scalar tails and, through the overloads in
// csrc/cpu/vec_math.h, the at::vec SIMD body) and the CUDA kernel.
//
// Notation per row: p = softmax(t / T) (teacher), q = softmax(s / T)
// (student), given here as log p and log q (log-softmax, computed from the
// row's log-sum-exp by the caller). Every divergence L(p, q) is written as a
// sum of per-element terms, and its gradient through the two softmaxes as
//
//   dL/ds_j = (u_j − q_j · Σ_k u_k) / T,   u_j = q_j · ∂L/∂q_j
//   dL/dt_j = (v_j − p_j · Σ_k v_k) / T,   v_j = p_j · ∂L/∂p_j
//
// (the softmax Jacobian). Terms of u proportional to q (and of v to p) cancel
// in that expression, so they are dropped below — including a row constant
// subtracted from an unbounded log ratio: for REVERSE_KL's u and KL's v
// (u = q log(q/p), v = p log(p/q)), the caller passes the log ratio minus its
// value at the distribution's mode, computed from logit differences. With
// logits of magnitude 1e4, log(q/p) is ~1e4 at the mode and the gradient there
// is a difference of two such numbers; shifting makes that term exactly 0 and
// leaves only small, accurate contributions (see csrc/cpu/divergence_kernel.cpp).
// The bounded terms of the other divergences need no such care. xlogy convention: a term
// whose probability is exactly 0 is 0 (even where its log ratio is NaN, as
// for a padded `-inf` entry in both rows); NaN probabilities still propagate.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FASTKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTKD_HOST_DEVICE inline
#endif

namespace fastkd {
namespace divergence {

// Codes shared with fastkd/_dispatch.py (DIVERGENCE_CODES) and
// kernels/divergence.py. Endpoint cases (JSD with β ∈ {0, 1}, skew with
// α = 0) are mapped to KL / REVERSE_KL by the Python layer, so the kernels
// only see the interior coefficients where every formula below is finite.
enum Kind : int {
  KL = 0,               // KL(p‖q)
  REVERSE_KL = 1,       // KL(q‖p)
  JSD = 2,              // β KL(p‖m) + (1−β) KL(q‖m),  m = β p + (1−β) q
  SKEW_KL = 3,          // KL(p‖m),  m = α p + (1−α) q
  SKEW_REVERSE_KL = 4,  // KL(q‖m),  m = α q + (1−α) p
  TVD = 5,              // ½ Σ |p − q|
};

// ---- scalar building blocks (host and device) ------------------------------
// csrc/cpu/vec_math.h provides the same names for at::vec::Vectorized<T>.

FASTKD_HOST_DEVICE float fk_exp(float x) { return ::expf(x); }
FASTKD_HOST_DEVICE double fk_exp(double x) { return ::exp(x); }
FASTKD_HOST_DEVICE float fk_log(float x) { return ::logf(x); }
FASTKD_HOST_DEVICE double fk_log(double x) { return ::log(x); }
FASTKD_HOST_DEVICE float fk_log1p(float x) { return ::log1pf(x); }
FASTKD_HOST_DEVICE double fk_log1p(double x) { return ::log1p(x); }
FASTKD_HOST_DEVICE float fk_abs(float x) { return ::fabsf(x); }
FASTKD_HOST_DEVICE double fk_abs(double x) { return ::fabs(x); }

// max that propagates NaN (std::max and fmaxf drop it).
template <class T>
FASTKD_HOST_DEVICE T fk_max(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}
template <class T>
FASTKD_HOST_DEVICE T fk_min(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (a < b ? a : b));
}

// `gate == 0 ? 0 : value`: the xlogy rule. A NaN gate keeps the value.
template <class T>
FASTKD_HOST_DEVICE T fk_zero_where_zero(T gate, T value) {
  return gate == T(0) ? T(0) : value;
}

// ½ sign(d) with sign(0) = 0 (the subgradient torch.abs uses).
template <class T>
FASTKD_HOST_DEVICE T fk_half_sign(T d) {
  return d > T(0) ? T(0.5) : (d < T(0) ? T(-0.5) : T(0));
}

// log(e^a + e^b) without overflow; −inf when both are −inf (no NaN).
template <class T>
FASTKD_HOST_DEVICE T fk_logaddexp(T a, T b) {
  const T hi = fk_max(a, b);
  const T lo = fk_min(a, b);
  const T neg_inf = -INFINITY;
  return hi == neg_inf ? neg_inf : hi + fk_log1p(fk_exp(lo - hi));
}

// ---- per-element terms, generic over scalar and SIMD types ------------------

// The divergence coefficient c (β for JSD, α for the skew divergences) in the
// forms the formulas use; log c and log(1−c) may be −inf.
template <class V>
struct Coefficient {
  V c, one_minus_c, log_c, log_one_minus_c;
};

// What element_terms reads at one vocabulary position. p and q are passed in
// (not recomputed from the logs) so that a caller holding exp(x/T − max) from
// its normalising pass needs no second exponential.
template <class V>
struct ElementInputs {
  V logp, logq;  // log-softmax of t/T and s/T
  V p, q;        // exp(logp), exp(logq)
  V shifted_ratio_q;  // log(q/p) − c_q, read by REVERSE_KL's u
  V shifted_ratio_p;  // log(p/q) − c_p, read by KL's v   (c_q, c_p: row constants)
};

// loss: this element's contribution to L; u, v: as in the header comment;
// p, q: the probabilities passed in, returned for the gradient formula.
template <class V>
struct ElementTerms {
  V loss, u, v, p, q;
};

template <int KIND, class V>
FASTKD_HOST_DEVICE ElementTerms<V> element_terms(const ElementInputs<V>& x,
                                                 const Coefficient<V>& k) {
  const V logp = x.logp, logq = x.logq, p = x.p, q = x.q;
  const V shifted_ratio_q = x.shifted_ratio_q, shifted_ratio_p = x.shifted_ratio_p;
  ElementTerms<V> r;
  r.p = p;
  r.q = q;
  if constexpr (KIND == KL) {
    // KL(p‖q) = Σ p (log p − log q);  u = −p,  v = p (log p − log q − c_p)
    r.loss = fk_zero_where_zero(p, p * (logp - logq));
    r.u = V(0) - p;
    r.v = fk_zero_where_zero(p, p * shifted_ratio_p);
  } else if constexpr (KIND == REVERSE_KL) {
    // KL(q‖p) = Σ q (log q − log p);  u = q (log q − log p − c_q),  v = −q
    r.loss = fk_zero_where_zero(q, q * (logq - logp));
    r.u = fk_zero_where_zero(q, q * shifted_ratio_q);
    r.v = V(0) - q;
  } else if constexpr (KIND == JSD) {
    // m = β p + (1−β) q in log space;  L = β KL(p‖m) + (1−β) KL(q‖m)
    // u = (1−β) q (log q − log m),  v = β p (log p − log m)
    const V logm = fk_logaddexp(k.log_c + logp, k.log_one_minus_c + logq);
    const V a = fk_zero_where_zero(p, p * (logp - logm));
    const V b = fk_zero_where_zero(q, q * (logq - logm));
    r.u = k.one_minus_c * b;
    r.v = k.c * a;
    r.loss = r.v + r.u;
  } else if constexpr (KIND == SKEW_KL) {
    // m = α p + (1−α) q;  L = KL(p‖m)
    // u = −(1−α) q p / m,  v = p (log p − log m) − α p² / m
    const V logm = fk_logaddexp(k.log_c + logp, k.log_one_minus_c + logq);
    const V a = fk_zero_where_zero(p, p * (logp - logm));
    r.loss = a;
    r.u = V(0) - k.one_minus_c * fk_zero_where_zero(p, fk_exp(logp + logq - logm));
    r.v = a - k.c * fk_zero_where_zero(p, fk_exp(logp + logp - logm));
  } else if constexpr (KIND == SKEW_REVERSE_KL) {
    // m = α q + (1−α) p;  L = KL(q‖m)  (SKEW_KL with the roles swapped)
    const V logm = fk_logaddexp(k.log_c + logq, k.log_one_minus_c + logp);
    const V b = fk_zero_where_zero(q, q * (logq - logm));
    r.loss = b;
    r.u = b - k.c * fk_zero_where_zero(q, fk_exp(logq + logq - logm));
    r.v = V(0) - k.one_minus_c * fk_zero_where_zero(q, fk_exp(logp + logq - logm));
  } else {
    static_assert(KIND == TVD, "unknown divergence kind");
    // TVD = ½ Σ |p − q|;  u = q · ½ sign(q − p),  v = −p · ½ sign(q − p)
    const V d = q - p;
    const V hs = fk_half_sign(d);
    r.loss = V(0.5) * fk_abs(d);
    r.u = q * hs;
    r.v = V(0) - p * hs;
  }
  return r;
}

// Final gradient of one element (see the header comment); `factor` is
// grad_scale / T for the row.
template <class V>
FASTKD_HOST_DEVICE V softmax_grad(V term, V prob, V term_sum, V factor) {
  return factor * (term - prob * term_sum);
}

}  // namespace divergence
}  // namespace fastkd
