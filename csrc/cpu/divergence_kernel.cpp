// Fused softmax-divergence forward (+ gradient) on CPU, streaming each row.
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags); csrc/cpu/divergence.cpp
// picks one at run time from what the CPU supports.
//
// Per row (rows in parallel, at::parallel_for):
//   pass 1  max of s and t, in one loop                   read s, t (memory)
//           (pipelined KL rows, below: during the row before's pass 2)
//   pass 2  e_s = exp((s − max_s)/T), e_t = exp((t − max_t)/T), stored in a
//           per-task scratch row, and their sums           read s, t (cache)
//           KL also sums p·(a_t − a_s) here (a = (x − max)/T), which
//           gives its loss: KL = Σ p (a_t − a_s) − log Σe_t + log Σe_s
//   pass 3  loss, Σu, Σv, with p = e_t/Σe_t and q = e_s/Σe_s (no exp) —
//           or, for KL with the student gradient only, the gradient
//           (q − p)·grad_scale/T (Σu = −1 is known in advance)
//   pass 4  gradients (u − q Σu)/T, (v − p Σv)/T           other cases
//           (with the student gradient only, u is kept from pass 3 in
//           e_t's place; with both, the terms are evaluated again)
// REVERSE_KL's student gradient and KL's teacher gradient also locate the
// row's mode (a scalar scan) to shift their unbounded log ratios.
// Memory traffic: read N·V twice (s and t), write N·V per gradient requested;
// KL's student gradient, when the call's is 4 MiB or more, with
// non-temporal stores (no read of the lines it overwrites: see
// kStreamGradientBytes), with AVX-512 during the next row's pass 2
// (PendingKlGradient).
// Passes 2–4 work on the row in cache: at V = 32000, fp32, the row's s, t,
// e_s, e_t are 500 KiB, within a 2 MiB L2. Exponentials: 2 per element, the
// minimum (plus the log-space mixture of JSD and the skew divergences).
//
// bf16 / fp16 logits are read as they are and widened to float in registers
// in every pass (a load and one or two instructions per vector); the
// gradient is rounded to the input dtype as it is stored. With labels (below)
// the row is widened into the scratch first instead, so that the gradient,
// to which the cross-entropy's is added, is rounded once.
//
// With labels, the row's hard-label cross-entropy at temperature 1 comes
// after pass 4, from the row still in cache (no second read from memory): at
// T = 1 it is the student normaliser itself, log Σ exp(s − max) = log_sum,
// and softmax(s) = e_s / Σe_s is in the scratch (no exp); at T ≠ 1 one more
// exp per element fills the scratch with exp(s − max). Its gradient,
// (softmax(s) − onehot)·hard_grad_scale, is added to the student gradient
// before it is rounded to the input dtype.
#include "quiet_avx512_intrinsics.h"  // first: see there

#include "divergence_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "row_sums.h"
#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

using namespace fastkd::divergence;

namespace {

// The largest lane of v (vector maxima: NaN lanes may or may not win, as in
// row_maxima's running maxima).
template <class T>
T horizontal_max(Vec<T> v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_max_ps(v);
#endif
  std::array<T, Vec<T>::size()> lanes;
  v.store(lanes.data());
  T best = -std::numeric_limits<T>::infinity();
  for (T lane : lanes) best = fk_max(best, lane);
  return best;
}

// Every row sum is compensated (see row_sums.h). The exponential passes add
// blocks of kBlock vectors, summed pairwise first (an error of log2(kBlock)
// roundings of the block, whatever V), which takes the compensation off the
// critical path of the row.

// A row divergence is never negative; rounding can take a tiny one below 0
// (the float64 reference's too). NaN stays NaN.
template <class T>
T non_negative(T loss) {
  return loss < T(0) ? T(0) : loss;
}

// Vectors of Vec<A> per block of the exponential passes (see CompensatedSum).
constexpr int64_t kBlock = 4;

// Row input and output in the logits' dtype S, computed in A (float for
// float, bf16 and fp16; double for double). load: the L = Vec<A>::size()
// logits at p, widened in registers. store: the `pack` vectors v[0..pack) at
// p, rounded to S (bf16 / fp16 round two float vectors, one S vector, at a time).
template <class A, class S>
struct RowIO {
  static constexpr int64_t L = Vec<A>::size();
  static constexpr bool same = std::is_same_v<A, S>;
  static constexpr int64_t pack = same ? 1 : 2;

  static Vec<A> load(const S* p) {
    if constexpr (same) {
      return Vec<A>::loadu(p);
    } else {
      Vec<A> v;
      at::vec::load_to_float(p, v);
      return v;
    }
  }
  static void store(S* p, const Vec<A>* v) {
    if constexpr (same) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<S>(v[0], v[1]).store(p);
    }
  }
};

// Whether this build can write gradients with non-temporal (streaming)
// stores: 64 bytes, one Vec<A> pack, per store.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;
#endif

// The `pack` vectors v[0..pack) at p (64-byte aligned), rounded to S, by a
// non-temporal store.
template <class A, class S>
inline void stream_store(S* p, const Vec<A>* v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>) {
    _mm512_stream_ps(reinterpret_cast<float*>(p), v[0]);
  } else if constexpr (std::is_same_v<S, double>) {
    _mm512_stream_pd(reinterpret_cast<double*>(p), v[0]);
  } else {
    const __m512i packed = at::vec::convert_from_float<S>(v[0], v[1]);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), packed);
  }
#endif
}

// Writes value(j) for j in [0, V) to out, rounded to S: vec_at(j) gives
// the L values from j as a Vec<A>, scalar_at(j) one value (rows shorter
// than one pack). In longer rows every element comes from the vector lanes,
// whatever V and out's alignment: the last pack ends at V, overlapping the one before
// it, and with `stream` (non-temporal stores, 64-byte aligned: see
// RowParams::stream_gradient) the first pack is stored normally and the
// streamed ones start at the first 64-byte boundary.
template <class A, class S, class VecAt, class ScalarAt>
inline void write_row(S* out, int64_t V, bool stream, VecAt vec_at, ScalarAt scalar_at) {
  using IO = RowIO<A, S>;
  constexpr int64_t L = IO::L, step = IO::pack * L;
  Vec<A> v[IO::pack];
  auto pack_at = [&](int64_t j) {
    for (int64_t k = 0; k < IO::pack; ++k) v[k] = vec_at(j + k * L);
  };
  if (V < step) {
    for (int64_t j = 0; j < V; ++j) out[j] = S(scalar_at(j));
    return;
  }
  int64_t j = 0;
  if (kCanStream && stream) {
    pack_at(0);
    IO::store(out, v);
    const auto offset = int64_t(reinterpret_cast<std::uintptr_t>(out) % 64);
    j = offset == 0 ? 0 : (64 - offset) / int64_t(sizeof(S));
    for (; j + step <= V; j += step) {
      pack_at(j);
      stream_store<A>(out + j, v);
    }
  } else {
    for (; j + step <= V; j += step) {
      pack_at(j);
      IO::store(out + j, v);
    }
  }
  if (j < V) {
    pack_at(V - step);
    IO::store(out + V - step, v);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// KL's student gradient (q − p)·factor = e_s·fq − e_t·fp at the 16 floats
// from j that `lanes` keeps (the others load 0): write_row's fmsub, the one
// every AVX-512 copy of the gradient loop calls so that all round alike.
inline __m512 kl_gradient_lanes(const float* e_s, const float* e_t, int64_t j, __m512 fq, __m512 fp,
                                __mmask16 lanes = 0xFFFF) {
  return _mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, e_s + j), fq,
                         _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, e_t + j), fp));
}

// The same at 32 values from j, rounded to bf16 by vcvtne2ps2bf16 (AVX512-BF16): one instruction
// per 32 values against ~16 for at::vec's integer rounding (about an eighth
// of a bf16 KL row's instructions). Round to nearest even like
// c10::BFloat16; values below the float range (|g| < 1.2e-38) round to ±0
// instead of a bf16 subnormal. Rows of at least 32 values; `stream` as in write_row.
__attribute__((target("avx512bf16"))) inline __m512i kl_gradient_bf16_at(
    const float* e_s, const float* e_t, int64_t j, __m512 fq, __m512 fp) {
  const __m512 lo = kl_gradient_lanes(e_s, e_t, j, fq, fp), hi = kl_gradient_lanes(e_s, e_t, j + 16, fq, fp);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

__attribute__((target("avx512bf16"))) void write_kl_gradient_bf16(
    c10::BFloat16* out, const float* e_s, const float* e_t, int64_t V, float fq, float fp, bool stream) {
  constexpr int64_t step = 32;
  const __m512 vfq = _mm512_set1_ps(fq), vfp = _mm512_set1_ps(fp);
  int64_t j = 0;
  if (stream) {
    _mm512_storeu_si512(out, kl_gradient_bf16_at(e_s, e_t, 0, vfq, vfp));
    const auto offset = int64_t(reinterpret_cast<std::uintptr_t>(out) % 64);
    j = offset == 0 ? 0 : (64 - offset) / 2;
    for (; j + step <= V; j += step) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j), kl_gradient_bf16_at(e_s, e_t, j, vfq, vfp));
    }
  } else {
    for (; j + step <= V; j += step) {
      _mm512_storeu_si512(out + j, kl_gradient_bf16_at(e_s, e_t, j, vfq, vfp));
    }
  }
  if (j < V) _mm512_storeu_si512(out + V - step, kl_gradient_bf16_at(e_s, e_t, V - step, vfq, vfp));
}

// Whether this CPU has AVX512-BF16 (checked once).
inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

// Gradients of at least this many bytes per call are written with
// non-temporal stores (RowParams::stream_gradient): more than the L2 caches
// of a machine hold. Measured on one core (bench/kl_passes.py, KL fp32):
// 2048×32000 at 1.30× the copy floor streaming against 1.61× not, and
// 4096×1024 (16 MiB) at 1.36× against 1.55×.
constexpr double kStreamGradientBytes = 4.0 * 1024 * 1024;

template <class T>
struct RowParams {
  T inv_temperature;
  T grad_factor;  // grad_scale / T
  Coefficient<T> coef;
  bool student_grad;
  bool teacher_grad;
  T hard_scale;  // hard_grad_scale: multiplies the cross-entropy's gradient
  bool ce_shares_normaliser;  // T == 1: the CE's softmax is the student's q
  // Write KL's student gradient with non-temporal stores: the call's
  // gradient is too large to stay in cache for whoever reads it next, so
  // reading each line in before overwriting it (a quarter of the traffic
  // of a KL row) is wasted.
  bool stream_gradient;
};

// The scratch rows of one task: exponentials of the current row, and, for
// bf16 / fp16 inputs, the widened row and its float gradients.
template <class T>
struct Scratch {
  T* e_s;  // exp((s − max_s)/T)   [V]
  T* e_t;  // exp((t − max_t)/T)   [V]
};

// The next row's logits, as bytes (nullptr: none). Pass 2 is compute-bound
// and works in cache, so it asks for the next row meanwhile: pass 1 of that
// row then reads from cache instead of waiting on memory.
struct NextRow {
  const char* s;
  const char* t;
  int64_t element_size;  // bytes per logit of the input dtype
};

// A row's log-softmax, kept in parts: log q_j = (x_j − max)/T − log_sum.
// x_j − max is exact near the max (Sterbenz), so the dominant entries get
// exact arguments whatever the compiler does with x·(1/T) (an FMA-contracted
// x·(1/T) − max/T is not 0 at the max). Not x_j/T − lse either: with logits
// of magnitude 1e4 the rounding of lse would swallow log_sum (~1e-6) and make
// the dominant probability exactly 1, ruining gradients that cancel.
template <class T>
struct Normaliser {
  T max;      // max_j x_j
  T log_sum;  // log Σ_j exp((x_j − max)/T)
  T inv_sum;  // 1 / Σ_j exp((x_j − max)/T)
  double log_sum_double;  // log_sum before its rounding to T
};

// Pass 1's running maxima of a row's s and t: kBlock per side (one chain
// would wait on the latency of every max). Vector lanes take the max without
// ordering NaN (one instruction instead of four); a NaN logit still makes the
// row NaN, through its exponential in pass 2 (fk_exp_normaliser keeps NaN)
// and so every sum.
template <class A, class S>
struct RowMaxima {
  using IO = RowIO<A, S>;
  static constexpr int64_t L = IO::L;
  static_assert(kBlock == 4, "one initial value per running maximum");
  const Vec<A> neg_inf{-std::numeric_limits<A>::infinity()};
  Vec<A> s[kBlock] = {neg_inf, neg_inf, neg_inf, neg_inf};
  Vec<A> t[kBlock] = {neg_inf, neg_inf, neg_inf, neg_inf};

  // the kBlock vectors of each row from j
  void add_block(const S* s_row, const S* t_row, int64_t j) {
    for (int64_t k = 0; k < kBlock; ++k) {
      s[k] = fk_max_unordered(s[k], IO::load(s_row + j + k * L));
      t[k] = fk_max_unordered(t[k], IO::load(t_row + j + k * L));
    }
  }
  // the rows' elements from j (after the whole blocks), then ns.max and nt.max
  void finish(const S* s_row, const S* t_row, int64_t j, int64_t V, Normaliser<A>& ns, Normaliser<A>& nt) {
    for (; j + L <= V; j += L) {
      s[0] = fk_max_unordered(s[0], IO::load(s_row + j));
      t[0] = fk_max_unordered(t[0], IO::load(t_row + j));
    }
    A best_s = horizontal_max(fk_max_unordered(fk_max_unordered(s[0], s[1]), fk_max_unordered(s[2], s[3])));
    A best_t = horizontal_max(fk_max_unordered(fk_max_unordered(t[0], t[1]), fk_max_unordered(t[2], t[3])));
    for (; j < V; ++j) {
      best_s = fk_max(best_s, A(s_row[j]));
      best_t = fk_max(best_t, A(t_row[j]));
    }
    ns.max = best_s;
    nt.max = best_t;
  }
};

// Elements of the whole blocks of kBlock vectors in a row of V (pass 1's and
// pass 2's block loops; RowMaxima::finish takes the rest).
template <class A>
constexpr int64_t whole_blocks(int64_t V) {
  constexpr int64_t block = kBlock * Vec<A>::size();
  return V / block * block;
}

// Pass 1: ns.max = max_j s_j and nt.max = max_j t_j, in one loop.
template <class A, class S>
void row_maxima(const S* s, const S* t, int64_t V, Normaliser<A>& ns, Normaliser<A>& nt) {
  RowMaxima<A, S> maxima;
  const int64_t blocks_end = whole_blocks<A>(V);
  for (int64_t j = 0; j < blocks_end; j += kBlock * RowMaxima<A, S>::L) maxima.add_block(s, t, j);
  maxima.finish(s, t, blocks_end, V, ns, nt);
}

// e_t·(a_t − a_s), with the xlogy rule (0 where e_t is 0, even if a_t − a_s
// is NaN). With a = (x − max)/T, a_t − a_s is log p − log q up to a row
// constant; pass 2 passes a in base 2, a·log2 e.
template <class W>
inline W weighted_log_ratio(W e_t, W a_s, W a_t) {
  return fk_zero_where_zero(e_t, e_t * (a_t - a_s));
}

// Pass 2 (see the file header). Returns Σ e_t·(a_t − a_s) when KL_GAP, else 0.
// The exponents are taken in base 2, b = (x − max)·(log2 e/T) and e = 2^b
// (fk_exp2_normaliser: the conversion to base 2 rides on the division by
// T), and the gap is Σ e_t·(b_t − b_s)·ln 2; the scale is rounded once, so
// the exponentials and the gap see the same temperature. The gap sums plain
// products (multiply-adds, no test for e_t = 0 per element); a 0·∞ term of an
// infinite logit makes it NaN, and only then is the row summed again with
// the xlogy rule.
// on_block(j) runs once per block of kBlock vectors (from j), after its exponentials
// (the pipelined KL rows write the previous row's gradient there).
template <bool KL_GAP, class A, class S, class OnBlock>
A row_exponentials(const S* s, const S* t, int64_t V, A inv_t, Normaliser<A>& ns,
                   Normaliser<A>& nt, const Scratch<A>& scratch, const NextRow& next, OnBlock on_block) {
  using IO = RowIO<A, S>;
  constexpr int64_t L = IO::L;
  const A scale = A(double(inv_t) * kLog2E);
  const Vec<A> vscale(scale), vmax_s(ns.max), vmax_t(nt.max);
  CompensatedSum<Vec<A>, true> vsum_s, vsum_t;
  CompensatedSum<Vec<A>> vgap;
  // One vector of s and t at j: stores e_s, e_t; returns e_s, e_t and the gap term.
  auto exponentials_at = [&](int64_t j, Vec<A>& es, Vec<A>& et, Vec<A>& gap) {
    const Vec<A> a_s = (IO::load(s + j) - vmax_s) * vscale;
    const Vec<A> a_t = (IO::load(t + j) - vmax_t) * vscale;
    es = fk_exp2_normaliser(a_s);
    et = fk_exp2_normaliser(a_t);
    es.store(scratch.e_s + j);
    et.store(scratch.e_t + j);
    if constexpr (KL_GAP) gap = a_t - a_s;
  };
  // bytes of the next row to ask for per block (whole cache lines)
  constexpr int64_t kLine = 64;
  const int64_t block_bytes = kBlock * L * next.element_size;
  int64_t j = 0;
  for (; j + kBlock * L <= V; j += kBlock * L) {
    if (next.s != nullptr) {
      // this block of the row ↔ the same element range of the next one
      for (int64_t b = 0; b < block_bytes; b += kLine) {
        __builtin_prefetch(next.s + j * next.element_size + b);
        __builtin_prefetch(next.t + j * next.element_size + b);
      }
    }
    Vec<A> es[kBlock], et[kBlock], gap[kBlock];
    for (int64_t k = 0; k < kBlock; ++k) exponentials_at(j + k * L, es[k], et[k], gap[k]);
    on_block(j);
    static_assert(kBlock == 4, "the pairwise block sums below add four vectors");
    vsum_s.add((es[0] + es[1]) + (es[2] + es[3]));
    vsum_t.add((et[0] + et[1]) + (et[2] + et[3]));
    if constexpr (KL_GAP) {
      vgap.add(at::vec::fmadd(et[0], gap[0], et[1] * gap[1]) + at::vec::fmadd(et[2], gap[2], et[3] * gap[3]));
    }
  }
  for (; j + L <= V; j += L) {
    Vec<A> es, et, gap;
    exponentials_at(j, es, et, gap);
    vsum_s.add(es);
    vsum_t.add(et);
    if constexpr (KL_GAP) vgap.add(et * gap);
  }
  CompensatedSum<A, true> tail_s, tail_t;
  CompensatedSum<A> tail_gap;
  for (; j < V; ++j) {
    const A a_s = (A(s[j]) - ns.max) * scale, a_t = (A(t[j]) - nt.max) * scale;
    const A es = std::exp2(a_s), et = std::exp2(a_t);
    scratch.e_s[j] = es;
    scratch.e_t[j] = et;
    tail_s.add(es);
    tail_t.add(et);
    if constexpr (KL_GAP) tail_gap.add(weighted_log_ratio(et, a_s, a_t));
  }
  // An all −inf row: max −inf, so every exponent is NaN and so is everything
  // after (documented: such a row has no distribution). NaN inputs likewise.
  const double sum_s = total_double(vsum_s, tail_s), sum_t = total_double(vsum_t, tail_t);
  ns.log_sum_double = std::log(sum_s);
  nt.log_sum_double = std::log(sum_t);
  ns.log_sum = A(ns.log_sum_double);
  nt.log_sum = A(nt.log_sum_double);
  ns.inv_sum = A(1.0 / sum_s);
  nt.inv_sum = A(1.0 / sum_t);
  double gap = total_double(vgap, tail_gap);
  if (KL_GAP && !std::isfinite(gap)) {
    // an infinite or NaN term: again with the xlogy rule (0 where e_t is
    // 0), which the plain products above skip (rows with ±inf logits only)
    CompensatedSum<A> safe;
    for (j = 0; j < V; ++j) {
      const A a_s = (A(s[j]) - ns.max) * scale, a_t = (A(t[j]) - nt.max) * scale;
      safe.add(weighted_log_ratio(scratch.e_t[j], a_s, a_t));
    }
    gap = double(safe.sum) - double(safe.compensation);
  }
  return A(gap * kLn2);
}

// KL = Σ p (log p − log q) = Σ p (a_t − a_s) − (log Σ_t − log Σ_s), from
// pass 2's gap Σ e_t (a_t − a_s), the difference of the log sums taken in
// double before it is rounded: at T = 1e4 KL ~ 1e-8 is far below the
// rounding of log Σ ~ log V in float.
template <class A>
A kl_row_loss(A gap, const Normaliser<A>& ns, const Normaliser<A>& nt) {
  const A log_sum_gap = A(nt.log_sum_double - ns.log_sum_double);
  return non_negative(A(gap * nt.inv_sum - log_sum_gap));
}

// First index holding `value` (the row's max), 0 if none (a NaN row).
template <class A, class S>
int64_t index_of(const S* x, int64_t V, A value) {
  for (int64_t j = 0; j < V; ++j) {
    if (A(x[j]) == value) return j;
  }
  return 0;
}

// Everything element_terms needs besides the logits and the stored
// exponentials, for scalar (W = T) or SIMD (W = Vec<T>) evaluation. The *_mode
// values are the logits at the student's and the teacher's most probable
// entry (see divergence_math.h on shifted log ratios).
// log_sum_gap is log Σe_t − log Σe_s, rounded once from double: log p −
// log q = a_t − a_s − log_sum_gap (a = (x − max)/T), whose rounding is
// relative to its own size, not to log Σ ~ log V (see divergence_math.h).
template <class W>
struct RowConstants {
  W inv_t, max_s, inv_sum_s, max_t, inv_sum_t, log_sum_gap;
  W s_mode, t_at_s_mode, t_mode, s_at_t_mode;
  Coefficient<W> coef;
};

template <class T>
RowConstants<Vec<T>> broadcast(const RowConstants<T>& c) {
  using W = Vec<T>;
  return {W(c.inv_t),  W(c.max_s), W(c.inv_sum_s), W(c.max_t), W(c.inv_sum_t), W(c.log_sum_gap),
          W(c.s_mode), W(c.t_at_s_mode), W(c.t_mode), W(c.s_at_t_mode),
          {W(c.coef.c), W(c.coef.one_minus_c), W(c.coef.log_c), W(c.coef.log_one_minus_c)}};
}

template <int KIND, class W>
inline ElementTerms<W> terms_at(W s, W t, W e_s, W e_t, const RowConstants<W>& c) {
  ElementInputs<W> x;
  // x − max overflows to −inf for finite logits ~±3.4e38 apart: such an
  // entry has probability 0 (e = 0) and an infinite log ratio, as for −inf.
  x.log_ratio = ((t - c.max_t) * c.inv_t - (s - c.max_s) * c.inv_t) - c.log_sum_gap;
  x.q = e_s * c.inv_sum_s;
  x.p = e_t * c.inv_sum_t;
  // log(q/p) − (its value at q's mode), from logit differences (exact near
  // the mode); likewise for log(p/q) at p's mode. Only KL / REVERSE_KL read them.
  x.shifted_ratio_q = (s - c.s_mode) * c.inv_t - (t - c.t_at_s_mode) * c.inv_t;
  x.shifted_ratio_p = (t - c.t_mode) * c.inv_t - (s - c.s_at_t_mode) * c.inv_t;
  return element_terms<KIND>(x, c.coef);
}

// One row of S logits, computed in A: returns the row loss and writes the
// gradients requested (STUDENT_GRAD → gs, TEACHER_GRAD → gt), scaled by
// rp.grad_factor. `ns` receives the student's normaliser (the cross-entropy
// reuses it).
template <int KIND, bool STUDENT_GRAD, bool TEACHER_GRAD, class A, class S>
A divergence_row(const S* s, const S* t, int64_t V, const RowParams<A>& rp, S* gs, S* gt,
                 const Scratch<A>& scratch, const NextRow& next, Normaliser<A>& ns) {
  using IO = RowIO<A, S>;
  constexpr int64_t L = IO::L;
  // KL's loss comes out of pass 2; with at most the student gradient, pass 3
  // only writes (q − p)·factor and pass 4 is not needed.
  constexpr bool kl_shortcut = KIND == KL && !TEACHER_GRAD;
  Normaliser<A> nt{};
  ns = Normaliser<A>{};
  row_maxima(s, t, V, ns, nt);
  const A gap = row_exponentials<kl_shortcut>(s, t, V, rp.inv_temperature, ns, nt, scratch, next, [](int64_t) {});
  const A* e_s = scratch.e_s;
  const A* e_t = scratch.e_t;

  if constexpr (kl_shortcut) {
    const A loss = kl_row_loss(gap, ns, nt);
    if constexpr (STUDENT_GRAD) {
      // dKL/ds = (q − p)/T, with one explicit fused multiply-subtract: the
      // same rounding in every copy of the loop (write_row's first and last
      // packs and its streamed ones), which the compiler's contraction of
      // a·b − c·d would not promise
      const A fq = rp.grad_factor * ns.inv_sum, fp = rp.grad_factor * nt.inv_sum;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        if (V >= 32 && cpu_has_avx512_bf16()) {
          write_kl_gradient_bf16(gs, e_s, e_t, V, fq, fp, rp.stream_gradient);
          return loss;
        }
      }
#endif
      const Vec<A> vfq(fq), vfp(fp);
      write_row<A>(
          gs, V, rp.stream_gradient,
          [&](int64_t j) {
            return at::vec::fmsub(Vec<A>::loadu(e_s + j), vfq, Vec<A>::loadu(e_t + j) * vfp);
          },
          [&](int64_t j) { return A(std::fma(e_s[j], fq, -(e_t[j] * fp))); });
    }
    return loss;
  }

  RowConstants<A> c{rp.inv_temperature, ns.max, ns.inv_sum, nt.max, nt.inv_sum,
                    A(nt.log_sum_double - ns.log_sum_double), A(0), A(0), A(0), A(0), rp.coef};
  if constexpr ((KIND == REVERSE_KL && STUDENT_GRAD) || (KIND == KL && TEACHER_GRAD)) {
    const int64_t s_mode = index_of(s, V, ns.max), t_mode = index_of(t, V, nt.max);
    c.s_mode = A(s[s_mode]);
    c.t_at_s_mode = A(t[s_mode]);
    c.t_mode = A(t[t_mode]);
    c.s_at_t_mode = A(s[t_mode]);
    // A mode where the other side is −inf (an infinite divergence): shifting
    // by an infinite log ratio would make every term NaN; shift by the two
    // maxima instead (a finite row constant), so that the gradient is −inf /
    // NaN where the float64 reference's is, not NaN everywhere.
    if (!std::isfinite(double(c.t_at_s_mode))) {
      c.s_mode = ns.max;
      c.t_at_s_mode = nt.max;
    }
    if (!std::isfinite(double(c.s_at_t_mode))) {
      c.t_mode = nt.max;
      c.s_at_t_mode = ns.max;
    }
  }
  const RowConstants<Vec<A>> vc = broadcast(c);
  auto vector_terms = [&](int64_t j) {
    return terms_at<KIND>(IO::load(s + j), IO::load(t + j), Vec<A>::loadu(e_s + j),
                          Vec<A>::loadu(e_t + j), vc);
  };
  auto scalar_terms = [&](int64_t j) {
    return terms_at<KIND>(A(s[j]), A(t[j]), e_s[j], e_t[j], c);
  };

  // With the student gradient only, pass 3 keeps u where e_t was (p is not
  // read again) and pass 4 takes it from there: the terms, several
  // logarithms per element for JSD and the skew divergences, are evaluated
  // once instead of twice.
  constexpr bool keep_u = STUDENT_GRAD && !TEACHER_GRAD;
  A* const kept_u = scratch.e_t;

  // pass 3: loss, Σu, Σv; blocks of kBlock vectors summed pairwise before
  // each compensated add (as in pass 2: off the latency chain of the adds)
  CompensatedSum<Vec<A>> vloss, vsum_u, vsum_v;
  int64_t j = 0;
  for (; j + kBlock * L <= V; j += kBlock * L) {
    ElementTerms<Vec<A>> e[kBlock];
    for (int64_t k = 0; k < kBlock; ++k) {
      e[k] = vector_terms(j + k * L);
      if constexpr (keep_u) e[k].u.store(kept_u + j + k * L);
    }
    static_assert(kBlock == 4, "the pairwise block sums below add four vectors");
    vloss.add((e[0].loss + e[1].loss) + (e[2].loss + e[3].loss));
    if constexpr (STUDENT_GRAD) vsum_u.add((e[0].u + e[1].u) + (e[2].u + e[3].u));
    if constexpr (TEACHER_GRAD) vsum_v.add((e[0].v + e[1].v) + (e[2].v + e[3].v));
  }
  for (; j + L <= V; j += L) {
    const ElementTerms<Vec<A>> e = vector_terms(j);
    if constexpr (keep_u) e.u.store(kept_u + j);
    vloss.add(e.loss);
    if constexpr (STUDENT_GRAD) vsum_u.add(e.u);
    if constexpr (TEACHER_GRAD) vsum_v.add(e.v);
  }
  CompensatedSum<A> tail_loss, tail_u, tail_v;
  for (; j < V; ++j) {
    const ElementTerms<A> e = scalar_terms(j);
    if constexpr (keep_u) kept_u[j] = e.u;
    tail_loss.add(e.loss);
    if constexpr (STUDENT_GRAD) tail_u.add(e.u);
    if constexpr (TEACHER_GRAD) tail_v.add(e.v);
  }
  const A loss = non_negative(total(vloss, tail_loss));
  if constexpr (!(STUDENT_GRAD || TEACHER_GRAD)) return loss;
  const A sum_u = total(vsum_u, tail_u), sum_v = total(vsum_v, tail_v);

  // pass 4: gradients, `pack` vectors (one vector of S) at a time
  const Vec<A> vfactor(rp.grad_factor), vsum_u_all(sum_u), vsum_v_all(sum_v), vinv_sum_s(ns.inv_sum);
  constexpr int64_t step = IO::pack * L;
  for (j = 0; j + step <= V; j += step) {
    Vec<A> g_s[IO::pack], g_t[IO::pack];
    for (int64_t k = 0; k < IO::pack; ++k) {
      if constexpr (keep_u) {
        // q as terms_at forms it
        const Vec<A> q = Vec<A>::loadu(e_s + j + k * L) * vinv_sum_s;
        g_s[k] = softmax_grad(Vec<A>::loadu(kept_u + j + k * L), q, vsum_u_all, vfactor);
      } else {
        const ElementTerms<Vec<A>> e = vector_terms(j + k * L);
        if constexpr (STUDENT_GRAD) g_s[k] = softmax_grad(e.u, e.q, vsum_u_all, vfactor);
        if constexpr (TEACHER_GRAD) g_t[k] = softmax_grad(e.v, e.p, vsum_v_all, vfactor);
      }
    }
    if constexpr (STUDENT_GRAD) IO::store(gs + j, g_s);
    if constexpr (TEACHER_GRAD) IO::store(gt + j, g_t);
  }
  for (; j < V; ++j) {
    if constexpr (keep_u) {
      gs[j] = S(softmax_grad(kept_u[j], e_s[j] * ns.inv_sum, sum_u, rp.grad_factor));
    } else {
      const ElementTerms<A> e = scalar_terms(j);
      if constexpr (STUDENT_GRAD) gs[j] = S(softmax_grad(e.u, e.q, sum_u, rp.grad_factor));
      if constexpr (TEACHER_GRAD) gt[j] = S(softmax_grad(e.v, e.p, sum_v, rp.grad_factor));
    }
  }
  return loss;
}

#if defined(CPU_CAPABILITY_AVX512)
// KL rows with the student gradient only, float32 or bf16, in calls large
// enough to stream it (RowParams::stream_gradient): row i's gradient (q −
// p)·factor = e_s·fq − e_t·fp is written during row i + 1's exponential
// pass, one 64-byte line per vector of the block, so that its non-temporal
// stores drain while the core computes exponentials. Written after its own
// row, as divergence_row does, the gradient took a third of a float32
// 2048×32000 call on one thread (bench.kl_passes --threads 1: 33 ms, 23–24
// ms with the write left out). Each task alternates two scratch slots, the
// pending row's and the current one's. The values are divergence_row's bit
// for bit: the same fmsub per element (and for bf16 the same vcvtne2ps2bf16).
// The bf16 lines go through functions compiled for AVX512-BF16 (checked
// before they run), one call per block: a member with that target would not
// be inlined into the float32 rows either.
__attribute__((target("avx512bf16"))) void stream_kl_gradient_bf16_lines(
    c10::BFloat16* out, const float* e_s, const float* e_t, int64_t j, int64_t count, __m512 fq, __m512 fp) {
  for (; count > 0; --count, j += 32) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j), kl_gradient_bf16_at(e_s, e_t, j, fq, fp));
  }
}

// elements [j, j + count) of a bf16 KL gradient, count ≤ 32, by masked stores
__attribute__((target("avx512bf16"))) void store_kl_gradient_bf16_masked(
    c10::BFloat16* out, const float* e_s, const float* e_t, int64_t j, int64_t count, __m512 fq, __m512 fp) {
  const auto lanes = static_cast<__mmask32>((uint64_t(1) << count) - 1u);
  const __m512 lo = kl_gradient_lanes(e_s, e_t, j, fq, fp, static_cast<__mmask16>(lanes));
  const __m512 hi = kl_gradient_lanes(e_s, e_t, j + 16, fq, fp, static_cast<__mmask16>(lanes >> 16));
  _mm512_mask_storeu_epi16(out + j, lanes, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

template <class S>
class PendingKlGradient {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, c10::BFloat16>, "float32 or bf16 gradients");

 public:
  static constexpr int64_t kLine = 64 / int64_t(sizeof(S));  // elements per 64-byte line

  PendingKlGradient() = default;
  // e_s, e_t: the row's exponentials (scratch), fq = factor/Σe_s, fp =
  // factor/Σe_t, out: its gradient row of V elements
  PendingKlGradient(const float* e_s, const float* e_t, float fq, float fp, S* out, int64_t V)
      : e_s_(e_s), e_t_(e_t), fq_(_mm512_set1_ps(fq)), fp_(_mm512_set1_ps(fp)), out_(out), V_(V) {
    // whole 64-byte lines from the first boundary; the head and the tail masked
    const auto offset = int64_t(reinterpret_cast<std::uintptr_t>(out) % 64);
    head_ = std::min<int64_t>(V, offset == 0 ? 0 : (64 - offset) / int64_t(sizeof(S)));
    next_ = head_;
    lines_end_ = head_ + (V - head_) / kLine * kLine;
  }
  // up to `count` of the lines not yet written
  void write_lines(int64_t count) {
    count = std::min(count, (lines_end_ - next_) / kLine);
    if (count <= 0) return;
    if constexpr (std::is_same_v<S, float>) {
      for (int64_t j = next_; j < next_ + count * kLine; j += kLine) {
        _mm512_stream_ps(out_ + j, float_values_at(j, 0xFFFF));
      }
    } else {
      stream_kl_gradient_bf16_lines(out_, e_s_, e_t_, next_, count, fq_, fp_);
    }
    next_ += count * kLine;
  }
  // everything not yet written; then none is pending
  void finish() {
    if (out_ == nullptr) return;
    write_lines(lines_end_);
    write_masked(0, head_);
    write_masked(lines_end_, V_);
    out_ = nullptr;
  }

 private:
  __m512 float_values_at(int64_t j, __mmask16 lanes) const {
    return kl_gradient_lanes(e_s_, e_t_, j, fq_, fp_, lanes);
  }
  void write_masked(int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += kLine) {
      const int64_t count = std::min<int64_t>(kLine, end - j);
      if constexpr (std::is_same_v<S, float>) {
        const auto lanes = static_cast<__mmask16>((1u << count) - 1u);
        _mm512_mask_storeu_ps(out_ + j, lanes, float_values_at(j, lanes));
      } else {
        store_kl_gradient_bf16_masked(out_, e_s_, e_t_, j, count, fq_, fp_);
      }
    }
  }
  const float* e_s_ = nullptr;
  const float* e_t_ = nullptr;
  __m512 fq_ = _mm512_setzero_ps(), fp_ = _mm512_setzero_ps();
  S* out_ = nullptr;  // null: nothing pending
  int64_t V_ = 0, head_ = 0, next_ = 0, lines_end_ = 0;
};

// The rows after a pipelined KL row: the next one, whose maxima are taken
// during this row's exponentials (s null: none, or it is not kept), and the
// one after it, prefetched meanwhile so that those loads find it in cache.
template <class S>
struct RowsAhead {
  const S* s = nullptr;
  const S* t = nullptr;
  NextRow prefetch{nullptr, nullptr, 0};
};

// One pipelined KL row, whose maxima come in ns.max and nt.max: finishes the
// pending row's gradient and takes the next row's maxima (into next_ns.max,
// next_nt.max) during this row's exponentials, then leaves this row's
// gradient pending. The next row's pass 1 is thus no pass of its own: its
// loads, from cache (the row was prefetched during the row before), fill
// issue slots of this row's exponentials. Measured at 4096×1024 bf16: 5% less
// time on two threads, 8% on one. Returns the row loss.
template <class S>
float kl_row_pipelined(const S* s, const S* t, int64_t V, const RowParams<float>& rp, S* gs,
                       const Scratch<float>& scratch, Normaliser<float> ns, Normaliser<float> nt,
                       const RowsAhead<S>& ahead, Normaliser<float>& next_ns, Normaliser<float>& next_nt,
                       PendingKlGradient<S>& pending) {
  // kBlock vectors of float32 exponentials per block: as many 64-byte lines
  // of float32 gradient, half as many of bf16
  constexpr int64_t lines_per_block = kBlock * Vec<float>::size() / PendingKlGradient<S>::kLine;
  RowMaxima<float, S> next_maxima;
  const float gap = row_exponentials<true>(s, t, V, rp.inv_temperature, ns, nt, scratch, ahead.prefetch,
                                           [&](int64_t j) {
                                             pending.write_lines(lines_per_block);
                                             if (ahead.s != nullptr) next_maxima.add_block(ahead.s, ahead.t, j);
                                           });
  if (ahead.s != nullptr) next_maxima.finish(ahead.s, ahead.t, whole_blocks<float>(V), V, next_ns, next_nt);
  pending.finish();
  pending = PendingKlGradient<S>(scratch.e_s, scratch.e_t, rp.grad_factor * ns.inv_sum,
                                 rp.grad_factor * nt.inv_sum, gs, V);
  return kl_row_loss(gap, ns, nt);
}
#endif

// The row function for the gradients requested, chosen once per call.
template <class A, class S>
using RowFn = A (*)(const S*, const S*, int64_t, const RowParams<A>&, S*, S*, const Scratch<A>&,
                    const NextRow&, Normaliser<A>&);

// The row's cross-entropy log Σ_j exp(s_j) − s_y, after divergence_row (whose
// student normaliser is `ns` and whose e_s = exp((s − max)/T) is still in
// the scratch); with `gs`, adds rp.hard_scale·(softmax(s) − onehot(y)) to it.
// y is in [0, V) (checked by the op).
template <class T>
T cross_entropy_row(const T* s, int64_t V, int64_t y, const RowParams<T>& rp,
                    const Normaliser<T>& ns, T* e_s, T* gs) {
  constexpr int64_t L = Vec<T>::size();
  T log_sum = ns.log_sum, inv_sum = ns.inv_sum;
  if (!rp.ce_shares_normaliser) {
    // T ≠ 1: e_s ← exp(s − max) and its sum, in place of the divergence's
    // exponentials (no longer needed)
    const T sum = T(exp_sum(s, V, ns.max, T(1), e_s));
    log_sum = fk_log(sum);
    inv_sum = T(1) / sum;
  }
  if (gs != nullptr) {
    // softmax(s)_j = e_s[j] / Σ e_s
    const T factor = rp.hard_scale * inv_sum;
    const Vec<T> vfactor(factor);
    int64_t j = 0;
    for (; j + L <= V; j += L) {
      (Vec<T>::loadu(gs + j) + Vec<T>::loadu(e_s + j) * vfactor).store(gs + j);
    }
    for (; j < V; ++j) gs[j] += e_s[j] * factor;
    gs[y] -= rp.hard_scale;
  }
  // log Σ exp(s) − s_y = (max − s_y) + log Σ exp(s − max): exact at the max
  return (ns.max - s[y]) + log_sum;
}

template <int KIND, class A, class S>
RowFn<A, S> pick_row_fn(bool student_grad, bool teacher_grad) {
  if (student_grad && teacher_grad) return &divergence_row<KIND, true, true, A, S>;
  if (student_grad) return &divergence_row<KIND, true, false, A, S>;
  if (teacher_grad) return &divergence_row<KIND, false, true, A, S>;
  return &divergence_row<KIND, false, false, A, S>;
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
  rp.hard_scale = acc_t(a.hard_grad_scale);
  rp.ce_shares_normaliser = a.inv_temperature == 1.0;
  // Not with labels: the cross-entropy adds its gradient to the one just written.
  rp.stream_gradient = kCanStream && rp.student_grad && a.row_ce == nullptr &&
                       double(a.rows) * double(V) * sizeof(scalar_t) >= kStreamGradientBytes;
  auto* row_ce = static_cast<acc_t*>(a.row_ce);
  // bf16 / fp16 with labels: rows widened into the scratch first (see the
  // file header); otherwise the row functions read the logits as they are.
  const bool widen = !std::is_same_v<scalar_t, acc_t> && row_ce != nullptr;
  const RowFn<acc_t, scalar_t> row_fn =
      pick_row_fn<KIND, acc_t, scalar_t>(rp.student_grad, rp.teacher_grad);
  const RowFn<acc_t, acc_t> widened_row_fn =
      pick_row_fn<KIND, acc_t, acc_t>(rp.student_grad, rp.teacher_grad);
#if defined(CPU_CAPABILITY_AVX512)
  constexpr bool can_pipeline =
      KIND == KL && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>);
  const bool pipelined = can_pipeline && rp.stream_gradient && !rp.teacher_grad &&
                         (std::is_same_v<scalar_t, float> || cpu_has_avx512_bf16());
#else
  const bool pipelined = false;
#endif

  const auto student_offset = [&a](int64_t i) {
    return logit_row_offset(i, a.rows_per_block, a.student_block_stride, a.student_row_stride);
  };
  const auto teacher_offset = [&a](int64_t i) {
    return logit_row_offset(i, a.rows_per_block, a.teacher_block_stride, a.teacher_row_stride);
  };

  // Grain: enough rows that a task streams at least ~256 KiB.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(V, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    // Per task: the exponentials of one row (pipelined: of two), and when
    // widening its float logits and gradients.
    std::vector<acc_t> buffer((widen ? 6 : pipelined ? 4 : 2) * V);
    const Scratch<acc_t> scratch{buffer.data(), buffer.data() + V};
#if defined(CPU_CAPABILITY_AVX512)
    const Scratch<acc_t> other_scratch{buffer.data() + (pipelined ? 2 * V : 0),
                                       buffer.data() + (pipelined ? 3 * V : 0)};
    std::conditional_t<can_pipeline, PendingKlGradient<scalar_t>, PendingKlGradient<float>> pending;
    bool other_slot = false;
    // the maxima of row maxima_row (−1: none), taken during the row before it
    Normaliser<acc_t> row_ns{}, row_nt{};
    int64_t maxima_row = -1;
#endif
    acc_t* s_buf = buffer.data() + 2 * V;
    acc_t* t_buf = s_buf + (widen ? V : 0);
    acc_t* gs_buf = t_buf + (widen ? V : 0);
    acc_t* gt_buf = gs_buf + (widen ? V : 0);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* gs_row = rp.student_grad ? student_grad + i * V : nullptr;
      scalar_t* gt_row = rp.teacher_grad ? teacher_grad + i * V : nullptr;
      if (a.row_mask != nullptr && !a.row_mask[i]) {
        row_loss[i] = acc_t(0);
        if (row_ce != nullptr) row_ce[i] = acc_t(0);
        if (gs_row) std::memset(static_cast<void*>(gs_row), 0, V * sizeof(scalar_t));
        if (gt_row) std::memset(static_cast<void*>(gt_row), 0, V * sizeof(scalar_t));
        continue;
      }
      const scalar_t* s_row = student + student_offset(i);
      const scalar_t* t_row = teacher + teacher_offset(i);
      const NextRow next =
          i + 1 < end
              ? NextRow{reinterpret_cast<const char*>(student + student_offset(i + 1)),
                        reinterpret_cast<const char*>(teacher + teacher_offset(i + 1)),
                        static_cast<int64_t>(sizeof(scalar_t))}
              : NextRow{nullptr, nullptr, 0};
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (can_pipeline) {
        if (pipelined) {
          // this row's maxima: taken during the previous row's exponentials, or here
          if (maxima_row != i) row_maxima(s_row, t_row, V, row_ns, row_nt);
          RowsAhead<scalar_t> ahead;
          const bool next_kept = i + 1 < end && (a.row_mask == nullptr || a.row_mask[i + 1]);
          if (next_kept) {
            ahead.s = student + student_offset(i + 1);
            ahead.t = teacher + teacher_offset(i + 1);
          }
          if (i + 2 < end) {
            ahead.prefetch = NextRow{reinterpret_cast<const char*>(student + student_offset(i + 2)),
                                     reinterpret_cast<const char*>(teacher + teacher_offset(i + 2)),
                                     static_cast<int64_t>(sizeof(scalar_t))};
          }
          Normaliser<acc_t> next_ns{}, next_nt{};
          row_loss[i] = kl_row_pipelined(s_row, t_row, V, rp, gs_row, other_slot ? other_scratch : scratch,
                                         row_ns, row_nt, ahead, next_ns, next_nt, pending);
          row_ns = next_ns;
          row_nt = next_nt;
          maxima_row = next_kept ? i + 1 : -1;
          other_slot = !other_slot;
          continue;
        }
      }
#endif
      Normaliser<acc_t> ns;
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        if (widen) {
          at::vec::convert(s_row, s_buf, V);
          at::vec::convert(t_row, t_buf, V);
          row_loss[i] = widened_row_fn(s_buf, t_buf, V, rp, gs_buf, gt_buf, scratch, next, ns);
          row_ce[i] = cross_entropy_row(s_buf, V, a.labels[i], rp, ns, scratch.e_s,
                                        gs_row ? gs_buf : nullptr);
          if (gs_row) at::vec::convert(gs_buf, gs_row, V);
          if (gt_row) at::vec::convert(gt_buf, gt_row, V);
          continue;
        }
      }
      row_loss[i] = row_fn(s_row, t_row, V, rp, gs_row, gt_row, scratch, next, ns);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (row_ce != nullptr) {
          row_ce[i] = cross_entropy_row(s_row, V, a.labels[i], rp, ns, scratch.e_s, gs_row);
        }
      }
    }
#if defined(CPU_CAPABILITY_AVX512)
    pending.finish();
    // order the streaming stores before the results are read
    if (rp.stream_gradient) _mm_sfence();
#endif
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
