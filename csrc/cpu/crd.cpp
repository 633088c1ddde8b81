// CPU implementation of fastkd::crd_nce_forward (docs/spec.md §4, CRD): one direction
// of RepDistiller's contrastive memory loss, fused. For each sample b and each
// of its K+1 memory indices j (column 0 the positive, the others negatives):
//
//   s_bj = bank[idx_bj] · v_b                     (gathered row · embedding)
//   P_bj = exp(s_bj / T) / Z
//   row_loss_b = −log(P_b0 / (P_b0 + c')) − Σ_{k≥1} log(c / (P_bk + c'))
//
// with c = K / n_data (the noise probability K·P_n, P_n = 1 / n_data) and
// c' = c + 1e-7 (RepDistiller's eps). The terms are evaluated as
// log1p(c' / P_b0) and log1p(P_bk / c') + log(c' / c): P_bk is ~1/n_data
// against c' ~ K/n_data, so log(P_bk + c') − log c sums K values of size
// log c' whose difference from K·log c is the loss — in float32 that
// cancellation loses ~1e-4 of it at K = 16384 (as the float32 reference does);
// log1p keeps each term's small part exact. Each gathered row is used for its dot
// product and, while it is in cache, for the gradient,
//
//   d row_loss_b / d v_b = Σ_j g_bj bank[idx_bj],
//   g_b0 = −c' / (T (P_b0 + c')),   g_bk = P_bk / (T (P_bk + c')),
//
// so the (B, K+1, D) gather RepDistiller materialises never exists: memory is
// O(B·D) besides the inputs. The bank gets no gradient (RepDistiller detaches
// it). Samples run in parallel (at::parallel_for); rows are prefetched a few
// indices ahead, since the gather is random access into an n_data × D bank.
//
// Z (the normalisation constant) is a parameter, a 0-dim tensor (read here
// on the host: a CPU tensor); z <= 0 asks the op to set it
// from this batch, Z = mean_bj exp(s_bj / T) · n_data (RepDistiller's first
// batch), which costs one extra gather-dot pass. The Z used is returned.
//
// float32 inputs compute the dot products, exp and log in float32 and
// accumulate the loss and the gradient in double; float64 inputs stay float64.
// Each sample is computed by one task, in column order, so the results do not
// depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/crd_op.h"

namespace fastkd {
namespace cpu {
namespace {

// RepDistiller's ContrastLoss eps, in the denominators P + c'.
constexpr double kNceEps = 1e-7;
// How many indices ahead the gathered rows are prefetched.
constexpr int64_t kPrefetchDistance = 6;

template <class T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * int64_t(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// Sixteen independent partial sums: one running sum would chain every
// addition on the previous one (latency-bound); these vectorise into
// independent SIMD accumulators.
constexpr int64_t kDotLanes = 16;

template <class T>
inline T dot(const T* a, const T* b, int64_t d) {
  T acc[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= d; i += kDotLanes) {
    for (int64_t l = 0; l < kDotLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (; i < d; ++i) acc[0] += a[i] * b[i];
  T sum = T(0);
  for (int64_t l = 0; l < kDotLanes; ++l) sum += acc[l];
  return sum;
}

// log1p(x) for x >= 0 (or NaN). A negative's P_k / c' is ~1/K, where the
// series x − x²/2 + x³/3 − x⁴/4 + x⁵/5 is within x⁶/6 < 2e-13·x of it (x < 0.01)
// and costs a few multiplications instead of a call.
template <class T>
inline T log1p_nonnegative(T x) {
  if (x < T(0.01)) return x * (T(1) + x * (T(-0.5) + x * (T(1) / 3 + x * (T(-0.25) + x * T(0.2)))));
  return std::log1p(x);
}

// y += alpha · x with y in double: a float32 alpha · x is exact in double,
// so the only rounding is the sum's, at double precision.
template <class T>
inline void axpy(T alpha, const T* x, double* y, int64_t d) {
  const double a = alpha;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * static_cast<double>(x[i]);
}

// Raw views of the op's inputs.
template <class T>
struct CrdView {
  const T* v;          // [B, D], contiguous
  const T* bank;       // [n_data, D] rows at bank_stride
  const int64_t* idx;  // [B, K+1], contiguous
  int64_t batch, dim, cols, bank_stride;
  T inv_temperature;

  const T* row(int64_t b, int64_t j) const { return bank + idx[b * cols + j] * bank_stride; }
};

// Σ_bj exp(s_bj / T), summed per sample in double and then over samples in
// order, so the result does not depend on the number of threads.
template <class T>
double sum_of_exponentials(const CrdView<T>& w) {
  std::vector<double> per_sample(w.batch, 0.0);
  at::parallel_for(0, w.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* vb = w.v + b * w.dim;
      double total = 0.0;
      for (int64_t j = 0; j < w.cols; ++j) {
        if (j + kPrefetchDistance < w.cols) prefetch_row(w.row(b, j + kPrefetchDistance), w.dim);
        total += std::exp(dot(w.row(b, j), vb, w.dim) * w.inv_temperature);
      }
      per_sample[b] = total;
    }
  });
  double total = 0.0;
  for (double s : per_sample) total += s;
  return total;
}

template <class T>
void crd_kernel(const CrdView<T>& w, int64_t n_data, T z, double* row_loss, T* grad) {
  const int64_t negatives = w.cols - 1;
  // c = K · P_n, the noise term; c' = c + eps (RepDistiller).
  const double c = double(negatives) / double(n_data);
  const T c_eps = T(c + kNceEps);
  const T inv_c_eps = T(1.0 / (c + kNceEps));
  // Σ_k log((P_k + c') / c) = Σ_k log1p(P_k / c') + K log(c' / c)
  const double shift = negatives > 0 ? double(negatives) * std::log1p(kNceEps / c) : 0.0;
  const T inv_z = T(1) / z;
  at::parallel_for(0, w.batch, 1, [&](int64_t begin, int64_t end) {
    // The sample's gradient Σ_j g_bj bank[idx_bj] sums K+1 rows (16385 in
    // RepDistiller) with weights of both signs: it accumulates in double and
    // is rounded once.
    std::vector<double> acc(grad == nullptr ? 0 : w.dim);
    for (int64_t b = begin; b < end; ++b) {
      const T* vb = w.v + b * w.dim;
      T* gb = grad == nullptr ? nullptr : grad + b * w.dim;
      if (gb != nullptr) std::fill(acc.begin(), acc.end(), 0.0);
      double loss = 0.0;
      for (int64_t j = 0; j < w.cols; ++j) {
        if (j + kPrefetchDistance < w.cols) prefetch_row(w.row(b, j + kPrefetchDistance), w.dim);
        const T* row = w.row(b, j);
        // P = exp(s / T) / Z
        const T p = std::exp(dot(row, vb, w.dim) * w.inv_temperature) * inv_z;
        const T denom = p + c_eps;
        T g;
        if (j == 0) {
          // −log(P0 / (P0 + c')) = log1p(c' / P0);  d/ds = −c' / (T (P0 + c')).
          // P0 = inf (an infinite score): the ratio is inf / inf, NaN, where
          // log1p(c' / P0) would give 0.
          loss += std::isinf(p) ? p - p : std::log1p(c_eps / p);
          g = -c_eps / denom * w.inv_temperature;
        } else {
          // −log(c / (Pk + c')) = log1p(Pk / c') + log(c' / c);  d/ds = Pk / (T (Pk + c'))
          loss += log1p_nonnegative(p * inv_c_eps);
          g = p / denom * w.inv_temperature;
        }
        if (gb != nullptr) axpy(g, row, acc.data(), w.dim);
      }
      if (gb != nullptr) {
        for (int64_t i = 0; i < w.dim; ++i) gb[i] = static_cast<T>(acc[i]);
      }
      row_loss[b] = loss + shift;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_nce_forward_cpu(
    const at::Tensor& v, const at::Tensor& bank, const at::Tensor& contrast_idx, const at::Tensor& z_tensor,
    double inv_temperature, bool student_grad) {
  check_crd_args(v, bank, contrast_idx, z_tensor, inv_temperature, at::kCPU);
  const double z = z_tensor.item<double>();
  const at::Tensor vc = v.contiguous();
  const at::Tensor idx = contrast_idx.contiguous();
  const int64_t batch = v.size(0), dim = v.size(1), n_data = bank.size(0);
  at::Tensor row_loss = at::empty({batch}, v.options().dtype(at::kDouble));
  at::Tensor grad = student_grad ? at::empty({batch, dim}, v.options()) : at::empty({0, 0}, v.options());
  at::Tensor z_out = at::empty({}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "crd_nce_forward", [&] {
    const CrdView<scalar_t> w{vc.data_ptr<scalar_t>(), bank.data_ptr<scalar_t>(),
                              idx.data_ptr<int64_t>(), batch, dim, idx.size(1),
                              bank.size(0) <= 1 ? dim : bank.stride(0),
                              static_cast<scalar_t>(inv_temperature)};
    scalar_t z_used = static_cast<scalar_t>(z);
    if (z <= 0 && batch > 0) {
      // Z = mean_bj exp(s_bj / T) · n_data, rounded to the input dtype once,
      // so that the stored Z reproduces this batch's loss exactly.
      const double mean = sum_of_exponentials(w) / (double(batch) * double(w.cols));
      z_used = static_cast<scalar_t>(mean * double(n_data));
    }
    z_out.fill_(z_used);
    if (batch > 0) {
      crd_kernel(w, n_data, z_used, row_loss.data_ptr<double>(),
                 student_grad ? grad.data_ptr<scalar_t>() : nullptr);
    }
  });
  return {row_loss.to(v.scalar_type()), grad, z_out};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("crd_nce_forward", &fastkd::cpu::crd_nce_forward_cpu);
}
