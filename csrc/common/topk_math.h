// Per-id mathematics of the top-k (sparse teacher) divergence (docs/spec.md §1), in
// double, host and device, shared by the CPU kernel (csrc/cpu/topk_kernel.cpp,
// whose header derives the formulas) and the CUDA kernel
// (csrc/cuda/topk.cu), so the CPU tests exercise the arithmetic of
// the GPU's k support terms:
//
//   ℓ = Σ_{j ∈ ids} loss_j + c·R,     G = Σ_{j ∈ ids} q_j g_j + c·R,
//   dℓ/ds_v = q_v (g_v − G)/T,        g_v = ∂ℓ/∂q_v (= c off the ids),
//
// with R the student's mass off the teacher's ids. log q and log p are the
// student's full-vocabulary and the teacher's renormalised log-probabilities
// at one id.
#pragma once

#include "divergence_math.h"

namespace fastkd {
namespace topk {

// One id's contribution to ℓ and to G.
struct SupportTerm {
  double loss;
  double q_times_g;
};

// x (log x − log y) with the xlogy rule: 0 when x is 0.
FASTKD_HOST_DEVICE double xlog_ratio(double x, double log_x, double log_y) {
  return x == 0.0 ? 0.0 : x * (log_x - log_y);
}

// KIND: fastkd::divergence::Kind, never REVERSE_KL (infinite off the ids).
// k: β (JSD) or α (skew) and its derived forms.
template <int KIND>
FASTKD_HOST_DEVICE SupportTerm support_term(double log_q, double log_p,
                                            const divergence::Coefficient<double>& k) {
  using namespace fastkd::divergence;
  static_assert(KIND != REVERSE_KL, "KL(q‖p) is infinite off the teacher's ids");
  const double q = fk_exp(log_q), p = fk_exp(log_p);
  if constexpr (KIND == KL) {
    // KL(p‖q);  g = −p/q
    return {xlog_ratio(p, log_p, log_q), -p};
  } else if constexpr (KIND == JSD) {
    // m = β p + (1−β) q;  ℓ = β KL(p‖m) + (1−β) KL(q‖m);  g = (1−β) log(q/m)
    const double log_m = fk_logaddexp(k.log_c + log_p, k.log_one_minus_c + log_q);
    const double q_term = xlog_ratio(q, log_q, log_m);
    return {k.c * xlog_ratio(p, log_p, log_m) + k.one_minus_c * q_term, k.one_minus_c * q_term};
  } else if constexpr (KIND == SKEW_KL) {
    // m = α p + (1−α) q;  ℓ = KL(p‖m);  g = −(1−α) p/m
    const double log_m = fk_logaddexp(k.log_c + log_p, k.log_one_minus_c + log_q);
    const double qg = p == 0.0 ? 0.0 : -k.one_minus_c * fk_exp(log_q + log_p - log_m);
    return {xlog_ratio(p, log_p, log_m), qg};
  } else if constexpr (KIND == SKEW_REVERSE_KL) {
    // m = α q + (1−α) p;  ℓ = KL(q‖m);  g = log(q/m) + (1−α) p/m
    const double log_m = fk_logaddexp(k.log_c + log_q, k.log_one_minus_c + log_p);
    const double q_term = xlog_ratio(q, log_q, log_m);
    const double mix = (q == 0.0 || p == 0.0) ? 0.0 : k.one_minus_c * fk_exp(log_q + log_p - log_m);
    return {q_term, q_term + mix};
  } else {
    static_assert(KIND == TVD, "unknown divergence kind");
    // ½ Σ |p − q|;  g = ½ sign(q − p)
    const double d = q - p;
    return {0.5 * fk_abs(d), q * fk_half_sign(d)};
  }
}

// c = g_v off the teacher's ids: with p = 0 there, JSD's (1−β) q log(q/m) is
// −(1−β) log(1−β) q, the skew reverse KL's q log(q/(αq)) is −log α · q, TVD's
// ½|0 − q| is ½ q; KL and skew KL have no term there.
template <int KIND>
FASTKD_HOST_DEVICE double off_support_slope(const divergence::Coefficient<double>& k) {
  using namespace fastkd::divergence;
  if constexpr (KIND == JSD) {
    return -k.one_minus_c * k.log_one_minus_c;
  } else if constexpr (KIND == SKEW_REVERSE_KL) {
    return -k.log_c;
  } else if constexpr (KIND == TVD) {
    return 0.5;
  } else {
    return 0.0;
  }
}

}  // namespace topk
}  // namespace fastkd
