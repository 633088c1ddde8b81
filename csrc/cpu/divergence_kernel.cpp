// Fused softmax-divergence forward (+ gradient) on CPU, streaming each row.
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags); csrc/cpu/divergence.cpp
// picks one at run time from what the CPU supports.
//
// Per row (rows in parallel, at::parallel_for):
//   pass 1  max of s and t                           read s, t (from memory)
//   pass 2  Σ exp(s/T − max), Σ exp(t/T − max) → lse  read s, t (from cache)
//   pass 3  loss, Σu, Σv  (KL with student gradient only: also writes the
//           gradient, (q − p)/T, since Σu = −1 is known in advance)
//   pass 4  gradients (u − q Σu)/T, (v − p Σv)/T      other cases
// Memory traffic: read N·V twice (s and t), write N·V per gradient requested.
// A row of fp32 logits at V = 32000 is 125 KiB, so passes 2–4 hit L2.
// Reduced-precision rows are widened into a per-task float scratch row first.
#include "divergence_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

using namespace fastkd::divergence;

namespace {

template <class T>
T horizontal_sum(Vec<T> v) {
  std::array<T, Vec<T>::size()> lanes;
  v.store(lanes.data());
  T total = T(0);
  for (T lane : lanes) total += lane;
  return total;
}

template <class T>
T horizontal_max(Vec<T> v) {
  std::array<T, Vec<T>::size()> lanes;
  v.store(lanes.data());
  T best = -std::numeric_limits<T>::infinity();
  for (T lane : lanes) best = fk_max(best, lane);
  return best;
}

template <class T>
struct RowParams {
  T inv_temperature;
  T grad_factor;  // grad_scale / T
  Coefficient<T> coef;
  bool student_grad;
  bool teacher_grad;
};

template <class T>
Coefficient<Vec<T>> broadcast(const Coefficient<T>& k) {
  return {Vec<T>(k.c), Vec<T>(k.one_minus_c), Vec<T>(k.log_c),
          Vec<T>(k.log_one_minus_c)};
}

// log Σ_j exp(x_j / T), two passes over the (cached) row; NaN propagates and
// an all −inf row gives NaN (documented: such a row has no distribution).
template <class T>
void row_log_sum_exp(const T* s, const T* t, int64_t V, T inv_temperature,
                     T& lse_s, T& lse_t) {
  constexpr int64_t L = Vec<T>::size();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec<T> vmax_s(neg_inf), vmax_t(neg_inf);
  int64_t j = 0;
  for (; j + L <= V; j += L) {
    vmax_s = fk_max(vmax_s, Vec<T>::loadu(s + j));
    vmax_t = fk_max(vmax_t, Vec<T>::loadu(t + j));
  }
  T max_s = horizontal_max(vmax_s), max_t = horizontal_max(vmax_t);
  for (; j < V; ++j) {
    max_s = fk_max(max_s, s[j]);
    max_t = fk_max(max_t, t[j]);
  }
  // max(x)/T == max(x/T) because T > 0.
  const T shift_s = max_s * inv_temperature, shift_t = max_t * inv_temperature;
  const Vec<T> vinv(inv_temperature), vshift_s(shift_s), vshift_t(shift_t);
  Vec<T> vsum_s(T(0)), vsum_t(T(0));
  for (j = 0; j + L <= V; j += L) {
    vsum_s += (Vec<T>::loadu(s + j) * vinv - vshift_s).exp();
    vsum_t += (Vec<T>::loadu(t + j) * vinv - vshift_t).exp();
  }
  T sum_s = horizontal_sum(vsum_s), sum_t = horizontal_sum(vsum_t);
  for (; j < V; ++j) {
    sum_s += fk_exp(s[j] * inv_temperature - shift_s);
    sum_t += fk_exp(t[j] * inv_temperature - shift_t);
  }
  lse_s = shift_s + fk_log(sum_s);
  lse_t = shift_t + fk_log(sum_t);
}

// One row: returns the row loss and writes the (scaled) gradients.
template <int KIND, class T>
T divergence_row(const T* s, const T* t, int64_t V, const RowParams<T>& rp,
                 T* gs, T* gt) {
  constexpr int64_t L = Vec<T>::size();
  T lse_s, lse_t;
  row_log_sum_exp(s, t, V, rp.inv_temperature, lse_s, lse_t);

  const Vec<T> vinv(rp.inv_temperature), vlse_s(lse_s), vlse_t(lse_t);
  const Vec<T> vfactor(rp.grad_factor);
  const Coefficient<Vec<T>> vcoef = broadcast(rp.coef);
  // KL with only the student gradient: Σu = −Σp = −1, so the gradient is
  // known in pass 3 and pass 4 is skipped.
  constexpr bool kl = KIND == KL;
  const bool fused_grad = kl && rp.student_grad && !rp.teacher_grad;
  const Vec<T> vminus_one(T(-1));

  Vec<T> vloss(T(0)), vsum_u(T(0)), vsum_v(T(0));
  int64_t j = 0;
  for (; j + L <= V; j += L) {
    const Vec<T> logq = Vec<T>::loadu(s + j) * vinv - vlse_s;
    const Vec<T> logp = Vec<T>::loadu(t + j) * vinv - vlse_t;
    const ElementTerms<Vec<T>> e = element_terms<KIND>(logp, logq, vcoef);
    vloss += e.loss;
    vsum_u += e.u;
    vsum_v += e.v;
    if (fused_grad) softmax_grad(e.u, e.q, vminus_one, vfactor).store(gs + j);
  }
  T loss = horizontal_sum(vloss);
  T sum_u = horizontal_sum(vsum_u), sum_v = horizontal_sum(vsum_v);
  for (; j < V; ++j) {
    const T logq = s[j] * rp.inv_temperature - lse_s;
    const T logp = t[j] * rp.inv_temperature - lse_t;
    const ElementTerms<T> e = element_terms<KIND>(logp, logq, rp.coef);
    loss += e.loss;
    sum_u += e.u;
    sum_v += e.v;
    if (fused_grad) gs[j] = softmax_grad(e.u, e.q, T(-1), rp.grad_factor);
  }
  if (fused_grad || !(rp.student_grad || rp.teacher_grad)) return loss;

  const Vec<T> vsu(sum_u), vsv(sum_v);
  for (j = 0; j + L <= V; j += L) {
    const Vec<T> logq = Vec<T>::loadu(s + j) * vinv - vlse_s;
    const Vec<T> logp = Vec<T>::loadu(t + j) * vinv - vlse_t;
    const ElementTerms<Vec<T>> e = element_terms<KIND>(logp, logq, vcoef);
    if (rp.student_grad) softmax_grad(e.u, e.q, vsu, vfactor).store(gs + j);
    if (rp.teacher_grad) softmax_grad(e.v, e.p, vsv, vfactor).store(gt + j);
  }
  for (; j < V; ++j) {
    const T logq = s[j] * rp.inv_temperature - lse_s;
    const T logp = t[j] * rp.inv_temperature - lse_t;
    const ElementTerms<T> e = element_terms<KIND>(logp, logq, rp.coef);
    if (rp.student_grad) gs[j] = softmax_grad(e.u, e.q, sum_u, rp.grad_factor);
    if (rp.teacher_grad) gt[j] = softmax_grad(e.v, e.p, sum_v, rp.grad_factor);
  }
  return loss;
}

template <class T>
Coefficient<T> make_coefficient(double c) {
  return {T(c), T(1.0 - c), T(std::log(c)), T(std::log1p(-c))};
}

// Rows of `scalar_t` logits, accumulated in `acc_t` (float, or double for
// double inputs).
template <int KIND, class scalar_t, class acc_t>
void divergence_rows(const DivergenceArgs& a) {
  const auto* student = static_cast<const scalar_t*>(a.student);
  const auto* teacher = static_cast<const scalar_t*>(a.teacher);
  auto* row_loss = static_cast<acc_t*>(a.row_loss);
  auto* student_grad = static_cast<scalar_t*>(a.student_grad);
  auto* teacher_grad = static_cast<scalar_t*>(a.teacher_grad);
  const int64_t V = a.vocab;
  RowParams<acc_t> rp;
  rp.inv_temperature = acc_t(a.inv_temperature);
  rp.grad_factor = acc_t(a.grad_scale * a.inv_temperature);
  rp.coef = make_coefficient<acc_t>(a.coef);
  rp.student_grad = student_grad != nullptr;
  rp.teacher_grad = teacher_grad != nullptr;
  constexpr bool widen = !std::is_same_v<scalar_t, acc_t>;

  // Grain: enough rows that a task streams at least ~256 KiB.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(V, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    // Widened copies of one row (and its gradients) for bf16 / fp16 inputs.
    std::vector<acc_t> scratch(widen ? 4 * V : 0);
    acc_t* s_buf = scratch.data();
    acc_t* t_buf = s_buf + (widen ? V : 0);
    acc_t* gs_buf = t_buf + (widen ? V : 0);
    acc_t* gt_buf = gs_buf + (widen ? V : 0);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* gs_row = rp.student_grad ? student_grad + i * V : nullptr;
      scalar_t* gt_row = rp.teacher_grad ? teacher_grad + i * V : nullptr;
      if (a.row_mask != nullptr && !a.row_mask[i]) {
        row_loss[i] = acc_t(0);
        if (gs_row) std::memset(static_cast<void*>(gs_row), 0, V * sizeof(scalar_t));
        if (gt_row) std::memset(static_cast<void*>(gt_row), 0, V * sizeof(scalar_t));
        continue;
      }
      const scalar_t* s_row = student + i * a.student_row_stride;
      const scalar_t* t_row = teacher + i * a.teacher_row_stride;
      if constexpr (widen) {
        at::vec::convert(s_row, s_buf, V);
        at::vec::convert(t_row, t_buf, V);
        row_loss[i] = divergence_row<KIND, acc_t>(
            s_buf, t_buf, V, rp, gs_row ? gs_buf : nullptr, gt_row ? gt_buf : nullptr);
        if (gs_row) at::vec::convert(gs_buf, gs_row, V);
        if (gt_row) at::vec::convert(gt_buf, gt_row, V);
      } else {
        row_loss[i] = divergence_row<KIND, acc_t>(s_row, t_row, V, rp, gs_row, gt_row);
      }
    }
  });
}

template <int KIND>
void divergence_rows_for_dtype(const DivergenceArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return divergence_rows<KIND, float, float>(a);
    case DType::Float64: return divergence_rows<KIND, double, double>(a);
    case DType::BFloat16: return divergence_rows<KIND, c10::BFloat16, float>(a);
    case DType::Float16: return divergence_rows<KIND, c10::Half, float>(a);
  }
}

}  // namespace

void divergence_kernel(const DivergenceArgs& a) {
  switch (a.kind) {
    case KL: return divergence_rows_for_dtype<KL>(a);
    case REVERSE_KL: return divergence_rows_for_dtype<REVERSE_KL>(a);
    case JSD: return divergence_rows_for_dtype<JSD>(a);
    case SKEW_KL: return divergence_rows_for_dtype<SKEW_KL>(a);
    case SKEW_REVERSE_KL: return divergence_rows_for_dtype<SKEW_REVERSE_KL>(a);
    case TVD: return divergence_rows_for_dtype<TVD>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
