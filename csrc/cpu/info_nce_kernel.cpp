// The InfoNCE row kernels on CPU: from a block of logits q_i·k_j / τ (one
// GEMM, done by the caller) to the rows' log-sum-exp and loss (forward),
// their softmax (the forward that keeps the probabilities), or the gradient
// of the loss with respect to the logits (the backward that recomputes them),
// each in one pass through memory with the exponentials lane-parallel.
//
// This file is compiled three times by setup.py, with CPU_CAPABILITY set to
// DEFAULT, AVX2 and AVX512 (and the matching -m flags); csrc/cpu/info_nce.cpp
// picks one at run time from what the CPU supports.
//
// exp is divergence::fk_exp_normaliser (≤ 2 ulp with AVX512, at::vec's exp_u20
// elsewhere; Sleef's exp for double): every argument is logit − max or
// logit − lse, ≤ 0 up to rounding, the range it is accurate on.
#include "info_nce_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "vec_math.h"

namespace fastkd {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {

using divergence::Vec;  // at::vec::Vectorized<T> of this capability

// Elements per parallel task: enough to amortise the task, few enough that
// two threads share a block of a few rows.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

// The lanes of v combined left to right by op (a fixed order: the result does
// not depend on anything but v).
template <class T, class Op>
T lanes_reduce(Vec<T> v, Op op) {
  std::array<T, Vec<T>::size()> lanes;
  v.store(lanes.data());
  T total = lanes[0];
  for (size_t i = 1; i < lanes.size(); ++i) total = op(total, lanes[i]);
  return total;
}

template <class T>
T row_max(const T* x, int64_t cols) {
  constexpr int64_t L = Vec<T>::size();
  int64_t j = 0;
  T best = -std::numeric_limits<T>::infinity();
  if (cols >= L) {
    Vec<T> acc = Vec<T>::loadu(x);
    for (j = L; j + L <= cols; j += L) acc = divergence::fk_max_unordered(acc, Vec<T>::loadu(x + j));
    best = lanes_reduce(acc, [](T a, T b) { return b > a || b != b ? b : a; });
  }
  for (; j < cols; ++j) best = x[j] > best || x[j] != x[j] ? x[j] : best;
  return best;
}

template <class T>
bool row_has_nan(const T* x, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    if (x[j] != x[j]) return true;
  }
  return false;
}

// Σ_j exp(x_j − shift); with STORE the exponentials replace x.
template <bool STORE, class T>
T row_exp_sum(T* x, int64_t cols, T shift) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> v_shift(shift);
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + L <= cols; j += L) {
    const Vec<T> e = divergence::fk_exp_normaliser(Vec<T>::loadu(x + j) - v_shift);
    if constexpr (STORE) e.store(x + j);
    acc = acc + e;
  }
  T total = lanes_reduce(acc, [](T a, T b) { return a + b; });
  for (; j < cols; ++j) {
    const T e = std::exp(x[j] - shift);
    if constexpr (STORE) x[j] = e;
    total += e;
  }
  return total;
}

template <class T>
void scale_row(T* x, int64_t cols, T factor) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> v_factor(factor);
  int64_t j = 0;
  for (; j + L <= cols; j += L) (Vec<T>::loadu(x + j) * v_factor).store(x + j);
  for (; j < cols; ++j) x[j] *= factor;
}

// row_lse and row_loss of every row; with SOFTMAX the row becomes P.
template <bool SOFTMAX, class T>
void rows_lse(const InfoNceRowsArgs<T>& w) {
  at::parallel_for(0, w.rows, grain_rows(w.cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* x = w.logits + i * w.ld;
      const T positive = x[w.labels[i]];  // read before SOFTMAX overwrites it
      const T shift = row_max(x, w.cols);
      if (std::isinf(shift)) {
        // A logit of +inf (or every logit −inf): x − shift would be NaN
        // where the log-sum-exp is shift itself, unless the row holds a NaN.
        const T lse = row_has_nan(x, w.cols) ? std::numeric_limits<T>::quiet_NaN() : shift;
        w.row_lse[i] = lse;
        w.row_loss[i] = lse - positive;
        if constexpr (SOFTMAX) {
          for (int64_t j = 0; j < w.cols; ++j) x[j] = std::exp(x[j] - lse);
        }
        continue;
      }
      const T sum = row_exp_sum<SOFTMAX>(x, w.cols, shift);
      const T lse = shift + std::log(sum);
      w.row_lse[i] = lse;
      w.row_loss[i] = lse - positive;
      if constexpr (SOFTMAX) scale_row(x, w.cols, T(1) / sum);
    }
  });
}

template <class T>
void rows_logit_grad(const InfoNceRowsArgs<T>& w) {
  constexpr int64_t L = Vec<T>::size();
  at::parallel_for(0, w.rows, grain_rows(w.cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* x = w.logits + i * w.ld;
      const T lse = w.row_lse[i], scale = w.row_scale[i];
      const Vec<T> v_lse(lse), v_scale(scale);
      int64_t j = 0;
      for (; j + L <= w.cols; j += L) {
        const Vec<T> p = divergence::fk_exp_normaliser(Vec<T>::loadu(x + j) - v_lse);
        (p * v_scale).store(x + j);
      }
      for (; j < w.cols; ++j) x[j] = std::exp(x[j] - lse) * scale;
      x[w.labels[i]] -= scale;
    }
  });
}

}  // namespace

void info_nce_rows_lse(const InfoNceRowsArgs<float>& args) { rows_lse<false>(args); }
void info_nce_rows_lse(const InfoNceRowsArgs<double>& args) { rows_lse<false>(args); }
void info_nce_rows_softmax(const InfoNceRowsArgs<float>& args) { rows_lse<true>(args); }
void info_nce_rows_softmax(const InfoNceRowsArgs<double>& args) { rows_lse<true>(args); }
void info_nce_rows_logit_grad(const InfoNceRowsArgs<float>& args) { rows_logit_grad(args); }
void info_nce_rows_logit_grad(const InfoNceRowsArgs<double>& args) { rows_logit_grad(args); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastkd
