// Fused top-k (sparse teacher) divergence forward (+ student gradient) on CPU.
//
// Compiled three times by setup.py (CPU_CAPABILITY = DEFAULT, AVX2, AVX512);
// csrc/cpu/topk.cpp picks one at run time.
//
// The teacher is k (id, logit) pairs per row; p lives on those ids,
// renormalised over them. The student q is the full-vocabulary softmax. No
// (N, V) teacher tensor exists: per row the dense work is the student's only.
//
// Every divergence the kernel takes is, as a function of q, a sum of terms on
// the k support ids plus, off the support (where p = 0), a term c·q_v with a
// constant c (docs/spec.md §1 formulas with p = 0):
//   KL(p‖q)                      c = 0
//   JSD_β                        c = −(1−β) log(1−β)   ((1−β) q log(q/m), m = (1−β) q)
//   KL(p‖αp+(1−α)q)              c = 0
//   KL(q‖αq+(1−α)p)              c = −log α
//   TVD ½Σ|p−q|                  c = ½
// so the row loss is Σ_support terms + c·R with R = Σ_{v∉support} q_v, and
// with g_v = ∂ℓ/∂q_v (= c off the support) the student gradient is
//   dℓ/ds_v = q_v (g_v − G)/T,   G = Σ_v q_v g_v = Σ_support q_j g_j + c·R.
// (KL(q‖p) is infinite off the support and is rejected by the caller.)
//
// Per row (rows in parallel):
//   pass 1  widen s into the scratch row and find its max          read s
//   support gather s at the k ids, then put −inf at those ids in the scratch,
//           so that pass 2 sums the off-support mass R directly (not as
//           1 − Σ_support q, which cancels when the teacher's ids hold
//           nearly all of the student's mass)
//   pass 2  e_v = exp((s_v − max)/T) into the scratch, compensated sum
//   support the k terms, in double (k is small)
//   pass 3  gradient: e_v · (c − G)/(T Σe) · grad_scale everywhere (0 on the
//           support, whose scratch holds e = 0), then the k support values
//                                                              write N·V
//
// With labels, the row's hard-label cross-entropy at temperature 1,
// log Σ_v exp(s_v) − s_y = (max − s_y) + log Σ_v exp(s_v − max), comes from
// the same pass. At T = 1 the student's normaliser above is that sum, and
// softmax(s) is e_v / Σe off the support and q_j on it: no extra exp. At
// T ≠ 1 one more exp per element, right after pass 1 (while the widened row
// is in the scratch), fills a second scratch row with exp(s − max) and sums
// it. The CE's gradient, hard_grad_scale · (softmax(s) − onehot(y)), is added
// in float (double on the support) before the gradient is rounded to the
// input dtype.
#include "quiet_avx512_intrinsics.h"  // first: see there

#include "topk_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/topk_math.h"
#include "row_sums.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

using namespace fastkd::divergence;

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The support terms and the off-support slope c of csrc/common/topk_math.h
// (shared with the CUDA kernel), for the row's runtime kind.
inline Coefficient<double> coefficient(double coef) {
  return {coef, 1.0 - coef, std::log(coef), std::log1p(-coef)};
}

inline topk::SupportTerm support_term(int kind, const Coefficient<double>& coef, double log_q,
                                      double log_p) {
  switch (kind) {
    case KL: return topk::support_term<KL>(log_q, log_p, coef);
    case JSD: return topk::support_term<JSD>(log_q, log_p, coef);
    case SKEW_KL: return topk::support_term<SKEW_KL>(log_q, log_p, coef);
    case SKEW_REVERSE_KL: return topk::support_term<SKEW_REVERSE_KL>(log_q, log_p, coef);
    case TVD: return topk::support_term<TVD>(log_q, log_p, coef);
    default:
      return {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::quiet_NaN()};
  }
}

inline double off_support_slope(int kind, const Coefficient<double>& coef) {
  switch (kind) {
    case JSD: return topk::off_support_slope<JSD>(coef);
    case SKEW_REVERSE_KL: return topk::off_support_slope<SKEW_REVERSE_KL>(coef);
    case TVD: return topk::off_support_slope<TVD>(coef);
    default: return 0.0;
  }
}

template <class scalar_t, class W>
void topk_rows(const TopKDivergenceArgs& a) {
  const auto* student = static_cast<const scalar_t*>(a.student);
  const auto* values = static_cast<const W*>(a.value);
  auto* row_loss = static_cast<W*>(a.row_loss);
  auto* grad = static_cast<scalar_t*>(a.student_grad);
  const int64_t V = a.vocab, K = a.k;
  const W inv_t = W(a.inv_temperature);
  const double inv_t_d = a.inv_temperature;
  const Coefficient<double> coef = coefficient(a.coef);
  const double c = off_support_slope(a.kind, coef);
  auto* row_ce = static_cast<W*>(a.row_ce);
  const bool with_ce = row_ce != nullptr;
  // T = 1: the cross-entropy's softmax is the student's q (no second exp)
  const bool ce_shares_normaliser = a.inv_temperature == 1.0;
  const W hard_scale = W(a.hard_grad_scale);

  // Grain: enough rows that a task streams at least ~256 KiB.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(V, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<W> scratch(V);
    // exp(s − max) for the cross-entropy at T ≠ 1; unused (empty) otherwise
    std::vector<W> ce_exp(with_ce && !ce_shares_normaliser ? V : 0);
    std::vector<double> log_q(K), log_p(K), q_times_g(K);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = grad != nullptr ? grad + i * V : nullptr;
      if (a.row_mask != nullptr && !a.row_mask[i]) {
        row_loss[i] = W(0);
        if (with_ce) row_ce[i] = W(0);
        if (grad_row) std::fill(grad_row, grad_row + V, scalar_t(0));
        continue;
      }
      const scalar_t* s = student + i * a.student_row_stride;
      const int64_t* ids = a.index + i * K;
      const W* t = values + i * K;

      // pass 1
      if constexpr (std::is_same_v<scalar_t, W>) {
        std::copy(s, s + V, scratch.data());
      } else {
        at::vec::convert(s, scratch.data(), V);
      }
      const W max_s = fk_row_max(scratch.data(), V);
      // the label's logit and, at T ≠ 1, the CE's own normaliser
      const int64_t y = with_ce ? a.labels[i] : 0;  // in [0, V): checked by the op
      const double s_y = with_ce ? double(scratch[y]) : 0.0;
      double ce_sum = 0.0;
      if (with_ce && !ce_shares_normaliser) {
        std::copy(scratch.begin(), scratch.end(), ce_exp.begin());
        ce_sum = exp_sum(ce_exp.data(), V, max_s, W(1), ce_exp.data());
      }

      // support: a_j = (s_j − max)/T, the difference exact in double (in float
      // it rounds to the ulp of the difference, ~1e-6 for logits ~10, which
      // shifts a tiny divergence by ~1e-4 of itself)
      for (int64_t j = 0; j < K; ++j) log_q[j] = (double(scratch[ids[j]]) - double(max_s)) * inv_t_d;
      for (int64_t j = 0; j < K; ++j) scratch[ids[j]] = -std::numeric_limits<W>::infinity();

      // pass 2
      const double off_sum = exp_sum(scratch.data(), V, max_s, inv_t, scratch.data());
      double support_sum = 0.0;
      for (int64_t j = 0; j < K; ++j) support_sum += std::exp(log_q[j]);
      const double sum = off_sum + support_sum;
      const double log_sum = std::log(sum);
      const double off_mass = off_sum / sum;  // R
      for (int64_t j = 0; j < K; ++j) log_q[j] -= log_sum;

      // teacher log-probabilities over its k ids
      double max_t = kNegInf;
      for (int64_t j = 0; j < K; ++j) {
        log_p[j] = double(t[j]) * inv_t_d;
        // NaN sticks: once max_t is NaN no comparison replaces it
        if (std::isnan(log_p[j]) || log_p[j] > max_t) max_t = log_p[j];
      }
      double teacher_sum = 0.0;
      for (int64_t j = 0; j < K; ++j) teacher_sum += std::exp(log_p[j] - max_t);
      const double teacher_log_sum = std::log(teacher_sum);
      for (int64_t j = 0; j < K; ++j) log_p[j] = log_p[j] - max_t - teacher_log_sum;

      // support terms
      double loss = c * off_mass, big_g = c * off_mass;
      for (int64_t j = 0; j < K; ++j) {
        const topk::SupportTerm term = support_term(a.kind, coef, log_q[j], log_p[j]);
        loss += term.loss;
        q_times_g[j] = term.q_times_g;
        big_g += term.q_times_g;
      }
      // a divergence is never negative (rounding of a tiny one); NaN stays NaN
      row_loss[i] = W(loss < 0.0 ? 0.0 : loss);
      if (with_ce) {
        // (max − s_y) is exact near the max; log Σ exp(s − max) at T = 1 is log_sum
        const double ce_log_sum = ce_shares_normaliser ? log_sum : std::log(ce_sum);
        row_ce[i] = W((double(max_s) - s_y) + ce_log_sum);
      }
      if (grad_row == nullptr) continue;

      // pass 3: off the support q_v (c − G)/T = e_v (c − G)/(T Σe), plus
      // hard_scale · softmax(s)_v with labels, in W; the support and the
      // label's entry are then set in W too, and a bf16 / fp16 row is
      // rounded once at the end (the scratch is its float gradient row)
      const double factor = a.grad_scale * inv_t_d;
      const W off_factor = W((c - big_g) * factor / sum);
      W* g = nullptr;
      if constexpr (std::is_same_v<scalar_t, W>) {
        g = grad_row;
      } else {
        g = scratch.data();
      }
      if (!with_ce) {
        at::vec::map([off_factor](Vec<W> e) { return e * Vec<W>(off_factor); }, g, scratch.data(),
                     V);
      } else if (ce_shares_normaliser) {
        // softmax(s)_v = e_v / Σe (0 here on the support, whose e is 0)
        const W ce_factor = W(a.hard_grad_scale / sum);
        at::vec::map(
            [off_factor, ce_factor](Vec<W> e) {
              return e * Vec<W>(off_factor) + e * Vec<W>(ce_factor);
            },
            g, scratch.data(), V);
      } else {
        // softmax(s)_v = exp(s_v − max) / Σ exp(s − max), on the support too
        const W ce_factor = W(a.hard_grad_scale / ce_sum);
        at::vec::map2(
            [off_factor, ce_factor](Vec<W> e, Vec<W> e1) {
              return e * Vec<W>(off_factor) + e1 * Vec<W>(ce_factor);
            },
            g, scratch.data(), ce_exp.data(), V);
      }
      for (int64_t j = 0; j < K; ++j) {
        const double q = std::exp(log_q[j]);
        const W divergence_grad = W((q_times_g[j] - q * big_g) * factor);
        if (!with_ce) {
          g[ids[j]] = divergence_grad;
        } else if (ce_shares_normaliser) {
          g[ids[j]] = divergence_grad + W(a.hard_grad_scale * q);
        } else {
          g[ids[j]] = divergence_grad + g[ids[j]];  // the map left the CE's term there
        }
      }
      if (with_ce) g[y] -= hard_scale;
      if constexpr (!std::is_same_v<scalar_t, W>) at::vec::convert(g, grad_row, V);
    }
  });
}

}  // namespace

void topk_divergence_kernel(const TopKDivergenceArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return topk_rows<float, float>(a);
    case DType::Float64: return topk_rows<double, double>(a);
    case DType::BFloat16: return topk_rows<c10::BFloat16, float>(a);
    case DType::Float16: return topk_rows<c10::Half, float>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
