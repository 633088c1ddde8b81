// RKD angle loss (docs/spec.md §2) and its gradient w.r.t. the student's Gram matrix,
// in O(n³) arithmetic and O(n²) memory.
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags); csrc/cpu/rkd.cpp
// picks one at run time from what the CPU supports.
//
// For anchor i the angle between j and k is
//   a_ijk = (x_j − x_i)·(x_k − x_i) · u_ij u_ik,
//   (x_j − x_i)·(x_k − x_i) = (G_jk − G_ik) + (G_ii − G_ij)      (Gram form)
// with u = 1 / max(e, 1e-12) (F.normalize). a is symmetric in (j, k), so each
// anchor visits k > j only (and k = j once) and counts the pair twice.
// Per term, with g = clamp(a_s − a_t, −1, 1) (smooth-L1, β = 1):
//   ∂/∂num = W = g u_ij u_ik              → d_gram[j, k], row_sums[i, ·]
//   ∂/∂u_ij · (from both j and k sides)  → ang_sums[i, j] = Σ_k g a_ijk
// rkd.cpp turns these into dG and then dX = (dG + dGᵀ) X.
//
// Anchors are split into a fixed number of chunks (a function of n only), run
// in parallel (at::parallel_for), each accumulating into its own [n, n]
// d_gram partial; the partials are added to the shared d_gram in chunk
// order, so the result does not depend on the thread count. At most one
// partial per thread exists at a time. The inner loop over k is
// at::vec SIMD; reads per element: the anchor's rows (in L1/L2) and row j of
// the four Gram halves (streamed), plus d_gram's row j (read-modify-write).
// Anchors without a near sample (the far path) take the rows four at a time
// (row_block), so that their own rows are read once per four rows.
#include "rkd_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <vector>

#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using divergence::Vec;  // at::vec::Vectorized<T> of this capability

using divergence::Cmp;
using divergence::fk_lane_sum;
using divergence::fk_where;

// 0 where u ≤ 0 (diagonal, coinciding samples), u elsewhere; NaN stays NaN
// (clamp_min keeps a NaN of its first operand in one instruction, where
// maximum tests both operands for NaN).
template <class T>
Vec<T> forward_factor(const Vec<T>& u) { return at::vec::clamp_min(u, Vec<T>(T(0))); }

// Smooth-L1 (β = 1) of d: ½d² for |d| < 1, |d| − ½ otherwise.
template <class T>
Vec<T> smooth_l1(const Vec<T>& d) {
  const Vec<T> ad = d.abs();
  const Vec<T> half(T(0.5));
  return fk_where<Cmp::LT>(ad, Vec<T>(T(1)), half * d * d, ad - half);
}

template <class T>
T smooth_l1(T d) {
  const T ad = std::abs(d);
  return ad < T(1) ? T(0.5) * d * d : ad - T(0.5);
}

template <class T>
T clamp_unit(T d) { return std::min(std::max(d, T(-1)), T(1)); }

// Full-width loads and stores, and the partial ones (at::vec copies through a
// buffer for those) only for the tail.
template <class T>
Vec<T> load(const T* p, int64_t cnt) {
  return cnt == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, cnt);
}
template <class T>
void store(const Vec<T>& v, T* p, int64_t cnt) {
  if (cnt == Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, cnt);
  }
}

// One side's scalars for anchor i and row j: G_ij, G_ii (hi halves),
// G_ii − G_ij of both halves, and |u_ij|.
template <class T>
struct Side {
  T g_ij, g_ii, c_hi, c_lo, u_j;
};

// (x_j − x_i)·(x_k − x_i) = G_jk − G_ik − G_ij + G_ii for lanes k. The four
// hi terms are paired so that each difference cancels exactly where it
// cancels at all (Sterbenz): (G_jk − G_ik) + (G_ii − G_ij) when x_j is the
// nearer of x_j, x_k to x_i, (G_jk − G_ij) + (G_ii − G_ik) when x_k is; the
// error is then about eps·‖x‖ / max(e_ij, e_ik) instead of
// eps·‖x‖² / (e_ij e_ik). The lo halves, small, are added last.
template <class T>
Vec<T> numerator(const Side<T>& sd, const T* gj_hi, const T* gi_hi, const T* gj_lo, const T* gi_lo,
                 const Vec<T>& u_k, int64_t cnt) {
  const Vec<T> a = load(gj_hi, cnt), b = load(gi_hi, cnt);
  const Vec<T> j_nearer = (a - b) + Vec<T>(sd.c_hi);
  const Vec<T> k_nearer = (a - Vec<T>(sd.g_ij)) + (Vec<T>(sd.g_ii) - b);
  const Vec<T> hi = fk_where<Cmp::GT>(u_k.abs(), Vec<T>(sd.u_j), k_nearer, j_nearer);
  const Vec<T> lo = (load(gj_lo, cnt) - load(gi_lo, cnt)) + Vec<T>(sd.c_lo);
  return hi + lo;
}

// Anchor i's rows of the kernel's inputs: Gram halves and signed inverse
// distances of both sides.
template <class T>
struct AnchorRows {
  const T *gs_hi, *gs_lo, *gt_hi, *gt_lo, *us, *ut;  // row i of each
  AnchorRows(const AngleArgs<T>& a, int64_t i)
      : gs_hi(a.gs_hi + i * a.n), gs_lo(a.gs_lo + i * a.n), gt_hi(a.gt_hi + i * a.n),
        gt_lo(a.gt_lo + i * a.n), us(a.us + i * a.n), ut(a.ut + i * a.n) {}
};

// Anchor i, row j ≠ i: the angles a_ijk for j <= k < k_end (k > j counted
// twice). Adds the gradient terms to d_gram (this task's) and to anchor i's
// row accumulators r_acc, s_acc; returns their smooth-L1 sum.
template <class T, bool kGrad, bool kPrecise>
double row_pair(const AngleArgs<T>& a, int64_t i, int64_t j, int64_t k_end, T* d_gram, T* r_acc, T* s_acc) {
  const int64_t n = a.n;
  constexpr int64_t L = Vec<T>::size();
  const AnchorRows<T> anchor(a, i);
  const T* gsj_hi = a.gs_hi + j * n;
  const T* gsj_lo = a.gs_lo + j * n;
  const T* gtj_hi = a.gt_hi + j * n;
  const T* gtj_lo = a.gt_lo + j * n;
  const T fs_j = std::max(anchor.us[j], T(0)), ft_j = std::max(anchor.ut[j], T(0));
  // Gradient weight of j: |u_ij|. If j coincides with i (u_ij < 0), every
  // term that multiplies x_j − x_i (= 0) vanishes: a_ijk has a non-zero
  // derivative only through x_k − x_i, so k must not coincide with i too
  // (and k = j gives none); without this the Gram form would cancel
  // weights of 1 / eps² in float arithmetic.
  const bool j_coincides = anchor.us[j] < T(0);
  const T ws_j = std::abs(anchor.us[j]);
  // G_ii − G_ij of the hi and lo halves
  const T cs_hi = anchor.gs_hi[i] - anchor.gs_hi[j], cs_lo = anchor.gs_lo[i] - anchor.gs_lo[j];
  const T ct_hi = anchor.gt_hi[i] - anchor.gt_hi[j], ct_lo = anchor.gt_lo[i] - anchor.gt_lo[j];

  // k = j: a_ijj (1 for distinct samples), counted once. (G_jj − G_ij) +
  // (G_ii − G_ij) on the hi halves cancels exactly for j ≈ i (Sterbenz);
  // the lo halves are added last.
  const T as_jj = (((gsj_hi[j] - anchor.gs_hi[j]) + cs_hi) + ((gsj_lo[j] - anchor.gs_lo[j]) + cs_lo)) * fs_j * fs_j;
  const T at_jj = (((gtj_hi[j] - anchor.gt_hi[j]) + ct_hi) + ((gtj_lo[j] - anchor.gt_lo[j]) + ct_lo)) * ft_j * ft_j;
  double row_loss = smooth_l1(as_jj - at_jj);
  T r_j = 0, s_j = 0;
  if constexpr (kGrad) {
    const T g = clamp_unit(as_jj - at_jj);
    const T w = j_coincides ? T(0) : g * ws_j * ws_j;
    d_gram[j * n + j] += w;
    r_j = T(2) * w;  // the row sums are halved at the end
    s_j = g * as_jj;
  }

  // k > j, each counted twice (a_ijk = a_ikj).
  const Vec<T> vfs(fs_j), vft(ft_j), vws(T(2) * ws_j);
  const Side<T> side_s{anchor.gs_hi[j], anchor.gs_hi[i], cs_hi, cs_lo, std::abs(anchor.us[j])};
  const Side<T> side_t{anchor.gt_hi[j], anchor.gt_hi[i], ct_hi, ct_lo, std::abs(anchor.ut[j])};
  const Vec<T> vcs(cs_hi + cs_lo), vct(ct_hi + ct_lo);
  Vec<T> vloss(T(0)), vr(T(0)), vs(T(0));
  T* dgj = kGrad ? d_gram + j * n : nullptr;
  // Lanes k .. k + cnt − 1; inlined into a loop of full vectors (cnt = L, no
  // partial-load branches) and one tail.
  const auto lanes = [&](int64_t k, int64_t cnt, Vec<T>& loss_acc, Vec<T>& r_sum, Vec<T>& s_sum) {
    // Tail lanes load zeros: u = 0 there, so a = 0 on both sides and they add nothing.
    const Vec<T> us_k = load(anchor.us + k, cnt);
    const Vec<T> ut_k = load(anchor.ut + k, cnt);
    Vec<T> num_s, num_t;
    if constexpr (kPrecise) {
      num_s = numerator(side_s, gsj_hi + k, anchor.gs_hi + k, gsj_lo + k, anchor.gs_lo + k, us_k, cnt);
      num_t = numerator(side_t, gtj_hi + k, anchor.gt_hi + k, gtj_lo + k, anchor.gt_lo + k, ut_k, cnt);
    } else {
      // x_j and x_k far from x_i: (G_jk − G_ik) + (G_ii − G_ij) on the hi
      // halves is within ~1e-6 of the numerator's scale (angle_side, rkd.cpp).
      num_s = (load(gsj_hi + k, cnt) - load(anchor.gs_hi + k, cnt)) + vcs;
      num_t = (load(gtj_hi + k, cnt) - load(anchor.gt_hi + k, cnt)) + vct;
    }
    const Vec<T> as = num_s * vfs * forward_factor(us_k);
    const Vec<T> at = num_t * vft * forward_factor(ut_k);
    const Vec<T> d = as - at;
    // smooth-L1 (β = 1) as g (d − g/2), g = clamp(d, −1, 1): ½d² inside, |d| − ½ outside
    const Vec<T> g = at::vec::clamp(d, Vec<T>(T(-1)), Vec<T>(T(1)));
    loss_acc = at::vec::fmadd(g, at::vec::fmadd(Vec<T>(T(-0.5)), g, d), loss_acc);
    if constexpr (kGrad) {
      // 2W = g |u_ik| · 2|u_ij|: both (j, k) and (k, j); the row sums take it
      // whole, halved once at the end. Each sum is one fused multiply-add.
      const Vec<T> gu = g * (j_coincides ? forward_factor(us_k) : us_k.abs());
      store<T>(at::vec::fmadd(gu, vws, load(dgj + k, cnt)), dgj + k, cnt);
      store<T>(at::vec::fmadd(gu, vws, load(r_acc + k, cnt)), r_acc + k, cnt);
      r_sum = at::vec::fmadd(gu, vws, r_sum);
      store<T>(at::vec::fmadd(g, as, load(s_acc + k, cnt)), s_acc + k, cnt);
      s_sum = at::vec::fmadd(g, as, s_sum);
    }
  };
  int64_t k = j + 1;
  Vec<T> vloss2(T(0)), vr2(T(0)), vs2(T(0));
  for (; k + 2 * L <= k_end; k += 2 * L) {
    lanes(k, L, vloss, vr, vs);
    lanes(k + L, L, vloss2, vr2, vs2);
  }
  for (; k + L <= k_end; k += L) lanes(k, L, vloss, vr, vs);
  if (k < k_end) lanes(k, k_end - k, vloss, vr, vs);
  vloss = vloss + vloss2;
  vr = vr + vr2;
  vs = vs + vs2;
  if constexpr (kGrad) {
    r_acc[j] += r_j + static_cast<T>(fk_lane_sum(vr));
    s_acc[j] += s_j + static_cast<T>(fk_lane_sum(vs));
  }
  return row_loss + 2 * fk_lane_sum(vloss);
}

// Row j's part of a far-path lane term for anchor i (see row_block): its Gram
// rows and d_gram row, and its scalars broadcast.
template <class T>
struct FarRow {
  const T* gs = nullptr;  // student G_j·, hi half
  const T* gt = nullptr;  // teacher G_j·, hi half
  T* d_gram = nullptr;    // this task's d_gram row j (kGrad)
  Vec<T> fs, ft;          // max(u_ij, 0) of each side
  Vec<T> ws2;             // 2 |u_ij|
  Vec<T> cs, ct;          // (G_ii − G_ij) of each side, hi + lo

  FarRow() = default;
  FarRow(const AngleArgs<T>& a, const AnchorRows<T>& anchor, int64_t i, int64_t j, T* d_gram_task) {
    gs = a.gs_hi + j * a.n;
    gt = a.gt_hi + j * a.n;
    d_gram = d_gram_task ? d_gram_task + j * a.n : nullptr;
    fs = Vec<T>(std::max(anchor.us[j], T(0)));
    ft = Vec<T>(std::max(anchor.ut[j], T(0)));
    ws2 = Vec<T>(T(2) * std::abs(anchor.us[j]));
    cs = Vec<T>((anchor.gs_hi[i] - anchor.gs_hi[j]) + (anchor.gs_lo[i] - anchor.gs_lo[j]));
    ct = Vec<T>((anchor.gt_hi[i] - anchor.gt_hi[j]) + (anchor.gt_lo[i] - anchor.gt_lo[j]));
  }
};

// Rows of the far path swept together by row_block, from n = kRowBlockMinN:
// below, an anchor's rows stay in cache and the separate call for each row's
// first columns costs more than the block saves (N = 256, two threads:
// 3.0–3.6 ms one row at a time, 3.3–4.0 ms in blocks; about even at 512).
constexpr int64_t kRowBlock = 4;
constexpr int64_t kRowBlockMinN = 512;

// Anchor i (far path: no sample near it), rows j .. j + kRowBlock − 1 (none
// of them i): the angles a_ijk of every row for k_begin <= k < n, k_begin >=
// j + kRowBlock, in one sweep, so that anchor i's columns (its Gram rows, u,
// and the row accumulators r_acc, s_acc) are loaded, and the accumulators
// stored, once for kRowBlock rows instead of once per row: per 16 lanes and
// row 4.5 loads and 1.5 stores instead of 9 and 3. The loop is bound by its
// memory accesses, not its arithmetic (bench_rkd's x_simd_peak): N = 2048,
// one thread, 1.45–1.59 s against 1.86–1.94 s one row at a time.
// The same terms as row_pair<T, kGrad, false> for rows that do not coincide
// with i (u_ij >= 0; the caller checks); returns their smooth-L1 sum.
template <class T, bool kGrad>
double row_block(const AngleArgs<T>& a, int64_t i, int64_t j, int64_t k_begin, T* d_gram, T* r_acc,
                 T* s_acc) {
  constexpr int64_t R = kRowBlock;
  const int64_t n = a.n;
  constexpr int64_t L = Vec<T>::size();
  const AnchorRows<T> anchor(a, i);
  std::array<FarRow<T>, R> rows;
  for (int64_t r = 0; r < R; ++r) rows[r] = FarRow<T>(a, anchor, i, j + r, d_gram);
  Vec<T> loss(T(0));
  std::array<Vec<T>, R> r_sum, s_sum;
  r_sum.fill(Vec<T>(T(0)));
  s_sum.fill(Vec<T>(T(0)));
  const auto lanes = [&](int64_t k, int64_t cnt) {
    // Tail lanes load zeros: u = 0 there, so a = 0 on both sides and they add nothing.
    const Vec<T> us_k = load(anchor.us + k, cnt), ut_k = load(anchor.ut + k, cnt);
    const Vec<T> gsi_k = load(anchor.gs_hi + k, cnt), gti_k = load(anchor.gt_hi + k, cnt);
    const Vec<T> fs_k = forward_factor(us_k), ft_k = forward_factor(ut_k);
    const Vec<T> w_k = us_k.abs();
    Vec<T> two_w(T(0)), g_as(T(0));
#pragma GCC unroll 4
    for (int64_t r = 0; r < R; ++r) {
      const FarRow<T>& row = rows[r];
      // (G_jk − G_ik) + (G_ii − G_ij) on the hi halves (angle_side, rkd.cpp)
      const Vec<T> as = ((load(row.gs + k, cnt) - gsi_k) + row.cs) * row.fs * fs_k;
      const Vec<T> at = ((load(row.gt + k, cnt) - gti_k) + row.ct) * row.ft * ft_k;
      const Vec<T> d = as - at;
      const Vec<T> g = at::vec::clamp(d, Vec<T>(T(-1)), Vec<T>(T(1)));
      loss = at::vec::fmadd(g, at::vec::fmadd(Vec<T>(T(-0.5)), g, d), loss);
      if constexpr (kGrad) {
        const Vec<T> gu = g * w_k;
        store<T>(at::vec::fmadd(gu, row.ws2, load(row.d_gram + k, cnt)), row.d_gram + k, cnt);
        r_sum[r] = at::vec::fmadd(gu, row.ws2, r_sum[r]);
        two_w = at::vec::fmadd(gu, row.ws2, two_w);
        s_sum[r] = at::vec::fmadd(g, as, s_sum[r]);
        g_as = at::vec::fmadd(g, as, g_as);
      }
    }
    if constexpr (kGrad) {
      store<T>(load(r_acc + k, cnt) + two_w, r_acc + k, cnt);
      store<T>(load(s_acc + k, cnt) + g_as, s_acc + k, cnt);
    }
  };
  int64_t k = k_begin;
  for (; k + L <= n; k += L) lanes(k, L);
  if (k < n) lanes(k, n - k);
  if constexpr (kGrad) {
    for (int64_t r = 0; r < R; ++r) {
      r_acc[j + r] += static_cast<T>(fk_lane_sum(r_sum[r]));
      s_acc[j + r] += static_cast<T>(fk_lane_sum(s_sum[r]));
    }
  }
  return 2 * fk_lane_sum(loss);
}

// Anchors [first, first + count): one sweep over the rows j serves them all,
// so row j of the Gram halves and of d_gram is read from memory once per
// block instead of once per anchor. r_acc, s_acc: [count, n] scratch.
template <class T, bool kGrad>
double anchor_block(const AngleArgs<T>& a, int64_t first, int64_t count, T* d_gram, T* r_acc, T* s_acc) {
  const int64_t n = a.n;
  if constexpr (kGrad) {
    std::fill(r_acc, r_acc + count * n, T(0));
    std::fill(s_acc, s_acc + count * n, T(0));
  }
  double total = 0;
  // Rows kRowBlock at a time: a far anchor takes them in row_block (after
  // each row's first columns, k < j + kRowBlock, in row_pair); e_ii = 0, so
  // every angle with j = i is 0 on both sides and row i is skipped.
  for (int64_t j = 0; j < n; j += kRowBlock) {
    const int64_t j_end = std::min(j + kRowBlock, n);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t i = first + b;
      T* r = kGrad ? r_acc + b * n : nullptr;
      T* sa = kGrad ? s_acc + b * n : nullptr;
      // far anchors, whole blocks of rows, none of them i nor coinciding
      // with i (which takes row_pair's other gradient weight; only when
      // every sample is the same is such an anchor on the far path)
      const bool blocked = !a.precise[i] && n >= kRowBlockMinN && j_end - j == kRowBlock &&
                           !(i >= j && i < j_end) &&
                           std::all_of(a.us + i * n + j, a.us + i * n + j_end, [](T u) { return !(u < T(0)); });
      if (!blocked) {
        for (int64_t row = j; row < j_end; ++row) {
          if (row == i) continue;
          total += a.precise[i] ? row_pair<T, kGrad, true>(a, i, row, n, d_gram, r, sa)
                                : row_pair<T, kGrad, false>(a, i, row, n, d_gram, r, sa);
        }
        continue;
      }
      for (int64_t row = j; row < j_end; ++row) total += row_pair<T, kGrad, false>(a, i, row, j_end, d_gram, r, sa);
      total += row_block<T, kGrad>(a, i, j, j_end, d_gram, r, sa);
    }
  }
  if constexpr (kGrad) {
    // the row sums were taken of 2W: halved (exactly, a power of two)
    std::transform(r_acc, r_acc + count * n, a.row_sums + first * n, [](T r) { return r * T(0.5); });
    std::copy(s_acc, s_acc + count * n, a.ang_sums + first * n);
  }
  return total;
}

// Anchors per block of anchor_block: each row j of the Gram halves and of
// d_gram is read once per block. 16 with row blocks (against 8: N = 4096,
// two threads, 6.8–7.3 s against 7.1–7.6 s), 8 below kRowBlockMinN.
constexpr int64_t kAnchorBlock = 16;
inline int64_t anchor_block_size(int64_t n) { return n >= kRowBlockMinN ? kAnchorBlock : kAnchorBlock / 2; }
// The anchors are split into at most this many chunks of consecutive anchors,
// each with its own d_gram partial; the split depends on n only.
constexpr int64_t kAngleChunks = 32;

// Chunk c of `chunks` over n anchors: [n·c / chunks, n·(c + 1) / chunks).
inline int64_t chunk_start(int64_t n, int64_t chunks, int64_t c) { return n * c / chunks; }

template <class T>
double run(const AngleArgs<T>& a) {
  const int64_t n = a.n;
  // A fixed split (not derived from the thread count) and a fixed order of
  // combination (chunk order, for the loss and for every d_gram element) make
  // the result the same bit for bit whatever the number of threads. The
  // chunks run in waves of at most get_num_threads(), so that only that many
  // n × n partials exist at once; their sums are added in chunk order.
  const int64_t block = anchor_block_size(n);
  const int64_t chunks = std::min<int64_t>(kAngleChunks, (n + block - 1) / block);
  const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(chunks, at::get_num_threads()));
  std::vector<double> parts(chunks, 0.0);
  std::vector<std::vector<T>> partials(a.grad ? wave : 0);
  for (int64_t first = 0; first < chunks; first += wave) {
    const int64_t last = std::min(chunks, first + wave);
    at::parallel_for(first, last, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> r_acc(a.grad ? block * n : 0), s_acc(a.grad ? block * n : 0);
      for (int64_t c = begin; c < end; ++c) {
        T* d_gram = nullptr;
        if (a.grad) {
          std::vector<T>& partial = partials[c - first];
          partial.assign(n * n, T(0));
          d_gram = partial.data();
        }
        const int64_t stop = chunk_start(n, chunks, c + 1);
        double part = 0;
        for (int64_t anchor = chunk_start(n, chunks, c); anchor < stop; anchor += block) {
          const int64_t count = std::min(block, stop - anchor);
          part += a.grad ? anchor_block<T, true>(a, anchor, count, d_gram, r_acc.data(), s_acc.data())
                         : anchor_block<T, false>(a, anchor, count, nullptr, nullptr, nullptr);
        }
        parts[c] = part;
      }
    });
    if (a.grad) {
      // d_gram += partials in chunk order, element by element
      at::parallel_for(0, n * n, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t c = first; c < last; ++c) {
          const T* partial = partials[c - first].data();
          for (int64_t e = begin; e < end; ++e) a.d_gram[e] += partial[e];
        }
      });
    }
  }
  double total = 0;
  for (const double part : parts) total += part;
  return total;
}

}  // namespace

double rkd_angle_kernel(const AngleArgs<float>& args) { return run(args); }
double rkd_angle_kernel(const AngleArgs<double>& args) { return run(args); }

template <class T>
double distance_row(const T* g, const T* norms, T n_i, T factor, T* d, uint8_t* near, int64_t n,
                    int64_t diag) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vni(n_i), two(T(2)), vfactor(factor), eps(T(1e-12)), zero(T(0));
  Vec<T> sum(T(0));
  for (int64_t k = 0; k < n; k += L) {
    const int64_t cnt = std::min<int64_t>(L, n - k);
    const Vec<T> nk = load(norms + k, cnt);
    const Vec<T> sq = vni + nk - two * load(g + k, cnt);
    // near: !(sq >= factor · (n_i + n_k)), NaN included
    Vec<T> ok = sq >= vfactor * (vni + nk);
    std::array<T, L> flags;
    if (diag >= k && diag < k + cnt) {
      ok.store(flags.data());
      flags[diag - k] = T(0);  // all bits clear: not ok
      ok = Vec<T>::loadu(flags.data());
    }
    const Vec<T> dist = at::vec::maximum(sq, eps).sqrt();
    store<T>(dist, d + k, cnt);
    // Tail lanes (zeros loaded) look like a far pair: leave them out.
    sum = sum + Vec<T>::set(zero, Vec<T>::blendv(zero, dist, ok), cnt);
    ok.store(flags.data());
    for (int64_t l = 0; l < cnt; ++l) near[k + l] = flags[l] == T(0);
  }
  return fk_lane_sum(sum);
}

template <class T>
std::pair<double, double> distance_loss_row(const T* d_s, T* d_t, T inv_s, T inv_t, T inv_n2,
                                            int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vs(inv_s), vt(inv_t), vn(inv_n2), one(T(1));
  Vec<T> loss(T(0)), qd(T(0));
  for (int64_t k = 0; k < n; k += L) {
    const int64_t cnt = std::min<int64_t>(L, n - k);
    const Vec<T> ds = load(d_s + k, cnt);
    const Vec<T> rho = ds * vs - load(d_t + k, cnt) * vt;
    loss = loss + smooth_l1(rho);
    const Vec<T> q = at::vec::clamp(rho, -one, one) * vn;
    store<T>(q, d_t + k, cnt);
    qd = qd + q * ds;
  }
  return {fk_lane_sum(loss), fk_lane_sum(qd)};
}

template <class T>
double distance_coef_row(T* d_s, const T* q, T shift, T inv_s, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> vshift(shift), scale(T(2) * inv_s), floor(static_cast<T>(1e-6)), zero(T(0));
  Vec<T> sum(T(0));
  for (int64_t k = 0; k < n; k += L) {
    const int64_t cnt = std::min<int64_t>(L, n - k);
    const Vec<T> d = load(d_s + k, cnt);
    // d = 1e-6 where the clamp holds it (and 0 on the diagonal): no gradient
    const Vec<T> c = fk_where<Cmp::GT>(d, floor, (load(q + k, cnt) - vshift) * scale / d, zero);
    store<T>(c, d_s + k, cnt);
    sum = sum + c;
  }
  return fk_lane_sum(sum);
}

#define FASTKD_INSTANTIATE_DISTANCE_ROWS(T)                                                    \
  template double distance_row<T>(const T*, const T*, T, T, T*, uint8_t*, int64_t, int64_t);  \
  template std::pair<double, double> distance_loss_row<T>(const T*, T*, T, T, T, int64_t);     \
  template double distance_coef_row<T>(T*, const T*, T, T, int64_t);
FASTKD_INSTANTIATE_DISTANCE_ROWS(float)
FASTKD_INSTANTIATE_DISTANCE_ROWS(double)

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
