// Compensated row sums for the CPU row kernels (divergence, mixture, top-k),
// compiled once per CPU capability like vec_math.h.
//
// Why every row sum is compensated (Kahan): summed lane-wise, a row of V
// terms builds chains of V/lanes additions whose rounding grows with V. In
// Σ exp the error reaches log Σ, and so every log-probability, as a shift
// common to the row, which a small divergence (near convergence, at high
// temperature) cannot absorb; in sums whose terms have both signs it is
// worse. Plain lane sums fell behind PyTorch's cascade summation there;
// compensated ones do not depend on V. (No -ffast-math: it would undo this.)
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

// Kahan sum of scalar (W = T) or SIMD (W = Vec<T>) terms.
//
// Once the sum is ±inf (an infinite divergence term) the compensation would
// be inf − inf = NaN and turn the total into NaN: a NaN compensation is reset
// to 0, so ±inf stays ±inf, and a NaN term still makes the sum NaN.
// kBounded: the terms are known to be in [0, 1] or NaN (exponentials of
// x − max ≤ 0), so the sum cannot reach inf and the reset, which lengthens
// the chain each add waits on by two instructions, is left out.
template <class W, bool kBounded = false>
struct CompensatedSum {
  W sum = W(0), compensation = W(0);
  void add(W x) {
    const W y = x - compensation;
    const W total = sum + y;
    if constexpr (kBounded) {
      compensation = (total - sum) - y;
    } else {
      compensation = zero_where_nan((total - sum) - y);
    }
    sum = total;
  }
  static W zero_where_nan(W c) {
    if constexpr (std::is_floating_point_v<W>) {
      return c == c ? c : W(0);
    } else {
      return divergence::fk_where<divergence::Cmp::UNORDERED>(c, c, W(0), c);
    }
  }
};

// Total of a SIMD compensated sum and a scalar one (the row's tail), with the
// lanes combined in double in a fixed order (results do not depend on where
// a row's vectors start, nor on the thread). AVX-512 float: the lanes are
// widened and reduced in vector registers, a dozen instructions where a
// scalar loop over 16 lanes took about a hundred, once per sum and row (a
// quarter of a row's time at V = 1024 went to such per-row work).
template <class T, bool kBounded>
double total_double(const CompensatedSum<divergence::Vec<T>, kBounded>& lanes,
                    const CompensatedSum<T, kBounded>& tail) {
  double result = double(tail.sum) - double(tail.compensation);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    // zero-masked forms with every lane kept: the plain ones start from an
    // "undefined" vector, which GCC 12 reports as uninitialised
    const __m512d sum = _mm512_castps_pd(lanes.sum), compensation = _mm512_castps_pd(lanes.compensation);
    const __m512d low = _mm512_sub_pd(
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, sum, 0))),
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, compensation, 0))));
    const __m512d high = _mm512_sub_pd(
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, sum, 1))),
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, compensation, 1))));
    const __m512d eight = _mm512_add_pd(low, high);
    const __m256d four = _mm256_add_pd(_mm512_maskz_extractf64x4_pd(0xF, eight, 0),
                                       _mm512_maskz_extractf64x4_pd(0xF, eight, 1));
    const __m128d two = _mm_add_pd(_mm256_castpd256_pd128(four), _mm256_extractf128_pd(four, 1));
    return result + (_mm_cvtsd_f64(two) + _mm_cvtsd_f64(_mm_unpackhi_pd(two, two)));
  }
#endif
  constexpr int64_t L = divergence::Vec<T>::size();
  std::array<T, L> sums, compensations;
  lanes.sum.store(sums.data());
  lanes.compensation.store(compensations.data());
  for (int64_t l = 0; l < L; ++l) result += double(sums[l]) - double(compensations[l]);
  return result;
}

template <class T, bool kBounded>
T total(const CompensatedSum<divergence::Vec<T>, kBounded>& lanes, const CompensatedSum<T, kBounded>& tail) {
  return T(total_double(lanes, tail));
}

// A row to ask the cache for while this one is computed: the row maxima are
// a row's first reads, and without the request they wait on memory.
// `bytes_per_element` of the row's dtype; data null: none.
struct RowAhead {
  const char* data = nullptr;
  int64_t bytes_per_element = 0;
};

// Σ_j exp((x_j − max)/T) over x[0, V), summed in T and returned in double;
// with `out` (which may be x itself), the exponentials are stored there too.
// The exponentials are 2^((x − max)·log2 e/T) (fk_exp2_normaliser), the
// scale rounded once. Asks for `ahead` along the way.
// Blocks of four vectors are summed pairwise before their compensated add
// (two roundings per block, whatever V): one add per vector would make
// every vector wait on the latency of the four dependent operations of the
// last add.
template <class T>
double exp_sum(const T* x, int64_t V, T max, T inv_t, T* out, RowAhead ahead = {}) {
  using divergence::Vec;
  constexpr int64_t L = Vec<T>::size();
  const T scale = T(double(inv_t) * divergence::kLog2E);
  const Vec<T> vmax(max), vscale(scale);
  CompensatedSum<Vec<T>, true> lanes;
  const auto exp_at = [&](int64_t j) {
    // one cache line per float32 vector (half a line for 16-bit inputs)
    if (ahead.data != nullptr) __builtin_prefetch(ahead.data + j * ahead.bytes_per_element);
    const Vec<T> e = divergence::fk_exp2_normaliser((Vec<T>::loadu(x + j) - vmax) * vscale);
    if (out != nullptr) e.store(out + j);
    return e;
  };
  int64_t j = 0;
  for (; j + 4 * L <= V; j += 4 * L) {
    const Vec<T> e0 = exp_at(j), e1 = exp_at(j + L), e2 = exp_at(j + 2 * L), e3 = exp_at(j + 3 * L);
    lanes.add((e0 + e1) + (e2 + e3));
  }
  for (; j + L <= V; j += L) lanes.add(exp_at(j));
  CompensatedSum<T, true> tail;
  for (; j < V; ++j) {
    const T e = std::exp2((x[j] - max) * scale);
    if (out != nullptr) out[j] = e;
    tail.add(e);
  }
  return total_double(lanes, tail);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
