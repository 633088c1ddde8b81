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

// exp for the normalising passes, where it dominates the cost, for the
// arguments they pass: (x − max)/T ≤ 0, −inf, or NaN (arguments up to 88
// are accurate too; +inf is not: it gives NaN). NaN stays NaN; −inf and
// arguments whose exponential is below the float range give 0.
//
// AVX512, float: Cody–Waite reduction a = n ln2 + r, |r| ≤ ln2/2, a degree-5
// polynomial for e^r and vscalefps for 2^n (≤ 2 ulp over the normal range,
// against float64 exp at 29 million arguments in [−103, 0]): 11 instructions,
// against ~20 for at::vec's exp_u20 and ~35 for Sleef's 1-ulp exp; with two
// exponentials per element this is most of a KL row's arithmetic. vscalefps
// underflows gradually and to 0, so no mask is needed for small arguments;
// the clamp to −110 (e^−110 rounds to 0) keeps −inf from making r NaN, and
// vmaxps returns its second operand, so a NaN argument passes through.
// Elsewhere: at::vec's exp_u20 (a degree-5 polynomial, ≤ 20 ulp: ~2e-6
// relative, well inside the float32 tolerance), about twice as fast as
// Sleef's exp; it maps NaN to a finite value, so NaN is put back.
#if defined(CPU_CAPABILITY_AVX512)
// x = n ln 2 + r with n an integer and |r| ≤ ln2/2, for x clamped below at
// −110 (vmaxps returns its second operand for a NaN: NaN passes through to r).
inline __m512 fk_ln2_reduce(__m512 x, __m512& n) {
  const __m512 a = _mm512_max_ps(_mm512_set1_ps(-110.0f), x);
  n = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 in two parts; n·0.693359375 is exact for |n| < 2^15
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), a);
  return _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
}

// (1 + r·(c0 + r·(c1 + … + r·c4)))·2^floor(n), Horner's rule and vscalefps:
// the exponentials' polynomial for the reduced argument r and the power of
// two for the integer n.
inline __m512 fk_scaled_polynomial(__m512 r, __m512 n, const float (&c)[5]) {
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(c[4]), _mm512_set1_ps(c[3]));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(c[2]));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(c[1]));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(c[0]));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

template <class T>
inline Vec<T> fk_exp_normaliser(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 n;
    const __m512 r = fk_ln2_reduce(x, n);
    static constexpr float kExpCoefficients[5] = {0.999999701f, 0.499991506f, 0.166676521f, 0.0418978221f,
                                                  0.00828929059f};
    return fk_scaled_polynomial(r, n, kExpCoefficients);
#else
    return Vec<T>::blendv(x.exp_u20(), x, x != x);
#endif
  } else {
    return x.exp();
  }
}

// Comparisons for fk_where, with at::vec's operators' NaN rules: EQ, GT and
// LT are false where either side is NaN, NE and UNORDERED are true.
enum class Cmp { EQ, NE, GT, LT, UNORDERED };

// x <cmp> y ? if_true : if_false, lane-wise. On AVX-512 a comparison into a
// mask register and one masked blend: at::vec's `blendv(b, a, x > y)` takes
// four instructions there (the comparison is widened to a vector, which
// blendv compares again), and these selects sit in the inner loops of every
// row kernel.
template <Cmp C, class T>
inline Vec<T> fk_where(Vec<T> x, Vec<T> y, Vec<T> if_true, Vec<T> if_false) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int imm = C == Cmp::EQ ? _CMP_EQ_OQ
                      : C == Cmp::NE ? _CMP_NEQ_UQ
                      : C == Cmp::GT ? _CMP_GT_OQ
                      : C == Cmp::LT ? _CMP_LT_OQ
                                     : _CMP_UNORD_Q;
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, y, imm), if_false, if_true);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(x, y, imm), if_false, if_true);
  }
#endif
  if constexpr (C == Cmp::EQ) return Vec<T>::blendv(if_false, if_true, x == y);
  if constexpr (C == Cmp::NE) return Vec<T>::blendv(if_false, if_true, x != y);
  if constexpr (C == Cmp::GT) return Vec<T>::blendv(if_false, if_true, x > y);
  if constexpr (C == Cmp::LT) return Vec<T>::blendv(if_false, if_true, x < y);
  if constexpr (C == Cmp::UNORDERED) return Vec<T>::blendv(if_false, if_true, (x != x) | (y != y));
}

// 2^t for the normalising passes that scale their logits straight into base
// 2, t = (x − max)·(log2 e / T) ≤ 0, −inf, or NaN (t up to 127 is accurate
// too; +inf gives NaN). NaN stays NaN; −inf and arguments below the float
// range give 0; 2^0 is exactly 1.
//
// Against fk_exp_normaliser's e^a it drops the Cody–Waite reduction
// (t − round(t) is exact) and the multiplication by log2 e, which the caller
// folds into its own scaling: three fewer multiply-add instructions per
// exponential.
// AVX512, float: n = round(t), r = t − n in [−½, ½], a degree-5 polynomial
// for 2^r (relative error 9.1e-8 in exact arithmetic, fitted for minimax
// relative error) and vscalefps for 2^n: ≤ 2.03 ulp against float64 exp2
// at 4 million arguments in [−126, 0], in a step-by-step float32 emulation
// (numpy, each multiply-add rounded once). The clamp to −160 (2^−160 rounds to
// 0) keeps −inf from making r NaN; vmaxps returns its second operand, so a
// NaN argument passes through.
// Elsewhere: e^(t ln 2) by fk_exp_normaliser.
template <class T>
inline Vec<T> fk_exp2_normaliser(Vec<T> t) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 a = _mm512_max_ps(_mm512_set1_ps(-160.0f), t);
    const __m512 n = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(a, n);
    static constexpr float kExp2Coefficients[5] = {0.693147004f, 0.240222424f, 0.0555073358f, 0.00967151299f,
                                                   0.00132647273f};
    return fk_scaled_polynomial(r, n, kExp2Coefficients);
#else
    return fk_exp_normaliser(t * Vec<T>(T(0.693147180559945309)));
#endif
  } else {
    return t.exp2();
  }
}

// For the callers of fk_exp2_normaliser: their scale log2 e / T is rounded
// once from double, and a sum of base-2 exponents times ln 2 is natural.
constexpr double kLog2E = 1.44269504088896340736;
constexpr double kLn2 = 0.693147180559945309417;

// max(a, b) where neither is NaN; with a NaN either may come out. For the
// row maxima, whose NaN the exponentials after them carry on (fk_max costs
// four instructions to propagate it, this one one).
template <class T>
inline Vec<T> fk_max_unordered(Vec<T> a, Vec<T> b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
  if constexpr (std::is_same_v<T, double>) return _mm512_max_pd(a, b);
#endif
  return fk_where<Cmp::GT>(b, a, b, a);
}

// The lanes of v summed in float64, in lane order (a fixed order: results
// do not depend on where a row's vectors start).
template <class T>
inline double fk_lane_sum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  double total = 0;
  for (T lane : lanes) total += static_cast<double>(lane);
  return total;
}

// The largest of `start` and v's lanes, NaN lanes skipped (as `>` skips them).
template <class T>
inline T fk_lane_max(const Vec<T>& v, T start) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  for (T lane : lanes) start = lane > start ? lane : start;
  return start;
}

template <class T>
inline Vec<T> fk_log1p(Vec<T> x) { return x.log1p(); }
template <class T>
inline Vec<T> fk_expm1(Vec<T> x) { return x.expm1(); }
template <class T>
inline Vec<T> fk_abs(Vec<T> x) { return x.abs(); }
template <class T>
inline Vec<T> fk_where_positive(Vec<T> d, Vec<T> a, Vec<T> b) {
  return fk_where<Cmp::GT>(d, Vec<T>(T(0)), a, b);
}

// at::vec::maximum / minimum propagate NaN, like the scalar versions.
template <class T>
inline Vec<T> fk_max(Vec<T> a, Vec<T> b) { return at::vec::maximum(a, b); }
template <class T>
inline Vec<T> fk_min(Vec<T> a, Vec<T> b) { return at::vec::minimum(a, b); }

template <class T>
inline Vec<T> fk_zero_where_zero(Vec<T> gate, Vec<T> value) {
  const Vec<T> zero(T(0));
  return fk_where<Cmp::EQ>(gate, zero, zero, value);
}

template <class T>
inline Vec<T> fk_half_sign(Vec<T> d) {
  const Vec<T> zero(T(0));
  const Vec<T> positive = fk_where<Cmp::GT>(d, zero, Vec<T>(T(0.5)), zero);
  return fk_where<Cmp::LT>(d, zero, Vec<T>(T(-0.5)), positive);
}

template <class T>
inline Vec<T> fk_logaddexp(Vec<T> a, Vec<T> b) {
  const Vec<T> hi = fk_max(a, b);
  const Vec<T> lo = fk_min(a, b);
  const Vec<T> neg_inf(-std::numeric_limits<T>::infinity());
  const Vec<T> finite = hi + (lo - hi).exp().log1p();
  return fk_where<Cmp::EQ>(hi, neg_inf, neg_inf, finite);
}

// expm1 of float lanes, arguments up to 88 (larger ones overflow to inf),
// −inf (−1) and NaN. AVX512: fk_exp_normaliser's reduction (fk_ln2_reduce),
// x = n ln2 + r with |r| ≤ ln2/2, then
// expm1(x) = 2^n expm1(r) + (2^n − 1), expm1(r) = r + r²(1/2 + r/6 + … +
// r⁵/5040) (truncation below 2e-8 relative): rounded relative to the result
// near 0, where exp(x) − 1 would not be, in ~15 instructions against ~40 for
// Sleef's. Elsewhere at::vec's expm1.
inline Vec<float> expm1_lanes(Vec<float> x) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 n;
  const __m512 r = fk_ln2_reduce(x, n);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 5040.0f), _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.5f));
  const __m512 expm1_r = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r);
  const __m512 two_n = _mm512_scalef_ps(_mm512_set1_ps(1.0f), n);
  return _mm512_fmadd_ps(two_n, expm1_r, _mm512_sub_ps(two_n, _mm512_set1_ps(1.0f)));
#else
  return x.expm1();
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// log of positive float lanes: log(u) = e ln2 + log(m) with u = 2^e m, m in
// [0.75, 1.5) (vgetmantps / vgetexpps), log(m) = 2 atanh(s), s = f/(2 + f),
// f = m − 1 exact, |s| ≤ 0.2: 2s (1 + s²/3 + … + s⁸/9) truncates below
// 1e-8 relative. About 15 instructions against ~40 and a call for Sleef's.
// +inf, 0 (−inf) and NaN pass through.
inline __m512 log_positive_lanes(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  __m512 e = _mm512_getexp_ps(u);
  // getexp normalises to [1, 2): a mantissa moved down to [0.75, 1) is one binade up
  e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, one, _CMP_LT_OQ), e, one);
  const __m512 f = _mm512_sub_ps(m, one);
  const __m512 s = _mm512_div_ps(f, _mm512_add_ps(f, _mm512_set1_ps(2.0f)));
  const __m512 z = _mm512_mul_ps(s, s);
  __m512 p = _mm512_fmadd_ps(z, _mm512_set1_ps(1.0f / 9.0f), _mm512_set1_ps(1.0f / 7.0f));
  p = _mm512_fmadd_ps(z, p, _mm512_set1_ps(1.0f / 5.0f));
  p = _mm512_fmadd_ps(z, p, _mm512_set1_ps(1.0f / 3.0f));
  p = _mm512_fmadd_ps(z, p, one);
  const __m512 log_m = _mm512_mul_ps(_mm512_add_ps(s, s), p);
  // e ln2 in two parts: e · 0.693359375 is exact for the exponents of a float
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f),
                         _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), log_m));
}
#endif

// log1p of float lanes of x > −1 (x = −1 gives NaN, not −inf: the callers
// do not use such lanes). AVX512: u = 1 + x
// rounded, log1p(x) = log(u) + (x − (u − 1))/u (the rounding of u to first
// order, exact for u in [½, 2]), ~20 instructions against ~40 and a call
// for Sleef's. +inf and NaN pass through. Elsewhere at::vec's log1p.
inline Vec<float> log1p_lanes(Vec<float> x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 xv = x;
  const __m512 u = _mm512_add_ps(one, xv);
  // the correction for u's rounding; none where x is huge (u − 1 = x there, and x = inf gives inf − inf)
  const __mmask16 moderate = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(1e30f), _CMP_LT_OQ);
  const __m512 correction = _mm512_maskz_div_ps(moderate, _mm512_sub_ps(xv, _mm512_sub_ps(u, one)), u);
  return _mm512_add_ps(log_positive_lanes(u), correction);
#else
  return x.log1p();
#endif
}

// log of positive float lanes (as log1p_lanes; elsewhere at::vec's log).
inline Vec<float> log_lanes(Vec<float> y) {
#if defined(CPU_CAPABILITY_AVX512)
  return log_positive_lanes(y);
#else
  return y.log();
#endif
}

// The float-lane overloads of the building blocks JSD and the skew
// divergences use per element (log_mixture_ratio in divergence_math.h, one
// or two per element: most of their rows' time), with the lanes above in
// place of Sleef's expm1, log1p and exp. AVX512 only: elsewhere the lanes
// are at::vec's own functions, and fk_exp_normaliser's is less accurate.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec<float> fk_expm1(Vec<float> x) { return expm1_lanes(x); }

// log1p_lanes with the rest of the domain: −inf at x = −1, NaN below.
inline Vec<float> fk_log1p(Vec<float> x) {
  const Vec<float> minus_one(-1.0f);
  const Vec<float> inside = fk_where<Cmp::EQ>(x, minus_one, Vec<float>(-std::numeric_limits<float>::infinity()),
                                              log1p_lanes(x));
  return fk_where<Cmp::LT>(x, minus_one, Vec<float>(std::numeric_limits<float>::quiet_NaN()), inside);
}

// log(e^a + e^b): the exponential's argument is lo − hi ≤ 0 (or NaN), in
// fk_exp_normaliser's range, and log1p's in [0, 1].
inline Vec<float> fk_logaddexp(Vec<float> a, Vec<float> b) {
  const Vec<float> hi = fk_max(a, b), lo = fk_min(a, b);
  const Vec<float> neg_inf(-std::numeric_limits<float>::infinity());
  return fk_where<Cmp::EQ>(hi, neg_inf, neg_inf, hi + log1p_lanes(fk_exp_normaliser(lo - hi)));
}
#endif

}  // namespace divergence
}  // namespace fastkd

// Included after the overloads above so that the templates in it see them
// (a dependent call finds non-ADL overloads only if declared before the
// template's definition).
#include "../common/divergence_math.h"

namespace fastkd {
namespace cpu {
// In this capability's own namespace: a helper whose signature names no
// Vec<T> would otherwise be one inline function for all three builds.
namespace CPU_CAPABILITY {

// max of x[0, n) into a scalar; NaN propagates (fk_max). Four running
// maxima: with one, every vector would wait on the latency of the last max.
template <class W>
W fk_row_max(const W* x, int64_t n) {
  using divergence::Vec;
  using divergence::fk_max;
  constexpr int64_t L = Vec<W>::size();
  const Vec<W> neg_inf(-std::numeric_limits<W>::infinity());
  Vec<W> max0 = neg_inf, max1 = neg_inf, max2 = neg_inf, max3 = neg_inf;
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    max0 = fk_max(max0, Vec<W>::loadu(x + j));
    max1 = fk_max(max1, Vec<W>::loadu(x + j + L));
    max2 = fk_max(max2, Vec<W>::loadu(x + j + 2 * L));
    max3 = fk_max(max3, Vec<W>::loadu(x + j + 3 * L));
  }
  for (; j + L <= n; j += L) max0 = fk_max(max0, Vec<W>::loadu(x + j));
  const Vec<W> vmax = fk_max(fk_max(max0, max1), fk_max(max2, max3));
  W lanes[L];
  vmax.store(lanes);
  W best = -std::numeric_limits<W>::infinity();
  for (W lane : lanes) best = divergence::fk_max(best, lane);
  for (; j < n; ++j) best = divergence::fk_max(best, x[j]);
  return best;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
