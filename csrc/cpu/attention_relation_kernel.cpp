// The attention-relation tile kernels on CPU (docs/spec.md §5.3): from a tile
// of both models' raw scores x_i · x_j (two GEMMs, done by the caller) to
// each row's online statistics (forward) or to the score gradients
// (backward), lane-parallel along the keys.
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags);
// csrc/cpu/attention_relation.cpp picks one at run time.
//
// exp is divergence::fk_exp_normaliser (≤ 2 ulp with AVX512, at::vec's
// exp_u20 elsewhere; Sleef's exp for double): its arguments are scores minus
// their row's running maximum, or log-relations, ≤ 0 up to rounding, the
// range it is accurate on. Keys excluded by the mask are −inf scores (their
// terms are exactly 0) whatever their scores hold, NaN included; the last
// partial vector of a row runs through the scalar code of RelationRow. The
// scores come scaled from the GEMM ((c x_i) · x_j): a product c · z here
// could be fused into the subtraction that follows it (FMA contraction) in
// one pass and not in the other, and the forward's statistics and the
// backward's recomputed log-relations must round alike, or a one-hot row's
// exactly cancelling gradient terms stop cancelling.
#include "attention_relation_kernel.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

using attention_relation::RelationRow;
using divergence::Vec;  // at::vec::Vectorized<T> of this capability
using divergence::Cmp;
using divergence::fk_where;

// keys [0, end) of row k of the tile: end < cols for causal rows
template <class T>
int64_t row_end(const RelationTile<T>& w, int64_t k) {
  if (!w.causal) return w.cols;
  return std::clamp<int64_t>(w.first_row + k - w.first_key + 1, 0, w.cols);
}

// Lane masks of the tile's excluded keys: all bits set where key c is not kept.
template <class T>
std::vector<T> key_gates(const RelationTile<T>& w) {
  std::vector<T> gate(w.cols);
  for (int64_t c = 0; c < w.cols; ++c) gate[c] = w.kept[w.first_key + c] ? T(1) : T(0);
  return gate;
}

// the scores of lanes [c, c + L) of a row, −inf at excluded keys
template <class T>
void load_scores(const T* row_s, const T* row_t, const T* gate, int64_t c, Vec<T>& s, Vec<T>& t) {
  const Vec<T> g = Vec<T>::loadu(gate + c), zero(T(0));
  const Vec<T> neg_inf(-std::numeric_limits<T>::infinity());
  s = fk_where<Cmp::EQ>(g, zero, neg_inf, Vec<T>::loadu(row_s + c));
  t = fk_where<Cmp::EQ>(g, zero, neg_inf, Vec<T>::loadu(row_t + c));
}

template <class T>
void tile_statistics(const RelationTile<T>& w, RelationRow<T>* stats) {
  using Row = RelationRow<T>;
  constexpr int64_t L = Vec<T>::size();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const std::vector<T> gate = key_gates(w);
  const Vec<T> zero(T(0));
  for (int64_t k = 0; k < w.rows; ++k) {
    if (!w.kept[w.first_row + k]) continue;
    const int64_t end = row_end(w, k);
    const T* row_s = w.scores_s + k * w.cols;
    const T* row_t = w.scores_t + k * w.cols;
    // the tile's maxima first, so that every key's terms are taken relative
    // to the row's new shifts
    Vec<T> max_s(neg_inf), max_t(neg_inf), s, t;
    int64_t c = 0;
    for (; c + L <= end; c += L) {
      load_scores(row_s, row_t, gate.data(), c, s, t);
      max_s = fk_where<Cmp::GT>(s, max_s, s, max_s);
      max_t = fk_where<Cmp::GT>(t, max_t, t, max_t);
    }
    T tile_max_s = divergence::fk_lane_max(max_s, neg_inf);
    T tile_max_t = divergence::fk_lane_max(max_t, neg_inf);
    for (int64_t tail = c; tail < end; ++tail) {
      if (!w.kept[w.first_key + tail]) continue;
      const T st = row_s[tail], tt = row_t[tail];
      if (st > tile_max_s) tile_max_s = st;
      if (tt > tile_max_t) tile_max_t = tt;
    }
    Row& row = stats[k];
    row.rebase(tile_max_s, tile_max_t);
    const T shift_s = row.shift_s(), shift_t = row.shift_t();
    const Vec<T> vshift_s(shift_s), vshift_t(shift_t);
    Vec<T> sum_s(T(0)), sum_t(T(0)), cross(T(0));
    for (c = 0; c + L <= end; c += L) {
      load_scores(row_s, row_t, gate.data(), c, s, t);
      const Vec<T> rel_s = s - vshift_s, rel_t = t - vshift_t;
      const Vec<T> e = divergence::fk_exp_normaliser(rel_t);
      sum_s += divergence::fk_exp_normaliser(rel_s);
      sum_t += e;
      cross += divergence::fk_zero_where_zero(e, e * (rel_t - rel_s));
    }
    T tail_s = 0, tail_t = 0, tail_cross = 0;
    for (; c < end; ++c) {
      if (!w.kept[w.first_key + c]) continue;
      const T st = row_s[c], tt = row_t[c];
      const T e = Row::teacher_weight(tt, shift_t);
      tail_s += Row::student_weight(st, shift_s);
      tail_t += e;
      tail_cross += Row::cross_term(st, tt, e, shift_s, shift_t);
    }
    row.add(static_cast<T>(divergence::fk_lane_sum(sum_s) + tail_s),
            static_cast<T>(divergence::fk_lane_sum(sum_t) + tail_t),
            static_cast<T>(divergence::fk_lane_sum(cross) + tail_cross));
  }
}

template <class T>
void tile_gradients(const RelationTile<T>& w, const RelationRowsBackward<T>& r) {
  constexpr int64_t L = Vec<T>::size();
  const std::vector<T> gate = key_gates(w);
  const Vec<T> cs(w.scale_s), ct(w.scale_t), zero(T(0));
  for (int64_t k = 0; k < w.rows; ++k) {
    const int64_t i = w.first_row + k;
    T* grad_s = r.grad_s + k * w.cols;
    T* grad_t = r.grad_t + k * w.cols;
    std::fill(grad_s, grad_s + w.cols, T(0));
    std::fill(grad_t, grad_t + w.cols, T(0));
    if (!w.kept[i]) continue;
    const int64_t end = row_end(w, k);
    const T* row_s = w.scores_s + k * w.cols;
    const T* row_t = w.scores_t + k * w.cols;
    const T g = r.row_grad[i], kl = r.kl[i];
    const T shift_s = r.lse_s[2 * i], log_sum_s = r.lse_s[2 * i + 1];
    const T shift_t = r.lse_t[2 * i], log_sum_t = r.lse_t[2 * i + 1];
    const Vec<T> vg(g), vkl(kl), vshift_s(shift_s), vlog_sum_s(log_sum_s), vshift_t(shift_t), vlog_sum_t(log_sum_t);
    int64_t c = 0;
    for (; c + L <= end; c += L) {
      const Vec<T> key_gate = Vec<T>::loadu(gate.data() + c);
      const Vec<T> log_q = (Vec<T>::loadu(row_s + c) - vshift_s) - vlog_sum_s;
      const Vec<T> log_p = (Vec<T>::loadu(row_t + c) - vshift_t) - vlog_sum_t;
      const Vec<T> p = divergence::fk_exp_normaliser(log_p);
      const Vec<T> q = divergence::fk_exp_normaliser(log_q);
      const Vec<T> gs = vg * (q - p) * cs;
      const Vec<T> gt = divergence::fk_zero_where_zero(p, vg * p * (log_p - log_q - vkl) * ct);
      divergence::fk_zero_where_zero(key_gate, gs).store(grad_s + c);
      divergence::fk_zero_where_zero(key_gate, gt).store(grad_t + c);
    }
    for (; c < end; ++c) {
      if (!w.kept[w.first_key + c]) continue;
      const T log_q = attention_relation::log_relation(row_s[c], shift_s, log_sum_s);
      const T log_p = attention_relation::log_relation(row_t[c], shift_t, log_sum_t);
      const T p = std::exp(log_p);
      grad_s[c] = g * (std::exp(log_q) - p) * w.scale_s;
      grad_t[c] = p == 0 ? T(0) : g * p * (log_p - log_q - kl) * w.scale_t;
    }
  }
}

}  // namespace

void relation_tile_statistics(const RelationTile<float>& tile, RelationRow<float>* stats) {
  tile_statistics(tile, stats);
}
void relation_tile_statistics(const RelationTile<double>& tile, RelationRow<double>* stats) {
  tile_statistics(tile, stats);
}
void relation_tile_gradients(const RelationTile<float>& tile, const RelationRowsBackward<float>& rows) {
  tile_gradients(tile, rows);
}
void relation_tile_gradients(const RelationTile<double>& tile, const RelationRowsBackward<double>& rows) {
  tile_gradients(tile, rows);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
