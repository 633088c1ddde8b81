// Shared by the CPU and CUDA implementations of fastkd::mmd_forward /
// fastkd::mmd_backward (csrc/cpu/mmd.cpp, csrc/cuda/mmd.cu), and mirrored by
// the Triton launcher (kernels/mmd.py, _centred): the exact centring of the
// samples for the distance kernels, and the bandwidth limits.
//
// Distances do not change under a common shift, but the rounding of the norm
// form ‖a‖² + ‖b‖² − 2 a·b scales with the norms: a common offset of 1e3 on
// unit-scale data costs percents in float32, and beyond ~1e19 ‖a‖² overflows.
// Each feature is therefore shifted by a centre c_d chosen so that every
// subtraction v − c_d is exact (Sterbenz: c/2 <= v <= 2c), which leaves every
// difference a − b, and so every distance and every gradient, bit for bit
// what it was. Such a c_d exists when all of the feature's values (x and y
// together, in [lo, hi]) share a sign and |hi| <= 4 |lo|: c_d is the midpoint
// clamped to [hi/2, 2 lo] (mirrored for negative values). Otherwise c_d = 0:
// the offset is then at most a few times the feature's spread, and costs at
// most a small factor of accuracy. Only min, max and exact elementwise
// operations are used: the centre does not depend on summation order or on
// the number of threads. A NaN or an infinity leaves its feature uncentred.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <utility>

namespace fastkd {
namespace mmd {

// fastkd.reference.mmd.MIN_BANDWIDTH: below ~1e-154 the gaussian's 1/(2σ²)
// is no finite double, so smaller bandwidths are rejected on every backend.
constexpr double kMinBandwidth = 1e-150;

// An exponent or slope (−1/(2σ²), −1/σ², −1/σ) held within half the largest
// finite value of `type`: where it overflows float32, exp(e·sq) is still 0
// for every distance whose square is a normal float32, and 1 at distance 0
// (where −inf would give 0·inf = NaN); twice it stays finite.
inline double finite_in(double value, at::ScalarType type) {
  const double limit = type == at::kDouble ? std::numeric_limits<double>::max() / 2
                                           : double(std::numeric_limits<float>::max()) / 2;
  return std::max(-limit, std::min(limit, value));
}

// x and y (same dtype, (N, D) and (M, D)) less the exact centre described
// above; returned in their dtype.
inline std::pair<at::Tensor, at::Tensor> exactly_centred(const at::Tensor& x, const at::Tensor& y) {
  const at::Tensor lo = at::minimum(x.amin(0), y.amin(0));
  const at::Tensor hi = at::maximum(x.amax(0), y.amax(0));
  const at::Tensor mid = lo * 0.5 + hi * 0.5;
  const at::Tensor positive = (lo > 0).logical_and_(hi <= lo * 4);
  const at::Tensor negative = (hi < 0).logical_and_(lo >= hi * 4);
  const at::Tensor zero = at::zeros({}, lo.options());
  const at::Tensor centre = at::where(
      positive, at::clamp(mid, hi * 0.5, lo * 2),
      at::where(negative, at::clamp(mid, hi * 2, lo * 0.5), zero));
  return {x - centre, y - centre};
}

}  // namespace mmd
}  // namespace fastkd
