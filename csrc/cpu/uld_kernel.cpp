// The ULD row softmax on CPU (docs/spec.md §1.14): the float32 probabilities
// of one row, whose exponentials were the largest share of a row's time once
// the sort became mostly bucket passes (uld_buckets.h).
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags); csrc/cpu/uld.cpp
// picks one at run time.
//
// exp is divergence::fk_exp_normaliser (≤ 2 ulp with AVX512, at::vec's
// exp_u20 elsewhere): its arguments are (x − max) / T ≤ 0, −inf or NaN, the
// range it is accurate on. The sum is taken in float lanes over blocks of
// kBlock entries (a few dozen terms per lane) and the blocks' sums in
// float64, so its rounding does not grow with the vocabulary.
#include "uld_kernel.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

using divergence::Vec;  // at::vec::Vectorized<T> of this capability
constexpr int64_t kBlock = 1024;

}  // namespace

bool uld_softmax_row(const float* x, int64_t n, float inv_temperature, float* out) {
  constexpr int64_t L = Vec<float>::size();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // the maximum; a NaN entry may or may not win, and makes the row NaN either way
  Vec<float> vmax(neg_inf);
  int64_t j = 0;
  for (; j + L <= n; j += L) vmax = at::vec::maximum(vmax, Vec<float>::loadu(x + j));
  float m = divergence::fk_lane_max(vmax, neg_inf);
  for (int64_t t = j; t < n; ++t) m = std::max(m, x[t]);
  // (x − m) is NaN for an all −inf row or a +inf entry; NaN inputs stay NaN
  const Vec<float> vm(m), vinv(inv_temperature);
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    Vec<float> block(0.0f);
    for (j = start; j + L <= stop; j += L) {
      const Vec<float> e = divergence::fk_exp_normaliser((Vec<float>::loadu(x + j) - vm) * vinv);
      e.store(out + j);
      block = block + e;
    }
    total += divergence::fk_lane_sum(block);
    for (; j < stop; ++j) {
      out[j] = std::exp((x[j] - m) * inv_temperature);
      total += static_cast<double>(out[j]);
    }
  }
  const float inv_total = static_cast<float>(1.0 / total);
  const Vec<float> vscale(inv_total);
  Vec<float> nan_lanes(0.0f);
  for (j = 0; j + L <= n; j += L) {
    const Vec<float> p = Vec<float>::loadu(out + j) * vscale;
    p.store(out + j);
    nan_lanes = nan_lanes | (p != p);
  }
  bool finite = nan_lanes.zero_mask() == (1 << L) - 1;  // no lane ever NaN
  for (; j < n; ++j) {
    out[j] *= inv_total;
    finite &= !std::isnan(out[j]);
  }
  return finite;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
