// Per-element mathematics of the softmax-divergence family (docs/spec.md §1),
// shared by the CPU kernel (scalar tails and, through the overloads in
// csrc/cpu/vec_math.h, the at::vec SIMD body) and the CUDA kernel.
//
// Notation per row: p = softmax(t / T) (teacher), q = softmax(s / T)
// (student), given here as p, q and the log ratio D = log p − log q. D is
// not the difference of two log-softmaxes: each of those carries the
// rounding of its row's log-sum-exp (~log V), which swamps the divergence
// when it is small (at T = 1e4 a KL of 1e-8 against log Σ exp ≈ 10); the
// caller forms D from logit differences and the difference of the two
// log-sum-exps, rounded once. Every divergence term below is written in D
// (the mixtures m of JSD and the skew divergences through log(m/p) or
// log(m/q), which are near 0 where p ≈ q), so its rounding is relative to
// its own size. Every divergence L(p, q) is written as a
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

// The codes of fastkd/_enums.py's DivergenceKind (tests/test_enums.py
// checks that the two agree), which the Triton kernels use too. Endpoint cases (JSD with β ∈ {0, 1}, skew with
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
FASTKD_HOST_DEVICE float fk_expm1(float x) { return ::expm1f(x); }
FASTKD_HOST_DEVICE double fk_expm1(double x) { return ::expm1(x); }
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

// d > 0 ? a : b (b for a NaN d).
template <class T>
FASTKD_HOST_DEVICE T fk_where_positive(T d, T a, T b) {
  return d > T(0) ? a : b;
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

// log(c + (1 − c) e^d) for a log ratio d = log(other / ref): log(m / ref)
// for the mixture m = c·ref + (1 − c)·other, c in (0, 1]. With a = |d|,
// w the weight of the side e^d multiplies after factoring out e^max(d, 0)
// and w' the other one (d ≤ 0: w = 1 − c, w' = c; d > 0: w = c, w' = 1 − c):
//   log(m / ref) = max(d, 0) + log(w' + w e^−a)
//   a ≤ ln 2:  log1p(w expm1(−a))       near d = 0 the result is near 0 and
//                                        rounded relative to its size
//   a > ln 2:  logaddexp(log w', log w − a)   keeps w' when it is tiny or
//                                        1 − w' rounds to 1 (c near 0 or 1)
// d = −inf gives log c, d = +inf gives +inf (−inf·… only where the caller's
// gate, ref = 0, zeroes the term). log_c and log_one_minus_c are the
// weights' logarithms, taken once per call (Coefficient), not per element.
template <class V>
FASTKD_HOST_DEVICE V log_mixture_ratio(V d, V c, V one_minus_c, V log_c, V log_one_minus_c) {
  const V zero = V(0);
  const V w = fk_where_positive(d, c, one_minus_c);
  const V log_w = fk_where_positive(d, log_c, log_one_minus_c);
  const V log_w_other = fk_where_positive(d, log_one_minus_c, log_c);
  const V a = fk_abs(d);
  const V near = fk_log1p(w * fk_expm1(zero - a));
  const V far = fk_logaddexp(log_w_other, log_w - a);
  return fk_max(d, zero) + fk_where_positive(a - V(0.6931471805599453), far, near);
}

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
  V log_ratio;   // D = log p − log q (see the header comment); +inf where q = 0 < p
  V p, q;        // softmax of t/T and s/T
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
  const V d = x.log_ratio, p = x.p, q = x.q;
  const V zero = V(0);
  const V shifted_ratio_q = x.shifted_ratio_q, shifted_ratio_p = x.shifted_ratio_p;
  ElementTerms<V> r;
  r.p = p;
  r.q = q;
  if constexpr (KIND == KL) {
    // KL(p‖q) = Σ p D;  u = −p,  v = p (D − c_p)
    r.loss = fk_zero_where_zero(p, p * d);
    r.u = zero - p;
    r.v = fk_zero_where_zero(p, p * shifted_ratio_p);
  } else if constexpr (KIND == REVERSE_KL) {
    // KL(q‖p) = Σ q (−D);  u = q (log q − log p − c_q),  v = −q
    r.loss = fk_zero_where_zero(q, q * (zero - d));
    r.u = fk_zero_where_zero(q, q * shifted_ratio_q);
    r.v = zero - q;
  } else if constexpr (KIND == JSD) {
    // m = β p + (1−β) q;  L = β KL(p‖m) + (1−β) KL(q‖m)
    // u = (1−β) q (log q − log m),  v = β p (log p − log m), with
    // log(m/p) = log(β + (1−β) q/p) and log(m/q) = log((1−β) + β p/q)
    const V log_m_over_p = log_mixture_ratio(zero - d, k.c, k.one_minus_c, k.log_c, k.log_one_minus_c);
    const V log_m_over_q = log_mixture_ratio(d, k.one_minus_c, k.c, k.log_one_minus_c, k.log_c);
    const V a = fk_zero_where_zero(p, zero - p * log_m_over_p);
    const V b = fk_zero_where_zero(q, zero - q * log_m_over_q);
    r.u = k.one_minus_c * b;
    r.v = k.c * a;
    r.loss = r.v + r.u;
  } else if constexpr (KIND == SKEW_KL) {
    // m = α p + (1−α) q;  L = KL(p‖m)
    // u = −(1−α) q p / m,  v = p (log p − log m) − α p² / m
    const V log_m_over_p = log_mixture_ratio(zero - d, k.c, k.one_minus_c, k.log_c, k.log_one_minus_c);
    const V p_over_m = fk_exp(zero - log_m_over_p);
    const V a = fk_zero_where_zero(p, zero - p * log_m_over_p);
    r.loss = a;
    r.u = zero - k.one_minus_c * fk_zero_where_zero(p, q * p_over_m);
    r.v = a - k.c * fk_zero_where_zero(p, p * p_over_m);
  } else if constexpr (KIND == SKEW_REVERSE_KL) {
    // m = α q + (1−α) p;  L = KL(q‖m)  (SKEW_KL with the roles swapped:
    // log(m/q) = log(α + (1−α) p/q))
    const V log_m_over_q = log_mixture_ratio(d, k.c, k.one_minus_c, k.log_c, k.log_one_minus_c);
    const V q_over_m = fk_exp(zero - log_m_over_q);
    const V b = fk_zero_where_zero(q, zero - q * log_m_over_q);
    r.loss = b;
    r.u = b - k.c * fk_zero_where_zero(q, q * q_over_m);
    r.v = zero - k.one_minus_c * fk_zero_where_zero(q, p * q_over_m);
  } else {
    static_assert(KIND == TVD, "unknown divergence kind");
    // TVD = ½ Σ |p − q|;  u = q · ½ sign(q − p),  v = −p · ½ sign(q − p)
    const V diff = q - p;
    const V hs = fk_half_sign(diff);
    r.loss = V(0.5) * fk_abs(diff);
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
