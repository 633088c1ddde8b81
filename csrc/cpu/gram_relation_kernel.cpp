// The SP, PKT and CC row passes on CPU (docs/spec.md §2), lane-parallel: up
// to three passes over a row of N entries (sums, loss terms, gradient), the
// row staying in cache between them.
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags);
// csrc/cpu/gram_relation.cpp picks one at run time.
//
// Elementwise arithmetic is in the row's dtype (float32 for float32, bfloat16
// and float16 inputs); every sum is taken in lanes over blocks of kBlock
// entries and the blocks' sums in float64, in a fixed order, so the result
// does not depend on the thread count and its rounding does not grow with N.
// NaN entries stay NaN.
#include "gram_relation_kernel.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/gram_relation.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

using divergence::Cmp;
using divergence::fk_lane_sum;
using divergence::fk_where;
using divergence::Vec;  // at::vec::Vectorized<T> of this capability
constexpr int64_t kBlock = 1024;

// Σ_j f(j) over a row, f returning one vector of lanes [j, j + L) (tail lanes
// beyond n must come back 0), in float64 across blocks; `count` sums at once.
template <class T, int count, class F>
void block_sums(int64_t n, F lanes_at, double (&total)[count]) {
  constexpr int64_t L = Vec<T>::size();
  for (double& t : total) t = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    Vec<T> block[count];
    for (auto& b : block) b = Vec<T>(T(0));
    for (int64_t j = start; j < stop; j += L) lanes_at(j, std::min<int64_t>(L, stop - j), block);
    for (int c = 0; c < count; ++c) total[c] += fk_lane_sum(block[c]);
  }
}

// lanes [j, j + cnt) of x, 0 beyond
template <class T>
inline Vec<T> load(const T* x, int64_t j, int64_t cnt) {
  return cnt == Vec<T>::size() ? Vec<T>::loadu(x + j) : Vec<T>::loadu(x + j, cnt);
}

template <class T>
inline void store(const Vec<T>& v, T* x, int64_t j, int64_t cnt) {
  if (cnt == Vec<T>::size()) {
    v.store(x + j);
  } else {
    v.store(x + j, cnt);
  }
}

// all bits set in lanes [0, cnt)
template <class T>
inline Vec<T> lanes_below(int64_t cnt) {
  return Vec<T>::arange(T(0), T(1)) < Vec<T>(static_cast<T>(cnt));
}

// max(x, floor) that keeps NaN
inline double nan_max(double x, double floor) { return x < floor ? floor : x; }

template <class T>
double sp_row_impl(T* gs_row, const T* gt_row, int64_t n, double inv_n2, bool student_grad) {
  double norms[2];
  block_sums<T, 2>(n, [&](int64_t j, int64_t cnt, Vec<T>* acc) {
    const Vec<T> s = load(gs_row, j, cnt), t = load(gt_row, j, cnt);
    acc[0] += s * s;
    acc[1] += t * t;
  }, norms);
  const double norm_s = std::sqrt(norms[0]);
  const double r_s = nan_max(norm_s, gram::kNormalizeEps);
  const double r_t = nan_max(std::sqrt(norms[1]), gram::kNormalizeEps);
  // divisions, not products with reciprocals: a product could be fused into
  // the subtraction below (FMA contraction) on one side only, and a student
  // equal to the teacher must give exactly ŷ_s = ŷ_t
  const Vec<T> vr_s(static_cast<T>(r_s)), vr_t(static_cast<T>(r_t));
  double terms[2];  // Σ diff², Σ ŷ_s · diff
  block_sums<T, 2>(n, [&](int64_t j, int64_t cnt, Vec<T>* acc) {
    const Vec<T> ys = load(gs_row, j, cnt) / vr_s;
    const Vec<T> diff = load(gt_row, j, cnt) / vr_t - ys;
    acc[0] += diff * diff;
    acc[1] += ys * diff;
  }, terms);
  if (student_grad) {
    // dŷ = −2 (ŷ_t − ŷ_s) / N², dG = (dŷ − ŷ (ŷ·dŷ)) / r (the projection only above eps)
    const double proj = norm_s > gram::kNormalizeEps ? -2.0 * inv_n2 * terms[1] : 0.0;
    const Vec<T> vproj(static_cast<T>(proj)), vscale(static_cast<T>(-2.0 * inv_n2));
    constexpr int64_t L = Vec<T>::size();
    for (int64_t j = 0; j < n; j += L) {
      const int64_t cnt = std::min<int64_t>(L, n - j);
      const Vec<T> ys = load(gs_row, j, cnt) / vr_s;
      const Vec<T> dy = vscale * (load(gt_row, j, cnt) / vr_t - ys);
      store<T>((dy - ys * vproj) / vr_s, gs_row, j, cnt);
    }
  }
  return terms[0];
}

// S = max((h + 1) / 2, 0), a NaN passing through
template <class T>
inline Vec<T> similarity(const Vec<T>& h) {
  const Vec<T> s = (h + Vec<T>(T(1))) * Vec<T>(T(0.5));
  return fk_where<Cmp::LT>(s, Vec<T>(T(0)), Vec<T>(T(0)), s);
}

template <class T>
double pkt_row_impl(T* hs_row, const T* ht_row, int64_t n, double inv_n2, double eps, bool student_grad) {
  constexpr int64_t L = Vec<T>::size();
  double sums[2];
  block_sums<T, 2>(n, [&](int64_t j, int64_t cnt, Vec<T>* acc) {
    // tail lanes load h = 0, S = ½: blended out
    const Vec<T> keep = lanes_below<T>(cnt);
    acc[0] += Vec<T>::blendv(Vec<T>(T(0)), similarity(load(hs_row, j, cnt)), keep);
    acc[1] += Vec<T>::blendv(Vec<T>(T(0)), similarity(load(ht_row, j, cnt)), keep);
  }, sums);
  const Vec<T> inv_ss(static_cast<T>(1.0 / sums[0])), inv_st(static_cast<T>(1.0 / sums[1]));
  const Vec<T> veps(static_cast<T>(eps));
  double terms[2];  // Σ p_t log((p_t + eps)/(p_s + eps)), Σ p_t p_s / (p_s + eps)
  block_sums<T, 2>(n, [&](int64_t j, int64_t cnt, Vec<T>* acc) {
    const Vec<T> keep = lanes_below<T>(cnt);
    const Vec<T> p_s = similarity(load(hs_row, j, cnt)) * inv_ss;
    const Vec<T> p_t = similarity(load(ht_row, j, cnt)) * inv_st;
    const Vec<T> ratio = p_t / (p_s + veps);
    acc[0] += Vec<T>::blendv(Vec<T>(T(0)), p_t * ((p_t + veps) / (p_s + veps)).log(), keep);
    acc[1] += Vec<T>::blendv(Vec<T>(T(0)), ratio * p_s, keep);
  }, terms);
  if (student_grad) {
    // dP = −P_t / (P_s + eps) / N², dS = (dP − Σ_j dP P_s) / rowsum(S_s), dH = dS / 2,
    // 0 where the clamp acted
    const Vec<T> vdot(static_cast<T>(-inv_n2 * terms[1])), vneg(static_cast<T>(-inv_n2));
    const Vec<T> half_inv_ss(static_cast<T>(0.5 / sums[0])), zero(T(0));
    for (int64_t j = 0; j < n; j += L) {
      const int64_t cnt = std::min<int64_t>(L, n - j);
      const Vec<T> h = load(hs_row, j, cnt);
      const Vec<T> raw = (h + Vec<T>(T(1))) * Vec<T>(T(0.5));
      const Vec<T> p_s = similarity(h) * inv_ss;
      const Vec<T> p_t = similarity(load(ht_row, j, cnt)) * inv_st;
      const Vec<T> d_p = vneg * p_t / (p_s + veps);
      store<T>(fk_where<Cmp::LT>(raw, zero, zero, (d_p - vdot) * half_inv_ss), hs_row, j, cnt);
    }
  }
  return terms[0];
}

// CC's Taylor series and its derivative (gram::cc_taylor) lane by lane; the
// step coefficients 2γ / (P − q) come precomputed (products, not divisions).
template <class T>
inline void cc_taylor_lanes(const Vec<T>& g, const T* step_coef, int64_t order, T two_gamma, Vec<T>& k,
                            Vec<T>& dk) {
  const Vec<T> one(T(1));
  k = one;
  dk = one;
  for (int64_t q = 0; q < order; ++q) {
    const Vec<T> step = Vec<T>(step_coef[q]) * g;
    k = one + step * k;
    if (q > 0) dk = one + step * dk;
  }
  dk = dk * Vec<T>(two_gamma);
  if (order >= 2) {
    // g = −inf: the alternating ±inf terms sum to NaN (see gram::cc_taylor)
    const Vec<T> minus_inf = (g < Vec<T>(T(0))) & (g * Vec<T>(T(0.5)) == g);
    const Vec<T> nan(std::numeric_limits<T>::quiet_NaN());
    k = Vec<T>::blendv(k, nan, minus_inf);
    dk = Vec<T>::blendv(dk, nan, minus_inf);
  }
}

template <class T>
double cc_row_impl(T* gs_row, const T* gt_row, int64_t n, double gamma, int64_t order, bool student_grad) {
  const T two_gamma = static_cast<T>(2.0 * gamma);
  const Vec<T> scale(static_cast<T>(std::exp(-2.0 * gamma)));
  T step_coef[gram::kCcMaxOrder];
  for (int64_t q = 0; q < order; ++q) step_coef[q] = two_gamma / static_cast<T>(order - q);
  double sq[1];  // Σ diff², the tail lanes' k_s = k_t giving diff = 0
  block_sums<T, 1>(n, [&](int64_t j, int64_t cnt, Vec<T>* acc) {
    Vec<T> k_s, dk_s, k_t, dk_t;
    cc_taylor_lanes(load(gs_row, j, cnt), step_coef, order, two_gamma, k_s, dk_s);
    cc_taylor_lanes(load(gt_row, j, cnt), step_coef, order, two_gamma, k_t, dk_t);
    const Vec<T> diff = scale * (k_s - k_t);
    acc[0] += diff * diff;
    if (student_grad) store<T>(diff * scale * dk_s, gs_row, j, cnt);
  }, sq);
  return sq[0];
}

}  // namespace

double cc_row(float* gs_row, const float* gt_row, int64_t n, double gamma, int64_t order, bool student_grad) {
  return cc_row_impl(gs_row, gt_row, n, gamma, order, student_grad);
}
double cc_row(double* gs_row, const double* gt_row, int64_t n, double gamma, int64_t order, bool student_grad) {
  return cc_row_impl(gs_row, gt_row, n, gamma, order, student_grad);
}
double sp_row(float* gs_row, const float* gt_row, int64_t n, double inv_n2, bool student_grad) {
  return sp_row_impl(gs_row, gt_row, n, inv_n2, student_grad);
}
double sp_row(double* gs_row, const double* gt_row, int64_t n, double inv_n2, bool student_grad) {
  return sp_row_impl(gs_row, gt_row, n, inv_n2, student_grad);
}
double pkt_row(float* hs_row, const float* ht_row, int64_t n, double inv_n2, double eps, bool student_grad) {
  return pkt_row_impl(hs_row, ht_row, n, inv_n2, eps, student_grad);
}
double pkt_row(double* hs_row, const double* ht_row, int64_t n, double inv_n2, double eps, bool student_grad) {
  return pkt_row_impl(hs_row, ht_row, n, inv_n2, eps, student_grad);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
