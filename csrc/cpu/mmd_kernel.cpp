// The gaussian MMD block kernel on CPU: from a block of dot products a_i·b_j
// (one GEMM, done by the caller) to the block's kernel sum (forward) or its
// gradient coefficients (backward), in one pass over the block with every
// bandwidth's exponential evaluated lane-parallel. The ATen formulation this
// replaces made about twenty elementwise passes over each block (distance,
// clamp, one exp, scale and accumulation per bandwidth, each through memory).
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags); csrc/cpu/mmd.cpp
// picks one at run time from what the CPU supports.
//
// exp is at::vec's Sleef exp (≤ 1 ulp), not the faster exp_u20: MMD² is a
// small difference of block means of size ~Σ_σ 1, which amplifies a
// systematic relative error in k by that ratio.
#include "mmd_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

using divergence::Vec;  // at::vec::Vectorized<T> of this capability

// Rows per parallel task: a task's rows × cols block stays in cache.
constexpr int64_t kGrainRows = 4;

// sq = max(‖a‖² + ‖b‖² − 2 a·b, 0) for one vector of columns (NaN stays NaN).
template <class T>
inline Vec<T> squared_distance(Vec<T> dot, Vec<T> a_norm, Vec<T> b_norm) {
  return at::vec::maximum(a_norm + b_norm - dot * Vec<T>(T(2)), Vec<T>(T(0)));
}

template <class T>
inline T squared_distance(T dot, T a_norm, T b_norm) {
  const T sq = a_norm + b_norm - T(2) * dot;
  return sq != sq ? sq : std::max(sq, T(0));
}

template <class T>
T lane_total(Vec<T> v) {
  std::array<T, Vec<T>::size()> lanes;
  v.store(lanes.data());
  T total = T(0);
  for (T lane : lanes) total += lane;
  return total;
}

// Σ_j k(a_i, b_j) over columns [begin, end) of one row.
template <class T>
double row_segment_sum(const GaussianBlockArgs<T>& w, const T* dots, T a_norm, int64_t begin,
                       int64_t end) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> va(a_norm);
  Vec<T> acc(T(0));
  int64_t j = begin;
  for (; j + L <= end; j += L) {
    const Vec<T> sq = squared_distance(Vec<T>::loadu(dots + j), va, Vec<T>::loadu(w.b_norm + j));
    for (int64_t s = 0; s < w.bandwidths; ++s) acc = acc + (sq * Vec<T>(w.exponents[s])).exp();
  }
  double total = lane_total(acc);
  for (; j < end; ++j) {
    const T sq = squared_distance(dots[j], a_norm, w.b_norm[j]);
    for (int64_t s = 0; s < w.bandwidths; ++s) total += std::exp(sq * w.exponents[s]);
  }
  return total;
}

// dots_ij ← Σ_σ slope_σ exp(exponent_σ sq_ij) over columns [begin, end) of one row.
template <class T>
void row_segment_coef(const GaussianBlockArgs<T>& w, T* dots, T a_norm, int64_t begin, int64_t end) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> va(a_norm);
  int64_t j = begin;
  for (; j + L <= end; j += L) {
    const Vec<T> sq = squared_distance(Vec<T>::loadu(dots + j), va, Vec<T>::loadu(w.b_norm + j));
    Vec<T> coef(T(0));
    for (int64_t s = 0; s < w.bandwidths; ++s) {
      coef = coef + (sq * Vec<T>(w.exponents[s])).exp() * Vec<T>(w.slopes[s]);
    }
    coef.store(dots + j);
  }
  for (; j < end; ++j) {
    const T sq = squared_distance(dots[j], a_norm, w.b_norm[j]);
    T coef = T(0);
    for (int64_t s = 0; s < w.bandwidths; ++s) coef += std::exp(sq * w.exponents[s]) * w.slopes[s];
    dots[j] = coef;
  }
}

template <class T>
double block_sum(const GaussianBlockArgs<T>& w) {
  // Per-row totals summed in order afterwards: the result does not depend on
  // the number of threads.
  std::vector<double> row_totals(w.rows, 0.0);
  at::parallel_for(0, w.rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* dots = w.dots + i * w.ld;
      const int64_t d = w.diag < 0 ? -1 : w.diag + i;
      if (d < 0 || d >= w.cols) {
        row_totals[i] = row_segment_sum(w, dots, w.a_norm[i], 0, w.cols);
      } else {
        // The point against itself: distance exactly 0, k = Σ_σ 1 (or left out).
        row_totals[i] = row_segment_sum(w, dots, w.a_norm[i], 0, d) +
                        row_segment_sum(w, dots, w.a_norm[i], d + 1, w.cols) +
                        (w.unbiased ? 0.0 : double(w.bandwidths));
      }
    }
  });
  double total = 0.0;
  for (double t : row_totals) total += t;
  return total;
}

template <class T>
void block_coef(const GaussianBlockArgs<T>& w) {
  at::parallel_for(0, w.rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* dots = w.dots + i * w.ld;
      const int64_t d = w.diag < 0 ? -1 : w.diag + i;
      if (d < 0 || d >= w.cols) {
        row_segment_coef(w, dots, w.a_norm[i], 0, w.cols);
      } else {
        // a_i − a_i = 0: the diagonal contributes nothing to the gradient.
        row_segment_coef(w, dots, w.a_norm[i], 0, d);
        row_segment_coef(w, dots, w.a_norm[i], d + 1, w.cols);
        dots[d] = T(0);
      }
    }
  });
}

}  // namespace

double gaussian_block_sum(const GaussianBlockArgs<float>& args) { return block_sum(args); }
double gaussian_block_sum(const GaussianBlockArgs<double>& args) { return block_sum(args); }
void gaussian_block_coef(const GaussianBlockArgs<float>& args) { block_coef(args); }
void gaussian_block_coef(const GaussianBlockArgs<double>& args) { block_coef(args); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
