// TinyBERT's MSE and DistilBERT's cosine loss per row on CPU (docs/spec.md
// §5.4), lane-parallel; formulas: csrc/common/hidden_state_op.h.
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags);
// csrc/cpu/hidden_state.cpp picks one at run time.
//
// One task per chunk of rows (at::parallel_for). Each row's sums come from
// one thread, in a fixed lane order, so the result does not depend on the
// thread count. MSE: one pass sums (h − g)², a second writes the gradients.
// Cosine: one pass sums h·g, h·h and g·g, a second writes the gradients. The
// second pass reads the row again from cache (two rows of a hidden-state
// width fit in L1 / L2), so each input is read from memory once. bfloat16 /
// float16 are converted to float in registers; sums are taken in float lanes
// (double lanes for double) and the lanes added in float64.
#include "hidden_state_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../common/hidden_state_op.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

using divergence::fk_lane_sum;
using divergence::Vec;  // at::vec::Vectorized<T> of this capability

// Lanes [0, cnt) of p as A, 0 beyond (cnt ≤ Vec<A>::size()).
template <class A, class S>
inline Vec<A> load_lanes(const S* p, int64_t cnt) {
  constexpr int64_t L = Vec<A>::size();
  if constexpr (std::is_same_v<A, S>) {
    return cnt == L ? Vec<A>::loadu(p) : Vec<A>::loadu(p, cnt);
  } else {
    if (cnt == L) {
      Vec<A> v;
      at::vec::load_to_float(p, v);
      return v;
    }
    A lanes[L] = {};
    for (int64_t k = 0; k < cnt; ++k) lanes[k] = static_cast<A>(p[k]);
    return Vec<A>::loadu(lanes);
  }
}

// Lanes [0, cnt) of v rounded to S at p.
template <class A, class S>
inline void store_lanes(const Vec<A>& v, S* p, int64_t cnt) {
  constexpr int64_t L = Vec<A>::size();
  if constexpr (std::is_same_v<A, S>) {
    if (cnt == L) {
      v.store(p);
    } else {
      v.store(p, cnt);
    }
  } else {
    at::vec::convert_from_float<S>(v, v).store(p, cnt);
  }
}

// ℓ = (1/D) Σ (h − g)², and coef · (h − g) into grad_h (its negation into
// grad_g), coef = 2 · grad_scale / D.
template <class S, class A>
A mse_row(const S* h, const S* g, int64_t dim, A coef, S* grad_h, S* grad_g) {
  constexpr int64_t L = Vec<A>::size();
  Vec<A> acc(A(0));
  for (int64_t d = 0; d < dim; d += L) {
    const int64_t cnt = std::min(L, dim - d);
    const Vec<A> diff = load_lanes<A>(h + d, cnt) - load_lanes<A>(g + d, cnt);
    acc = at::vec::fmadd(diff, diff, acc);
  }
  if (grad_h != nullptr || grad_g != nullptr) {
    const Vec<A> vcoef(coef);
    for (int64_t d = 0; d < dim; d += L) {
      const int64_t cnt = std::min(L, dim - d);
      const Vec<A> step = vcoef * (load_lanes<A>(h + d, cnt) - load_lanes<A>(g + d, cnt));
      if (grad_h != nullptr) store_lanes(step, grad_h + d, cnt);
      if (grad_g != nullptr) store_lanes(Vec<A>(A(0)) - step, grad_g + d, cnt);
    }
  }
  return static_cast<A>(fk_lane_sum(acc) / static_cast<double>(dim));
}

// ℓ = 1 − h·g / √((h·h + ε)(g·g + ε)) and its gradients · grad_scale.
template <class S, class A>
A cosine_row(const S* h, const S* g, int64_t dim, A grad_scale, S* grad_h, S* grad_g) {
  constexpr int64_t L = Vec<A>::size();
  Vec<A> dot_acc(A(0)), hh_acc(A(0)), gg_acc(A(0));
  for (int64_t d = 0; d < dim; d += L) {
    const int64_t cnt = std::min(L, dim - d);
    const Vec<A> x = load_lanes<A>(h + d, cnt), y = load_lanes<A>(g + d, cnt);
    dot_acc = at::vec::fmadd(x, y, dot_acc);
    hh_acc = at::vec::fmadd(x, x, hh_acc);
    gg_acc = at::vec::fmadd(y, y, gg_acc);
  }
  const A eps = static_cast<A>(hidden_state::kCosineEps);
  const A dot = static_cast<A>(fk_lane_sum(dot_acc));
  const A norm_h = static_cast<A>(fk_lane_sum(hh_acc)) + eps;
  const A norm_g = static_cast<A>(fk_lane_sum(gg_acc)) + eps;
  // as the reference: the square root of the product of the guarded norms
  const A denom = std::sqrt(norm_h * norm_g);
  const A cosine = dot / denom;
  if (grad_h != nullptr || grad_g != nullptr) {
    // dℓ/dh = (cos / ‖h‖²) h − g / denom, explicitly fused: one rounding
    // whatever the compiler contracts
    const Vec<A> cross(grad_scale / denom);
    const Vec<A> self_h(grad_scale * cosine / norm_h), self_g(grad_scale * cosine / norm_g);
    for (int64_t d = 0; d < dim; d += L) {
      const int64_t cnt = std::min(L, dim - d);
      const Vec<A> x = load_lanes<A>(h + d, cnt), y = load_lanes<A>(g + d, cnt);
      if (grad_h != nullptr) store_lanes(at::vec::fmsub(self_h, x, cross * y), grad_h + d, cnt);
      if (grad_g != nullptr) store_lanes(at::vec::fmsub(self_g, y, cross * x), grad_g + d, cnt);
    }
  }
  return A(1) - cosine;
}

template <class S, class A>
void rows_impl(const HiddenStateRowsArgs<S, A>& a) {
  const int64_t dim = a.dim;
  const A scale = static_cast<A>(a.grad_scale);
  const A mse_coef = static_cast<A>(2.0 * a.grad_scale / static_cast<double>(dim));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      S* gh = a.grad_student != nullptr ? a.grad_student + i * dim : nullptr;
      S* gg = a.grad_teacher != nullptr ? a.grad_teacher + i * dim : nullptr;
      if (a.row_mask != nullptr && !a.row_mask[i]) {
        a.row_loss[i] = 0;
        if (gh != nullptr) std::fill(gh, gh + dim, S(0));
        if (gg != nullptr) std::fill(gg, gg + dim, S(0));
        continue;
      }
      const S* h = a.student + i * a.student_stride;
      const S* g = a.teacher + i * a.teacher_stride;
      a.row_loss[i] = a.cosine ? cosine_row<S, A>(h, g, dim, scale, gh, gg)
                               : mse_row<S, A>(h, g, dim, mse_coef, gh, gg);
    }
  });
}

}  // namespace

void hidden_state_rows(const HiddenStateRowsArgs<float, float>& args) { rows_impl(args); }
void hidden_state_rows(const HiddenStateRowsArgs<double, double>& args) { rows_impl(args); }
void hidden_state_rows(const HiddenStateRowsArgs<c10::BFloat16, float>& args) { rows_impl(args); }
void hidden_state_rows(const HiddenStateRowsArgs<c10::Half, float>& args) { rows_impl(args); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
