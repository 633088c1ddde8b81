// SIMD overloads of the building blocks in csrc/common/divergence_math.h, for
// at::vec::Vectorized<T>. With them the CPU kernel evaluates the very same
// element_terms<KIND>() templates as the CUDA kernel, lane-parallel.
//
// This header is compiled once per CPU capability (DEFAULT, AVX2, AVX512):
// at::vec puts Vectorized<T> in the inline namespace CPU_CAPABILITY, so each
// variant gets its own types and no symbol clashes across variants.
// Include this header instead of divergence_math.h in CPU kernel sources.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <type_traits>

namespace fastkd {
namespace divergence {

template <class T>
using Vec = at::vec::Vectorized<T>;

template <class T>
inline Vec<T> fk_exp(Vec<T> x) { return x.exp(); }
template <class T>
inline Vec<T> fk_log(Vec<T> x) { return x.log(); }

// exp for the normalising pass, where it dominates the cost: at::vec's
// exp_u20 (a degree-5 polynomial, ≤ 20 ulp: ~2e-6 relative, well inside the
// float32 tolerance) is about twice as fast as Sleef's 1-ulp exp. It maps
// NaN to a finite value, so NaN is put back; −inf gives 0 as required.
template <class T>
inline Vec<T> fk_exp_normaliser(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec<T>::blendv(x.exp_u20(), x, x != x);
  } else {
    return x.exp();
  }
}
template <class T>
inline Vec<T> fk_log1p(Vec<T> x) { return x.log1p(); }
template <class T>
inline Vec<T> fk_expm1(Vec<T> x) { return x.expm1(); }
template <class T>
inline Vec<T> fk_abs(Vec<T> x) { return x.abs(); }
template <class T>
inline Vec<T> fk_where_positive(Vec<T> d, Vec<T> a, Vec<T> b) {
  return Vec<T>::blendv(b, a, d > Vec<T>(T(0)));
}

// at::vec::maximum / minimum propagate NaN, like the scalar versions.
template <class T>
inline Vec<T> fk_max(Vec<T> a, Vec<T> b) { return at::vec::maximum(a, b); }
template <class T>
inline Vec<T> fk_min(Vec<T> a, Vec<T> b) { return at::vec::minimum(a, b); }

template <class T>
inline Vec<T> fk_zero_where_zero(Vec<T> gate, Vec<T> value) {
  const Vec<T> zero(T(0));
  return Vec<T>::blendv(value, zero, gate == zero);
}

template <class T>
inline Vec<T> fk_half_sign(Vec<T> d) {
  const Vec<T> zero(T(0));
  const Vec<T> positive = Vec<T>::blendv(zero, Vec<T>(T(0.5)), d > zero);
  return Vec<T>::blendv(positive, Vec<T>(T(-0.5)), d < zero);
}

template <class T>
inline Vec<T> fk_logaddexp(Vec<T> a, Vec<T> b) {
  const Vec<T> hi = fk_max(a, b);
  const Vec<T> lo = fk_min(a, b);
  const Vec<T> neg_inf(-std::numeric_limits<T>::infinity());
  const Vec<T> finite = hi + (lo - hi).exp().log1p();
  return Vec<T>::blendv(finite, neg_inf, hi == neg_inf);
}

}  // namespace divergence
}  // namespace fastkd

// Included after the overloads above so that the templates in it see them
// (a dependent call finds non-ADL overloads only if declared before the
// template's definition).
#include "../common/divergence_math.h"
