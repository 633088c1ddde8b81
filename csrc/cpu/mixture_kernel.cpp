// Fused multi-teacher divergence forward (+ student gradient) on CPU.
//
// Compiled three times by setup.py (CPU_CAPABILITY = DEFAULT, AVX2, AVX512);
// csrc/cpu/mixture.cpp picks one at run time.
//
// The target is the weighted mixture of the teachers' softened distributions
// (docs/spec.md §1): p = Σ_k w_k softmax(t_k / T). Per row, in one call and without
// any [N, V] intermediate:
//   student   max, then e_s = exp((s − max)/T) into the scratch and its sum
//   teacher k max, then Σ exp((t_k − max_k)/T), then
//             log p ← logaddexp(log p, (t_k − max_k)/T + log w_k − log Σ_k)
//             — the mixture is accumulated in log space, so a probability
//             that underflows in every teacher still has an exact log
//   terms     loss and u_j = q_j ∂L/∂q_j per element (element_terms of
//             csrc/common/divergence_math.h, shared with the single-teacher
//             kernels), Σ loss and Σ u, compensated
//   gradient  (u − q Σu) · grad_scale / T
// Each input row is read from memory once (max pass) and again from cache.
// Teachers get no gradient (the Python layer refuses teachers that need one).
//
// With labels, the student's hard-label cross-entropy at temperature 1,
// log Σ exp(s) − s_y = (max − s_y) + log Σ exp(s − max), comes after the
// terms pass from the row still in cache (no second read from memory): at
// T = 1 its normaliser is the student's own and softmax(s) = e_s / Σ_s is in
// the scratch (no exp); at T ≠ 1 one more exp per element, exp(s − max),
// written over log p (no longer needed) when the gradient wants it. Its
// gradient, (softmax(s) − onehot(y))·hard_grad_scale, is added to the
// student gradient in double, before the gradient is rounded to the input
// dtype. The op checks the kept rows' labels are in [0, V) first.
//
// float64 inputs are evaluated in double as above (mixture_rows). float32,
// bfloat16 and float16 inputs take the float path (mixture_rows_float, see
// its comment): the mixture is not accumulated as log p, whose rounding is at
// the magnitude of log p itself (~log V) and, with the divergence ~1e-4
// (T = 100, where log p − log q is ~1e-2), would put the float32 loss further
// from the float64 reference than PyTorch's float32 computation; instead the
// log ratio log p − log q is formed per element, from the normalising
// passes' exponentials or (where a probability underflows) from logit
// differences, so its rounding is at the size of 1 or of itself.
#include "quiet_avx512_intrinsics.h"  // first: see there

#include "mixture_kernel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "row_sums.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

using namespace fastkd::divergence;

namespace {

// log p ← (first ? a : logaddexp(log p, a)), a = (t − max)/T + offset.
template <class W>
void accumulate_log_mixture(W* log_p, const W* t, int64_t V, W max, W inv_t, W offset, bool first) {
  constexpr int64_t L = Vec<W>::size();
  const Vec<W> vmax(max), vinv(inv_t), voff(offset);
  int64_t j = 0;
  for (; j + L <= V; j += L) {
    const Vec<W> a = (Vec<W>::loadu(t + j) - vmax) * vinv + voff;
    (first ? a : fk_logaddexp(Vec<W>::loadu(log_p + j), a)).store(log_p + j);
  }
  for (; j < V; ++j) {
    const W a = (t[j] - max) * inv_t + offset;
    log_p[j] = first ? a : fk_logaddexp(log_p[j], a);
  }
}

template <class W>
int64_t index_of(const W* x, int64_t V, W value) {
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] == value) return j;
  }
  return 0;
}

// Row constants of the terms pass, for scalar (X = W) or SIMD (X = Vec<W>) use.
template <class X>
struct TermConstants {
  X inv_t, max_s, log_sum_s, inv_sum_s, log_p_at_mode;
  Coefficient<X> coef;
};

template <int KIND, class X>
inline ElementTerms<X> terms_at(X s, X e_s, X log_p, const TermConstants<X>& c) {
  ElementInputs<X> x;
  const X a_s = (s - c.max_s) * c.inv_t;
  // in double, where log p − log q needs no special care
  x.log_ratio = log_p - (a_s - c.log_sum_s);
  x.q = e_s * c.inv_sum_s;
  x.p = fk_exp(log_p);
  // log(q/p) minus its value at the student's mode (where a_s = 0), which
  // REVERSE_KL's u reads (divergence_math.h): log Σ_s cancels exactly.
  x.shifted_ratio_q = a_s - (log_p - c.log_p_at_mode);
  x.shifted_ratio_p = X(0);  // teacher gradient only: never read here
  return element_terms<KIND>(x, c.coef);
}

// Rows of `scalar_t` logits, evaluated in double (W) whatever the input
// dtype; the row losses are written as `loss_t` (float, double for double).
template <int KIND, class scalar_t, class loss_t>
void mixture_rows(const MixtureDivergenceArgs& a) {
  using W = double;
  const auto* student = static_cast<const scalar_t*>(a.student);
  const auto* teacher = static_cast<const scalar_t*>(a.teacher);
  auto* row_loss = static_cast<loss_t*>(a.row_loss);
  auto* grad = static_cast<scalar_t*>(a.student_grad);
  const int64_t V = a.vocab;
  constexpr int64_t L = Vec<W>::size();
  constexpr bool widen = !std::is_same_v<scalar_t, W>;
  const W inv_t = W(a.inv_temperature);
  const W factor = W(a.grad_scale * a.inv_temperature);
  const Coefficient<W> coef{W(a.coef), W(1.0 - a.coef), W(std::log(a.coef)), W(std::log1p(-a.coef))};
  auto* row_ce = static_cast<loss_t*>(a.row_ce);
  const W hard_scale = W(a.hard_grad_scale);
  // T == 1: the cross-entropy's normaliser and softmax are the student's own
  const bool ce_shares_normaliser = a.inv_temperature == 1.0;

  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(V * a.teachers, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    // e_s, log p, u; for non-double inputs also the widened student and teacher rows
    std::vector<W> buffer((widen ? 5 : 3) * V);
    W* e_s = buffer.data();
    W* log_p = e_s + V;
    W* u = log_p + V;
    W* s_wide = widen ? u + V : nullptr;
    W* t_wide = widen ? s_wide + V : nullptr;
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = grad != nullptr ? grad + i * V : nullptr;
      if (a.row_mask != nullptr && !a.row_mask[i]) {
        row_loss[i] = loss_t(0);
        if (row_ce != nullptr) row_ce[i] = loss_t(0);
        if (grad_row) std::fill(grad_row, grad_row + V, scalar_t(0));
        continue;
      }
      const scalar_t* s_row = student + i * a.student_row_stride;
      const W* s = nullptr;
      if constexpr (widen) {
        at::vec::convert(s_row, s_wide, V);
        s = s_wide;
      } else {
        s = s_row;
      }
      const W max_s = fk_row_max(s, V);
      const W sum_s = exp_sum(s, V, max_s, inv_t, e_s);
      TermConstants<W> c{inv_t, max_s, fk_log(sum_s), W(1) / sum_s, W(0), coef};

      bool first = true;
      for (int64_t k = 0; k < a.teachers; ++k) {
        const scalar_t* t_row = teacher + k * a.teacher_stride + i * a.teacher_row_stride;
        const W* t = nullptr;
        if constexpr (widen) {
          at::vec::convert(t_row, t_wide, V);
          t = t_wide;
        } else {
          t = t_row;
        }
        const W max_t = fk_row_max(t, V);
        const W sum_t = exp_sum(t, V, max_t, inv_t, static_cast<W*>(nullptr));
        // A teacher of weight 0 is still read: its offset is −inf, so it adds
        // nothing, except NaN from a NaN input (docs/spec.md §6: NaN is never dropped).
        const W offset = W(a.log_weights[k] - std::log(double(sum_t)));
        accumulate_log_mixture(log_p, t, V, max_t, inv_t, offset, first);
        first = false;
      }
      c.log_p_at_mode = log_p[index_of(s, V, max_s)];

      // terms: loss, Σu (u kept for the gradient)
      const TermConstants<Vec<W>> vc{Vec<W>(c.inv_t), Vec<W>(c.max_s), Vec<W>(c.log_sum_s),
                                     Vec<W>(c.inv_sum_s), Vec<W>(c.log_p_at_mode),
                                     {Vec<W>(coef.c), Vec<W>(coef.one_minus_c), Vec<W>(coef.log_c),
                                      Vec<W>(coef.log_one_minus_c)}};
      CompensatedSum<Vec<W>> vloss, vsum_u;
      int64_t j = 0;
      for (; j + L <= V; j += L) {
        const ElementTerms<Vec<W>> e = terms_at<KIND>(Vec<W>::loadu(s + j), Vec<W>::loadu(e_s + j),
                                                      Vec<W>::loadu(log_p + j), vc);
        vloss.add(e.loss);
        vsum_u.add(e.u);
        e.u.store(u + j);
      }
      CompensatedSum<W> tail_loss, tail_u;
      for (; j < V; ++j) {
        const ElementTerms<W> e = terms_at<KIND>(s[j], e_s[j], log_p[j], c);
        tail_loss.add(e.loss);
        tail_u.add(e.u);
        u[j] = e.u;
      }
      // a divergence is never negative (rounding of a tiny one); NaN stays NaN
      const W loss = total(vloss, tail_loss);
      row_loss[i] = loss_t(loss < W(0) ? W(0) : loss);

      // the hard-label cross-entropy: e_ce = exp(s − max) (e_s itself at
      // T = 1; at T ≠ 1 written over log p, only if the gradient needs it)
      const W* e_ce = e_s;
      W ce_inv_sum = c.inv_sum_s;
      if (row_ce != nullptr) {
        W ce_log_sum = c.log_sum_s;
        if (!ce_shares_normaliser) {
          W* out = grad_row != nullptr ? log_p : nullptr;
          const W sum = exp_sum(s, V, max_s, W(1), out);
          ce_log_sum = fk_log(sum);
          ce_inv_sum = W(1) / sum;
          e_ce = log_p;
        }
        // log Σ exp(s) − s_y = (max − s_y) + log Σ exp(s − max): exact at the max
        row_ce[i] = loss_t((max_s - s[a.labels[i]]) + ce_log_sum);
      }
      if (grad_row == nullptr) continue;

      // gradient (u − q Σu)·factor, q = e_s / Σ_s; written over u, then narrowed
      const W sum_u = total(vsum_u, tail_u);
      const Vec<W> vfactor(factor), vsum(sum_u), vinv_sum(c.inv_sum_s);
      W* out = nullptr;
      if constexpr (widen) {
        out = u;
      } else {
        out = grad_row;
      }
      for (j = 0; j + L <= V; j += L) {
        const Vec<W> q = Vec<W>::loadu(e_s + j) * vinv_sum;
        softmax_grad(Vec<W>::loadu(u + j), q, vsum, vfactor).store(out + j);
      }
      for (; j < V; ++j) out[j] = softmax_grad(u[j], e_s[j] * c.inv_sum_s, sum_u, factor);
      if (row_ce != nullptr) {
        // + (softmax(s) − onehot(y))·hard_grad_scale, softmax(s) = e_ce / Σ e_ce
        const W hard_factor = hard_scale * ce_inv_sum;
        const Vec<W> vhard(hard_factor);
        for (j = 0; j + L <= V; j += L) {
          (Vec<W>::loadu(out + j) + Vec<W>::loadu(e_ce + j) * vhard).store(out + j);
        }
        for (; j < V; ++j) out[j] += e_ce[j] * hard_factor;
        out[a.labels[i]] -= hard_scale;
      }
      if constexpr (widen) at::vec::convert(u, grad_row, V);
    }
  });
}

// ---- float32 path (float32, bfloat16 and float16 inputs) --------------------
//
// The same passes in float, with D = log p − log q formed per element in one
// of two ways. Neither rounds D at the size of log p (~log V), as a
// difference of two float32 logs would: the float32 loss stays closer to the
// float64 reference than PyTorch's float32 computation where the divergence
// is small (T = 100).
//
// The ratio form, where e_s and p are at least kSmallestRatioOperand (every
// element of ordinary rows). With e = exp((x − max)/T) from the normalising
// passes, kept in the scratch,
//   p / q = Σ_k r_k e_k / e_s,   r_k = w_k Σ_s / Σ_k  (a row constant from
//                                double sums, rounded once),
//   D = log(p / q):  positive terms, one division and one log, so D is off
//                    by a few float32 ulps of 1 (the exponentials' rounding).
// r_k is its own constant, not derived from p and q: log(p / q) from the
// rounded p and q measured a 1.6× larger error at T = 100 (0.34 of PyTorch
// float32's, against 0.21) and up to 4.5× on the reverse KL's gradient.
// Per element: K FMAs, a division and a log, against the exact form's
// selection, K expm1 and log1p.
//
// The exact form elsewhere, where a probability underflows or is subnormal:
//   b_k = log p_k − log q = (a_k − a_s) − g_k,   a = (x − max)/T,
//   g_k = log Σ_k − log Σ_s  (a row constant from double sums, rounded once),
// and D = log Σ_k w_k e^{b_k}. With j the teacher of largest b_j + log w_j
// at that element and Σ_k w_k = 1,
//   Σ_k w_k e^{b_k − b_j} = 1 + X,   X = Σ_k w_k expm1(b_k − b_j),
//   D = b_j + log1p(X)   where X > −½ (D is rounded relative to its own size)
//   D = b_j + log(Y)     elsewhere, Y = Σ_k w_k e^{b_k − b_j} ≥ w_j (a sum of
//                        positive terms, no cancellation).
// No exponential of a large negative argument is taken for the dominant
// teacher, so a probability that underflows float32 in every teacher keeps
// an exact log ratio (b_j is a difference of logits). It costs K expm1 and
// one log1p per element (K exp and one log more in a vector with a lane of
// X ≤ −½), and runs only for the vectors with a lane outside the ratio form's
// range, blended in per lane: each element's D depends on it alone.
//
// The probabilities themselves are p = Σ_k (w_k / Σ_k) e_k and q = e_s / Σ_s.
// KL takes D where it is formed: its loss Σ p·D and its gradient (q − p)·
// grad_scale/T come out of the D pass (no terms or gradient pass).
//
// Weights: teachers of weight 0 are only scanned for their max (a NaN or
// infinite max makes the row NaN, as in the reference: docs/spec.md §6).
// Positive weights below kSmallestFloatWeight go to the double path (see
// mixture_divergence_kernel).

template <class S>
void widen_row(const S* x, float* out, int64_t V) {
  at::vec::convert(x, out, V);
}

// Vectors the float path's D pass takes through each step together (see its
// vector loop); four are no faster than two.
constexpr int64_t kVectorsPerStep = 2;

// The ratio form's range: e_s and p of at least 2^−100, far above float32's
// subnormals (2^−126), so each is rounded relative to itself.
constexpr float kSmallestRatioOperand = 0x1p-100f;

template <int KIND, class S>
void mixture_rows_float(const MixtureDivergenceArgs& a) {
  using W = float;
  using VW = Vec<W>;
  constexpr bool widen = !std::is_same_v<S, float>;
  constexpr int64_t L = VW::size();
  const auto* student = static_cast<const S*>(a.student);
  const auto* teacher = static_cast<const S*>(a.teacher);
  auto* row_loss = static_cast<float*>(a.row_loss);
  auto* row_ce = static_cast<float*>(a.row_ce);
  auto* grad = static_cast<S*>(a.student_grad);
  const int64_t V = a.vocab;
  const W inv_t = W(a.inv_temperature);
  const W factor = W(a.grad_scale * a.inv_temperature);
  const Coefficient<W> coef{W(a.coef), W(1.0 - a.coef), W(std::log(a.coef)), W(std::log1p(-a.coef))};
  const W hard_scale = W(a.hard_grad_scale);
  const bool ce_shares_normaliser = a.inv_temperature == 1.0;

  // the teachers of positive weight, their weights and log weights
  std::vector<int64_t> active;
  std::vector<W> weight, log_weight;
  for (int64_t k = 0; k < a.teachers; ++k) {
    if (a.log_weights[k] > -std::numeric_limits<double>::infinity()) {
      active.push_back(k);
      weight.push_back(W(std::exp(a.log_weights[k])));
      log_weight.push_back(W(a.log_weights[k]));
    }
  }
  const int64_t K = int64_t(active.size());

  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(V * a.teachers, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    // e_s, D, u, the K active teachers' e_k; widened inputs (bf16 / fp16) after them
    std::vector<W> buffer((3 + K + (widen ? 1 + K : 0)) * V);
    W* e_s = buffer.data();
    W* log_ratio = e_s + V;
    W* u = log_ratio + V;
    W* e_t = u + V;  // [K, V]
    W* s_wide = widen ? e_t + K * V : nullptr;
    W* t_wide = widen ? s_wide + V : nullptr;  // [K, V]
    std::vector<const W*> t(K);
    std::vector<W> max_t(K), gap(K), p_scale(K), ratio_scale(K);
    // each teacher's b of the current lanes (the exact form, any K)
    std::vector<W> b_buffer(K * L);
    W* b_lanes = b_buffer.data();
    for (int64_t i = begin; i < end; ++i) {
      S* grad_row = grad != nullptr ? grad + i * V : nullptr;
      if (a.row_mask != nullptr && !a.row_mask[i]) {
        row_loss[i] = 0.0f;
        if (row_ce != nullptr) row_ce[i] = 0.0f;
        if (grad_row) std::fill(grad_row, grad_row + V, S(0));
        continue;
      }
      const S* s_row = student + i * a.student_row_stride;
      const W* s = nullptr;
      if constexpr (widen) {
        widen_row(s_row, s_wide, V);
        s = s_wide;
      } else {
        s = s_row;
      }
      const W max_s = fk_row_max(s, V);
      const bool has_next = i + 1 < end;
      const auto next_row = [&](const S* row, int64_t row_stride) {
        return has_next ? RowAhead{reinterpret_cast<const char*>(row + row_stride), int64_t(sizeof(S))}
                        : RowAhead{};
      };
      const double sum_s = exp_sum(s, V, max_s, inv_t, e_s, next_row(s_row, a.student_row_stride));
      const double log_sum_s = std::log(sum_s);
      const W inv_sum_s = W(1.0 / sum_s);

      // a teacher of weight 0 adds nothing but NaN (a NaN, +inf or all −inf row)
      W poison = 0.0f;
      for (int64_t k = 0, next = 0; k < a.teachers; ++k) {
        const S* t_row = teacher + k * a.teacher_stride + i * a.teacher_row_stride;
        if (next < K && active[next] == k) {
          const W* tk = nullptr;
          if constexpr (widen) {
            widen_row(t_row, t_wide + next * V, V);
            tk = t_wide + next * V;
          } else {
            tk = t_row;
          }
          t[next] = tk;
          max_t[next] = fk_row_max(tk, V);
          const double sum_t =
              exp_sum(tk, V, max_t[next], inv_t, e_t + next * V, next_row(t_row, a.teacher_row_stride));
          gap[next] = W(std::log(sum_t) - log_sum_s);
          p_scale[next] = W(double(weight[next]) / sum_t);
          ratio_scale[next] = W(double(weight[next]) * sum_s / sum_t);
          poison += 0.0f * gap[next];
          ++next;
        } else {
          W m = 0.0f;
          if constexpr (widen) {
            widen_row(t_row, u, V);  // u is free until the terms pass
            m = fk_row_max(static_cast<const W*>(u), V);
          } else {
            m = fk_row_max(t_row, V);
          }
          if (!std::isfinite(m)) poison = std::numeric_limits<W>::quiet_NaN();
        }
      }
      poison += 0.0f * W(log_sum_s);

      // KL, the mixture's usual divergence, needs D only where it is formed:
      // its loss is Σ p·D and its gradient (q − p)·factor (u = −p, Σu = −1:
      // the weights sum to 1), so the D pass writes both, and neither D nor
      // u is stored and read again
      constexpr bool kl_shortcut = KIND == KL;
      // the float gradient: the row itself, or u, rounded to S at the end (nullptr: none asked for)
      W* out = nullptr;
      if constexpr (widen) {
        out = grad_row != nullptr ? u : nullptr;
      } else {
        out = grad_row;
      }
      CompensatedSum<VW> vloss, vsum_u;
      CompensatedSum<W> tail_loss, tail_u;

      // D = log p − log q per element (see the section comment)
      {
        const VW vfactor(factor), vinv_sum(inv_sum_s), vsmallest(kSmallestRatioOperand);
        // D and p at the L elements from j: D stored, or KL's loss and gradient there
        const auto use_log_ratio = [&](int64_t j, VW d, VW p) {
          if constexpr (kl_shortcut) {
            vloss.add(fk_zero_where_zero(p, p * d));
            if (out != nullptr) (vfactor * (VW::loadu(e_s + j) * vinv_sum - p)).store(out + j);
          } else {
            d.store(log_ratio + j);
          }
        };
        const VW vmax_s(max_s), vinv(inv_t), neg_inf(-std::numeric_limits<W>::infinity());
        const VW vpoison(poison), half(-0.5f), zero(0.0f);
        // The exact form's D at the L elements from j, for kTeachers = K fixed
        // at compile time (unrolled, each teacher's b in a register) or
        // kTeachers = 0 for any K (b through b_lanes, in L1).
        const auto exact_log_ratio = [&](auto fixed_teachers, int64_t j) {
          constexpr int64_t kTeachers = decltype(fixed_teachers)::value;
          const int64_t teachers = kTeachers > 0 ? kTeachers : K;
          VW b_fixed[kTeachers > 0 ? kTeachers : 1];
          const auto keep_b = [&](int64_t k, VW b) {
            if constexpr (kTeachers > 0) {
              b_fixed[k] = b;
            } else {
              b.store(b_lanes + k * L);
            }
          };
          const auto kept_b = [&](int64_t k) {
            if constexpr (kTeachers > 0) {
              return b_fixed[k];
            } else {
              return VW::loadu(b_lanes + k * L);
            }
          };
          const VW a_s = (VW::loadu(s + j) - vmax_s) * vinv;
          VW z_max = neg_inf, b_sel = neg_inf, a_max = neg_inf, x = zero;
          for (int64_t k = 0; k < teachers; ++k) {
            const VW a_k = (VW::loadu(t[k] + j) - VW(max_t[k])) * vinv;
            const VW b = (a_k - a_s) - VW(gap[k]);
            keep_b(k, b);
            const VW z = b + VW(log_weight[k]);
            // where z > z_max: one comparison, two blends
            b_sel = fk_where<Cmp::GT>(z, z_max, b, b_sel);
            z_max = fk_where<Cmp::GT>(z, z_max, z, z_max);
            a_max = fk_where<Cmp::GT>(a_k, a_max, a_k, a_max);
          }
          for (int64_t k = 0; k < teachers; ++k) x = x + VW(weight[k]) * expm1_lanes(kept_b(k) - b_sel);
          VW value = b_sel + log1p_lanes(x);
          // Y and its log only for vectors with a lane where the other
          // teachers add less than ½ (rare where the teachers agree)
          if ((x > half).zero_mask() != 0) {
            VW y = zero;
            for (int64_t k = 0; k < teachers; ++k) y = y + VW(weight[k]) * fk_exp_normaliser(kept_b(k) - b_sel);
            value = fk_where<Cmp::GT>(x, half, value, b_sel + log_lanes(y));
          }
          VW d = fk_where<Cmp::EQ>(b_sel, neg_inf, neg_inf, value);
          d = fk_where<Cmp::EQ>(a_s, neg_inf, a_max - a_s, d);
          return d + vpoison;
        };
        int64_t j = 0;
        // The ratio form over kVectors vectors at a time (two independent
        // chains of a division and a log side by side keep the FP pipes busy
        // while each waits on latency); lanes outside its range take the
        // exact form. Each element's operations are the same either way.
        const auto vector_loop = [&](auto fixed_teachers, auto vectors) {
          constexpr int64_t kTeachers = decltype(fixed_teachers)::value;
          constexpr int64_t kVectors = decltype(vectors)::value;
          const int64_t teachers = kTeachers > 0 ? kTeachers : K;
          for (; j + kVectors * L <= V; j += kVectors * L) {
            VW p[kVectors], d[kVectors], in_range[kVectors];
            for (int64_t v = 0; v < kVectors; ++v) {
              const VW e = VW::loadu(e_s + j + v * L);
              VW numerator = zero;
              p[v] = vpoison;
              for (int64_t k = 0; k < teachers; ++k) {
                const VW e_k = VW::loadu(e_t + k * V + j + v * L);
                p[v] = p[v] + e_k * VW(p_scale[k]);
                numerator = numerator + e_k * VW(ratio_scale[k]);
              }
              d[v] = log_lanes(numerator / e);
              in_range[v] = (e > vsmallest) & (p[v] > vsmallest);
            }
            for (int64_t v = 0; v < kVectors; ++v) {
              if (in_range[v].zero_mask() != 0) {
                d[v] = VW::blendv(exact_log_ratio(fixed_teachers, j + v * L), d[v], in_range[v]);
              }
              use_log_ratio(j + v * L, d[v], p[v]);
            }
          }
        };
        // kVectorsPerStep vectors at a time, then one at a time
        const auto vector_loops = [&](auto fixed_teachers) {
          vector_loop(fixed_teachers, std::integral_constant<int64_t, kVectorsPerStep>{});
          vector_loop(fixed_teachers, std::integral_constant<int64_t, 1>{});
        };
        switch (K) {
          case 2: vector_loops(std::integral_constant<int64_t, 2>{}); break;
          case 3: vector_loops(std::integral_constant<int64_t, 3>{}); break;
          case 4: vector_loops(std::integral_constant<int64_t, 4>{}); break;
          default: vector_loops(std::integral_constant<int64_t, 0>{}); break;
        }
        for (; j < V; ++j) {
          W p = poison, numerator = 0.0f;
          for (int64_t k = 0; k < K; ++k) {
            p += e_t[k * V + j] * p_scale[k];
            numerator += e_t[k * V + j] * ratio_scale[k];
          }
          W d = 0.0f;
          if (e_s[j] > kSmallestRatioOperand && p > kSmallestRatioOperand) {
            d = std::log(numerator / e_s[j]);
          } else {
            const W a_s = (s[j] - max_s) * inv_t;
            W z_max = -INFINITY, b_sel = -INFINITY, a_max = -INFINITY;
            for (int64_t k = 0; k < K; ++k) {
              const W a_k = (t[k][j] - max_t[k]) * inv_t;
              const W b = (a_k - a_s) - gap[k];
              const W z = b + log_weight[k];
              if (z > z_max) {
                z_max = z;
                b_sel = b;
              }
              if (a_k > a_max) a_max = a_k;
            }
            W x = 0.0f, y = 0.0f;
            for (int64_t k = 0; k < K; ++k) {
              const W b = (((t[k][j] - max_t[k]) * inv_t - a_s) - gap[k]) - b_sel;
              x += weight[k] * std::expm1(b);
              y += weight[k] * std::exp(b);
            }
            W value = b_sel + (x > -0.5f ? std::log1p(x) : std::log(y));
            if (b_sel == -INFINITY) value = -INFINITY;
            if (a_s == -INFINITY) value = a_max - a_s;
            d = value + poison;
          }
          if constexpr (kl_shortcut) {
            tail_loss.add(fk_zero_where_zero(p, p * d));
            if (out != nullptr) out[j] = factor * (e_s[j] * inv_sum_s - p);
          } else {
            log_ratio[j] = d;
          }
        }
      }

      // terms: loss, Σu (u kept for the gradient)
      if constexpr (!kl_shortcut) {
        // log(q/p) at the student's mode, for REVERSE_KL's shifted ratio
        const W ratio_at_mode = -log_ratio[index_of(s, V, max_s)];
        const VW vinv_sum(inv_sum_s), vmode(ratio_at_mode), vpoison(poison);
        const Coefficient<VW> vcoef{VW(coef.c), VW(coef.one_minus_c), VW(coef.log_c), VW(coef.log_one_minus_c)};
        int64_t j = 0;
        for (; j + L <= V; j += L) {
          ElementInputs<VW> x;
          VW p = vpoison;  // NaN in p too: TVD does not read the log ratio
          for (int64_t k = 0; k < K; ++k) p = p + VW::loadu(e_t + k * V + j) * VW(p_scale[k]);
          const VW d = VW::loadu(log_ratio + j);
          x.log_ratio = d;
          x.p = p;
          x.q = VW::loadu(e_s + j) * vinv_sum;
          x.shifted_ratio_q = (VW(0.0f) - d) - vmode;
          x.shifted_ratio_p = VW(0.0f);
          const ElementTerms<VW> e = element_terms<KIND>(x, vcoef);
          vloss.add(e.loss);
          vsum_u.add(e.u);
          e.u.store(u + j);
        }
        for (; j < V; ++j) {
          ElementInputs<W> x;
          W p = poison;
          for (int64_t k = 0; k < K; ++k) p += e_t[k * V + j] * p_scale[k];
          const W d = log_ratio[j];
          x.log_ratio = d;
          x.p = p;
          x.q = e_s[j] * inv_sum_s;
          x.shifted_ratio_q = -d - ratio_at_mode;
          x.shifted_ratio_p = 0.0f;
          const ElementTerms<W> e = element_terms<KIND>(x, coef);
          tail_loss.add(e.loss);
          tail_u.add(e.u);
          u[j] = e.u;
        }
      }
      const double loss = total_double(vloss, tail_loss);
      row_loss[i] = float(loss < 0.0 ? 0.0 : loss);

      // the hard-label cross-entropy (as in mixture_rows): e_ce over D at T ≠ 1
      const W* e_ce = e_s;
      W ce_inv_sum = inv_sum_s;
      if (row_ce != nullptr) {
        double ce_log_sum = log_sum_s;
        if (!ce_shares_normaliser) {
          W* e_out = grad_row != nullptr ? log_ratio : nullptr;
          const double sum = exp_sum(s, V, max_s, 1.0f, e_out);
          ce_log_sum = std::log(sum);
          ce_inv_sum = W(1.0 / sum);
          e_ce = log_ratio;
        }
        row_ce[i] = float((double(max_s) - double(s[a.labels[i]])) + ce_log_sum);
      }
      if (grad_row == nullptr) continue;

      // gradient (u − q Σu)·factor, written over u, then rounded to S (KL's is written)
      if constexpr (!kl_shortcut) {
        const W sum_u = total(vsum_u, tail_u);
        const VW vfactor(factor), vsum(sum_u), vinv_sum(inv_sum_s);
        int64_t j = 0;
        for (; j + L <= V; j += L) {
          const VW q = VW::loadu(e_s + j) * vinv_sum;
          softmax_grad(VW::loadu(u + j), q, vsum, vfactor).store(out + j);
        }
        for (; j < V; ++j) out[j] = softmax_grad(u[j], e_s[j] * inv_sum_s, sum_u, factor);
      }
      if (row_ce != nullptr) {
        const W hard_factor = hard_scale * ce_inv_sum;
        const VW vhard(hard_factor);
        int64_t j = 0;
        for (; j + L <= V; j += L) (VW::loadu(out + j) + VW::loadu(e_ce + j) * vhard).store(out + j);
        for (; j < V; ++j) out[j] += e_ce[j] * hard_factor;
        out[a.labels[i]] -= hard_scale;
      }
      if constexpr (widen) at::vec::convert(u, grad_row, V);
    }
  });
}

// Positive weights below this take the double path: the float path's
// w_k·expm1(b_k − b_j) stays below 1 only for weights of at least ~e^−69.
constexpr double kSmallestFloatWeight = 1e-30;

template <int KIND>
void mixture_rows_for_dtype(const MixtureDivergenceArgs& a) {
  bool float_weights = true;
  for (int64_t k = 0; k < a.teachers; ++k) {
    const double w = std::exp(a.log_weights[k]);
    if (w > 0.0 && w < kSmallestFloatWeight) float_weights = false;
  }
  switch (a.dtype) {
    case DType::Float32:
      return float_weights ? mixture_rows_float<KIND, float>(a) : mixture_rows<KIND, float, float>(a);
    case DType::Float64: return mixture_rows<KIND, double, double>(a);
    case DType::BFloat16:
      return float_weights ? mixture_rows_float<KIND, c10::BFloat16>(a)
                           : mixture_rows<KIND, c10::BFloat16, float>(a);
    case DType::Float16:
      return float_weights ? mixture_rows_float<KIND, c10::Half>(a) : mixture_rows<KIND, c10::Half, float>(a);
  }
}

}  // namespace

void mixture_divergence_kernel(const MixtureDivergenceArgs& a) {
  switch (a.kind) {
    case KL: return mixture_rows_for_dtype<KL>(a);
    case REVERSE_KL: return mixture_rows_for_dtype<REVERSE_KL>(a);
    case JSD: return mixture_rows_for_dtype<JSD>(a);
    case SKEW_KL: return mixture_rows_for_dtype<SKEW_KL>(a);
    case SKEW_REVERSE_KL: return mixture_rows_for_dtype<SKEW_REVERSE_KL>(a);
    case TVD: return mixture_rows_for_dtype<TVD>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
