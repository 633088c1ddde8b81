// CPU implementation of fastkd::rkd_distance_forward / fastkd::rkd_angle_forward
// (docs/spec.md §2): RKD's distance and angle losses and the student's gradient, from
// Gram matrices, with O(n²) memory (the reference holds (n, n, D) differences
// and (n, n, n) angles).
//
// Both ops centre the embeddings first (distances and angles do not change,
// and the Gram form's rounding shrinks with the norms), and recompute the
// squared distance of pairs that the Gram form cannot resolve,
// ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j below a multiple of its rounding error, from
// the difference x_i − x_j itself, so that exact duplicates are exactly 0 as
// in the reference.
//
// bfloat16 / float16 inputs are upcast; the distance op accumulates in float32
// (float64 for float64 input). The angle op builds its Gram matrix in float64
// and hands it to the float32 kernel split into hi + lo halves (see
// rkd_kernel.h); float64 input runs the kernel in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "../common/rkd_angle_grad.h"
#include "allocation.h"
#include "thread_invariant_mm.h"
#include "capability.h"
#include "rkd_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr double kPdistEps = 1e-12;      // RepDistiller's clamp on squared distances
constexpr double kNormalizeEps = 1e-12;  // F.normalize's eps

// Whether the Gram-form squared distance `sq` of rows with squared norms
// `ni`, `nj` is too close to its rounding error (relative eps · (ni + nj) of
// the Gram matrix's dtype) for a distance accurate to `target` relative to
// the norms: sq < (eps / target)² (ni + nj). NaN counts as near (the
// recomputation keeps it NaN).
inline bool near_pair(double sq, double ni, double nj, double factor) {
  return !(sq >= factor * (ni + nj));
}

double near_factor(double eps, double target) { return (eps / target) * (eps / target); }

// ‖a − b‖² in float64, from the rows themselves.
template <class T>
double direct_sq(const T* a, const T* b, int64_t d) {
  double total = 0;
  for (int64_t c = 0; c < d; ++c) {
    const double diff = static_cast<double>(a[c]) - static_cast<double>(b[c]);
    total += diff * diff;
  }
  return total;
}

// ---- RKD distance -----------------------------------------------------------

// The SIMD variant of each distance row pass (rkd_kernel.h).
template <class T>
double distance_row(const T* g, const T* norms, T n_i, T factor, T* d, uint8_t* near, int64_t n,
                    int64_t diag) {
  return pick_variant(&AVX512::distance_row<T>, &AVX2::distance_row<T>, &DEFAULT::distance_row<T>)(
      g, norms, n_i, factor, d, near, n, diag);
}

template <class T>
std::pair<double, double> distance_loss_row(const T* d_s, T* d_t, T inv_s, T inv_t, T inv_n2, int64_t n) {
  return pick_variant(&AVX512::distance_loss_row<T>, &AVX2::distance_loss_row<T>,
                      &DEFAULT::distance_loss_row<T>)(d_s, d_t, inv_s, inv_t, inv_n2, n);
}

template <class T>
double distance_coef_row(T* d_s, const T* q, T shift, T inv_s, int64_t n) {
  return pick_variant(&AVX512::distance_coef_row<T>, &AVX2::distance_coef_row<T>,
                      &DEFAULT::distance_coef_row<T>)(d_s, q, shift, inv_s, n);
}

// One side's distances d_ij = sqrt(max(‖x_i − x_j‖², 1e-12)) (0 on the
// diagonal) into `dist` (an [n, n] buffer, `gram` itself allowed), from its Gram matrix; returns
// their sum. `near` ([n, n]) receives 1 for the pairs recomputed from
// their differences (the diagonal included).
template <class T>
double distances(const at::Tensor& x, const at::Tensor& gram, T* dist, uint8_t* near) {
  const int64_t n = x.size(0), d = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* g = gram.data_ptr<T>();
  const at::Tensor norms_t = gram.diagonal().contiguous();
  const T* norms = norms_t.data_ptr<T>();
  // The distance's error relative to the norms: 1e-6 (float32), 1e-13 (float64).
  const T factor = static_cast<T>(std::is_same_v<T, double> ? near_factor(2.220446049250313e-16, 1e-13)
                                                            : near_factor(1.1920928955078125e-07, 1e-6));
  std::vector<double> row_sum(n, 0.0);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = dist + i * n;
      uint8_t* near_row = near + i * n;
      double sum = distance_row(g + i * n, norms, norms[i], factor, row, near_row, n, i);
      for (int64_t j = 0; j < n; ++j) {
        if (!near_row[j]) continue;
        if (j == i) {
          row[j] = T(0);
          continue;
        }
        // std::max(NaN, eps) is NaN: NaN stays NaN
        row[j] = static_cast<T>(std::sqrt(std::max(direct_sq(xp + i * d, xp + j * d, d), kPdistEps)));
        sum += row[j];
      }
      row_sum[i] = sum;
    }
  });
  double total = 0;
  for (double v : row_sum) total += v;
  return total;
}

template <class T>
std::tuple<at::Tensor, at::Tensor> rkd_distance_impl(const at::Tensor& student,
                                                     const at::Tensor& teacher, bool student_grad) {
  const int64_t n = student.size(0);
  const auto acc = accumulation_type(student);
  const at::Tensor xs = student.to(acc).contiguous();
  const at::Tensor xt = teacher.to(acc).contiguous();
  const at::Tensor empty_grad = at::zeros({0, 0}, student.options());
  if (n == 1) {
    // No pair: loss 0, gradient 0; a NaN (or inf) input still gives NaN.
    const at::Tensor loss = (xs.sum() + xt.sum()).mul_(0);
    return {loss, student_grad ? at::zeros_like(student) : empty_grad};
  }
  const at::Tensor xs_c = xs - xs.mean(0, true);
  const at::Tensor xt_c = xt - xt.mean(0, true);
  // The distances overwrite the Gram matrices (row by row, each entry read
  // before it is written): two fewer n² buffers, on a loss whose cost is
  // passes over n² entries. Every n² buffer comes from the cache of freed
  // buffers (allocation.h): faulting 64 MiB in afresh costs about what the
  // product that fills it does. The near flags are written in full before
  // any is read, so they are not zeroed first.
  const at::Tensor ds = mm_into_cached(xs_c, xs_c.t());
  const at::Tensor dt = mm_into_cached(xt_c, xt_c.t());
  const at::Tensor near_flags = empty_for_output({2, n, n}, at::TensorOptions().dtype(at::kByte));
  uint8_t* near_s = near_flags.data_ptr<uint8_t>();
  uint8_t* near_t = near_s + n * n;
  T* ps = ds.data_ptr<T>();
  T* pt = dt.data_ptr<T>();
  const double pairs = double(n) * double(n - 1);
  const double mean_s = distances<T>(xs, ds, ps, near_s) / pairs;
  const double mean_t = distances<T>(xt, dt, pt, near_t) / pairs;
  const double inv_s = 1.0 / mean_s, inv_t = 1.0 / mean_t;
  const double inv_n2 = 1.0 / (double(n) * double(n));

  // ρ = d_s/μ_s − d_t/μ_t; loss = mean smooth_l1(ρ); q = ∂loss/∂ρ (into dt);
  // Q = Σ q d_s (the mean's share of the gradient).
  std::vector<double> loss_rows(n), q_rows(n);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::tie(loss_rows[i], q_rows[i]) = distance_loss_row<T>(
          ps + i * n, pt + i * n, static_cast<T>(inv_s), static_cast<T>(inv_t), static_cast<T>(inv_n2), n);
    }
  });
  double loss = 0, big_q = 0;
  for (int64_t i = 0; i < n; ++i) {
    loss += loss_rows[i];
    big_q += q_rows[i];
  }
  const at::Tensor loss_t = at::scalar_tensor(loss * inv_n2, xs.options());
  if (!student_grad) return {loss_t, empty_grad};

  // ∂loss/∂d_ij = (q_ij − Q/(μ M)) / μ off the diagonal; with
  // d = sqrt(‖x_i − x_j‖²) and both (i, j) and (j, i), x_i's gradient is
  // Σ_j C_ij (x_i − x_j), C_ij = 2 ∂loss/∂d_ij / d_ij (0 where the clamp
  // holds d at 1e-6). Far pairs go through C (into ds); near pairs are
  // added from their differences, where the matrix form would cancel.
  const double shift = big_q * inv_s / pairs;
  const int64_t dim = xs.size(1);
  at::Tensor grad = at::zeros({n, dim}, at::TensorOptions().dtype(at::kDouble));
  double* pg = grad.data_ptr<double>();
  const T* xp = xs.data_ptr<T>();
  std::vector<double> c_rows(n);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = ps + i * n;
      double sum = distance_coef_row<T>(row, pt + i * n, static_cast<T>(shift), static_cast<T>(inv_s), n);
      for (int64_t j = 0; j < n; ++j) {
        if (!near_s[i * n + j] || j == i) continue;
        const double c = row[j];
        for (int64_t k = 0; k < dim; ++k) {
          pg[i * dim + k] += c * (double(xp[i * dim + k]) - double(xp[j * dim + k]));
        }
        row[j] = T(0);
        sum -= c;
      }
      c_rows[i] = sum;
    }
  });
  const at::Tensor c_sum = at::from_blob(c_rows.data(), {n, 1}, at::kDouble).to(acc);
  at::Tensor far = xs_c * c_sum - thread_invariant_mm(ds, xs_c);
  return {loss_t, grad.add_(far).to(student.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_forward_cpu(const at::Tensor& student,
                                                            const at::Tensor& teacher,
                                                            bool student_grad) {
  check_feature_pair_args(student, teacher, at::kCPU);
  if (student.scalar_type() == at::kDouble) return rkd_distance_impl<double>(student, teacher, student_grad);
  return rkd_distance_impl<float>(student, teacher, student_grad);
}

// ---- RKD angle ----------------------------------------------------------------

// One side's kernel inputs (rkd_kernel.h): the float64 Gram matrix of
// the centred rows split into hi + lo halves of type T, and the signed
// inverse distances u.
template <class T>
T* ptr(const at::Tensor& x) { return x.data_ptr<T>(); }

template <class T>
struct AngleSide {
  at::Tensor centred;  // [n, D] float64
  at::Tensor hi, lo, u;
  // [n]: 1 where some x_k lies within sqrt(kFastPathRatio) · max‖x‖ of x_i
  std::vector<uint8_t> near_anchor;
};

// Below this squared distance, relative to the largest squared norm of the
// centred rows, a pair is near: its anchor takes the kernel's exact path.
// Elsewhere the hi halves alone give the numerators within about
// 4 eps / kFastPathRatio ≈ 2.4e-6 of ‖x‖² / (e_ij e_ik) ≤ 1 / kFastPathRatio.
constexpr double kFastPathRatio = 0.1;

template <class T>
AngleSide<T> angle_side(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor x64 = x.to(at::kDouble).contiguous();
  AngleSide<T> side;
  side.centred = x64 - x64.mean(0, true);
  const at::Tensor gram = at::mm(side.centred, side.centred.t());
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  side.hi = at::empty({n, n}, opts);
  side.lo = at::empty({n, n}, opts);
  side.u = at::empty({n, n}, opts);
  const double* g = gram.data_ptr<double>();
  const double* xp = x64.data_ptr<double>();
  T* hi = ptr<T>(side.hi);
  T* lo = ptr<T>(side.lo);
  T* u = ptr<T>(side.u);
  // u needs the distances to float32 (float64) precision relative to the norms.
  const double factor = near_factor(2.220446049250313e-16, std::is_same_v<T, double> ? 1e-13 : 1e-8);
  const double near_sq = kFastPathRatio * gram.diagonal().max().item<double>();
  side.near_anchor.assign(n, 0);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double ni = g[i * n + i];
      for (int64_t j = 0; j < n; ++j) {
        const int64_t e = i * n + j;
        hi[e] = static_cast<T>(g[e]);
        lo[e] = static_cast<T>(g[e] - static_cast<double>(hi[e]));
        if (j == i) {
          u[e] = T(0);
          continue;
        }
        const double nj = g[j * n + j];
        double sq = ni + nj - 2.0 * g[e];
        if (near_pair(sq, ni, nj, factor)) sq = direct_sq(xp + i * d, xp + j * d, d);
        sq = sq < 0 ? 0.0 : sq;  // NaN stays NaN
        if (sq < near_sq) side.near_anchor[i] = 1;
        // F.normalize: x / max(‖x‖, eps); a coinciding pair is flagged by the sign.
        u[e] = sq == 0 ? static_cast<T>(-1.0 / kNormalizeEps)
                       : static_cast<T>(1.0 / std::max(std::sqrt(sq), kNormalizeEps));
      }
    }
  });
  return side;
}

template <class T>
double run_angle_kernel(const AngleArgs<T>& args) {
  using Kernel = double (*)(const AngleArgs<T>&);
  return pick_variant<Kernel>(&AVX512::rkd_angle_kernel, &AVX2::rkd_angle_kernel,
                              &DEFAULT::rkd_angle_kernel)(args);
}

template <class T>
std::tuple<at::Tensor, at::Tensor> rkd_angle_impl(const at::Tensor& student, const at::Tensor& teacher,
                                                  bool student_grad) {
  const int64_t n = student.size(0);
  const auto acc = accumulation_type(student);
  if (n == 1) {
    // Every angle has a repeated index: loss 0, gradient 0; the reference's
    // x − x still turns a NaN (or inf) input into a NaN loss.
    const at::Tensor loss = (student.to(acc).sum() + teacher.to(acc).sum()).mul_(0);
    return {loss, student_grad ? at::zeros_like(student) : at::zeros({0, 0}, student.options())};
  }
  AngleSide<T> s = angle_side<T>(student);
  AngleSide<T> t = angle_side<T>(teacher);
  const auto opts = s.hi.options();
  std::vector<uint8_t> precise(n);
  for (int64_t i = 0; i < n; ++i) precise[i] = s.near_anchor[i] | t.near_anchor[i];
  at::Tensor d_gram, row_sums, ang_sums;
  if (student_grad) {
    d_gram = at::zeros({n, n}, opts);
    row_sums = at::zeros({n, n}, opts);
    ang_sums = at::zeros({n, n}, opts);
  }
  AngleArgs<T> args{n,
                    ptr<T>(s.hi), ptr<T>(s.lo), ptr<T>(s.u),
                    ptr<T>(t.hi), ptr<T>(t.lo), ptr<T>(t.u),
                    precise.data(),
                    student_grad,
                    student_grad ? ptr<T>(d_gram) : nullptr,
                    student_grad ? ptr<T>(row_sums) : nullptr,
                    student_grad ? ptr<T>(ang_sums) : nullptr};
  const double total = run_angle_kernel(args);
  const double scale = 1.0 / (double(n) * double(n) * double(n));
  const at::Tensor loss = at::scalar_tensor(total * scale, at::TensorOptions().dtype(acc));
  if (!student_grad) return {loss, at::zeros({0, 0}, student.options())};
  t = AngleSide<T>{};
  s.hi.reset();
  s.lo.reset();

  at::Tensor d_g = d_gram.to(at::kDouble);
  d_gram.reset();
  const at::Tensor grad = rkd::angle_student_grad(std::move(d_g), row_sums, ang_sums, s.u, s.centred, scale);
  return {loss, grad.to(student.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_forward_cpu(const at::Tensor& student,
                                                         const at::Tensor& teacher, bool student_grad) {
  check_feature_pair_args(student, teacher, at::kCPU);
  if (student.scalar_type() == at::kDouble) return rkd_angle_impl<double>(student, teacher, student_grad);
  return rkd_angle_impl<float>(student, teacher, student_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("rkd_distance_forward", &fastkd::cpu::rkd_distance_forward_cpu);
  m.impl("rkd_angle_forward", &fastkd::cpu::rkd_angle_forward_cpu);
}
