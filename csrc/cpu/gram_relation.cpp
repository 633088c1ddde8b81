// CPU implementation of fastkd::pkt_forward, fastkd::sp_forward and
// fastkd::cc_forward (docs/spec.md §2): the loss and the student's gradient from the
// Gram matrices, O(N²) memory, no autograd graph. Same maths and contract as
// the Triton launchers (kernels/gram_relation.py, read their comments) and the
// CUDA ops (csrc/cuda/gram_relation.cu).
//
// Each op: the two Gram matrices with at::mm (PKT: of the normalised rows
// x̂), in float32 for float32 / bfloat16 / float16 inputs and float64 for
// float64; one at::parallel_for over the rows that computes the row's loss
// terms and writes ∂loss/∂G of the student's row in place of its Gram row
// (each row reads only its own row, so the overwrite is safe; the row passes
// are lane-parallel, in gram_relation_kernel.cpp); then dX = (dG + dGᵀ) X
// with thread_invariant_mm, dG + dGᵀ formed in place (PKT: dx̂, then the normalisation's
// O(N·D) gradient by hand, csrc/common/gram_relation.h).
//
// Per row the sums (norms, row sums, loss terms, the projections of the
// normalisations' gradients) are taken in lanes per block and in float64
// across blocks, and the rows' losses are added in row order: the result
// does not depend on the thread count.
// Cost: the Gram matmuls O(N² (D_s + D_t)), then O(N²) per pass (SP, PKT: a
// row is read three times from cache, CC: once), and the dX matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/gram_relation.h"
#include "allocation.h"
#include "capability.h"
#include "gram_relation_kernel.h"
#include "thread_invariant_mm.h"

namespace fastkd {
namespace cpu {
namespace {

// Rows per parallel_for task: about GRAIN_SIZE elements of an [N, N] matrix.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(n, 1)); }

// Σ of per-row values in row order (deterministic), as float64.
double ordered_sum(const std::vector<double>& rows) {
  double total = 0;
  for (const double v : rows) total += v;
  return total;
}

// m ← m + mᵀ for a square [n, n] matrix, in place, by pairs of 64 × 64 tiles:
// the same sums as m + m.t(), without a second n × n buffer. The tile across
// the diagonal is copied into a local buffer by its rows, transposed there,
// summed with its partner and written back by rows: reading it down its
// columns in place would touch 64 lines n · sizeof(T) bytes apart, which for
// n a multiple of 1024 all fall in one cache set (at N = 8192 that walk took
// a third of SP's whole forward + backward). A task owns row-block b's tiles
// right of the diagonal and their mirror images below it, so tasks write
// disjoint entries; tasks go in the order 0, last, 1, last − 1, ... so that
// parallel_for's equal ranges get equal work (block b has tiles − b tiles).
template <class T>
const at::Tensor& symmetrised_in_place(const at::Tensor& m) {
  constexpr int64_t kTile = 64;
  const int64_t n = m.size(0);
  T* p = m.data_ptr<T>();
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> mirror(kTile * kTile);  // mirror[r · kTile + c] = the partner tile's (c, r)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task % 2 == 0 ? task / 2 : tiles - 1 - task / 2;
      const int64_t i0 = bi * kTile, rows = std::min(kTile, n - i0);
      for (int64_t j0 = i0; j0 < n; j0 += kTile) {
        const int64_t cols = std::min(kTile, n - j0);
        for (int64_t c = 0; c < cols; ++c) {
          const T* partner_row = p + (j0 + c) * n + i0;
          for (int64_t r = 0; r < rows; ++r) mirror[r * kTile + c] = partner_row[r];
        }
        for (int64_t r = 0; r < rows; ++r) {
          T* row = p + (i0 + r) * n + j0;
          T* sums = mirror.data() + r * kTile;
          for (int64_t c = 0; c < cols; ++c) {
            row[c] += sums[c];
            sums[c] = row[c];
          }
        }
        // on the diagonal tile this rewrites each sum with its mirror image's,
        // the same two terms added the other way round: the same bits
        for (int64_t c = 0; c < cols; ++c) {
          T* partner_row = p + (j0 + c) * n + i0;
          for (int64_t r = 0; r < rows; ++r) partner_row[r] = mirror[r * kTile + c];
        }
      }
    }
  });
  return m;
}

// The row passes of gram_relation_kernel.cpp for this CPU.
template <class T>
auto sp_row_kernel() {
  using Row = double (*)(T*, const T*, int64_t, double, bool);
  return pick_variant<Row>(&AVX512::sp_row, &AVX2::sp_row, &DEFAULT::sp_row);
}

template <class T>
auto pkt_row_kernel() {
  using Row = double (*)(T*, const T*, int64_t, double, double, bool);
  return pick_variant<Row>(&AVX512::pkt_row, &AVX2::pkt_row, &DEFAULT::pkt_row);
}

template <class T>
auto cc_row_kernel() {
  using Row = double (*)(T*, const T*, int64_t, double, int64_t, bool);
  return pick_variant<Row>(&AVX512::cc_row, &AVX2::cc_row, &DEFAULT::cc_row);
}

std::tuple<at::Tensor, at::Tensor> no_grad_result(const at::Tensor& loss, const at::Tensor& student) {
  return {loss, at::zeros({0, 0}, student.options())};
}

// ---- SP ----------------------------------------------------------------------
// Ĝ = G / max(‖G_i‖, 1e-12) per row (F.normalize), L = ‖Ĝ_t − Ĝ_s‖²_F / N².
// dĜ_s = −2 (Ĝ_t − Ĝ_s) / N², dG = (dĜ − Ĝ (Ĝ·dĜ)) / ‖G_i‖ (the projection
// only where ‖G_i‖ > eps: below it the divisor is the constant eps).
template <class T>
std::tuple<at::Tensor, at::Tensor> sp_impl(const at::Tensor& student, const at::Tensor& teacher,
                                           bool student_grad) {
  const auto acc = accumulation_type(student);
  const gram::GramPair g = gram::gram_pair(student, teacher, acc, &empty_for_output);
  const at::Tensor &gs = g.gs, &gt = g.gt;
  const int64_t n = g.xs.size(0);
  const double inv_n2 = 1.0 / (double(n) * double(n));
  T* gs_p = gs.data_ptr<T>();
  const T* gt_p = gt.data_ptr<T>();
  std::vector<double> loss_rows(n, 0.0);
  const auto row = sp_row_kernel<T>();
  at::parallel_for(0, n, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      loss_rows[i] = row(gs_p + i * n, gt_p + i * n, n, inv_n2, student_grad);
    }
  });
  const at::Tensor loss = at::scalar_tensor(ordered_sum(loss_rows) * inv_n2, at::TensorOptions().dtype(acc));
  if (!student_grad) return no_grad_result(loss, student);
  return {loss, thread_invariant_mm(symmetrised_in_place<T>(gs), g.xs).to(student.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> sp_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  bool student_grad) {
  check_feature_pair_args(student, teacher, at::kCPU);
  if (student.scalar_type() == at::kDouble) return sp_impl<double>(student, teacher, student_grad);
  return sp_impl<float>(student, teacher, student_grad);
}

// ---- CC ----------------------------------------------------------------------
// K = exp(−2γ) Σ_p (2γ)^p / p! G^p per side, L = ‖K_s − K_t‖_F / N².
// The row pass writes (K_s − K_t) dK_s/dG into the student's Gram row; the
// norm's factor 1 / (‖K_s − K_t‖_F N²) (0 where the norm is 0, as autograd's
// gradient of the norm there) is applied once the norm is known.
template <class T>
std::tuple<at::Tensor, at::Tensor> cc_impl(const at::Tensor& student, const at::Tensor& teacher,
                                           bool student_grad, double gamma, int64_t order) {
  const auto acc = accumulation_type(student);
  const gram::GramPair g = gram::gram_pair(student, teacher, acc, &empty_for_output);
  const at::Tensor &gs = g.gs, &gt = g.gt;
  const int64_t n = g.xs.size(0);
  T* gs_p = gs.data_ptr<T>();
  const T* gt_p = gt.data_ptr<T>();
  const auto cc_row = cc_row_kernel<T>();
  std::vector<double> sq_rows(n, 0.0);
  at::parallel_for(0, n, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      sq_rows[i] = cc_row(gs_p + i * n, gt_p + i * n, n, gamma, order, student_grad);
    }
  });
  const double norm = std::sqrt(ordered_sum(sq_rows));
  const double n2 = double(n) * double(n);
  const at::Tensor loss = at::scalar_tensor(norm / n2, at::TensorOptions().dtype(acc));
  if (!student_grad) return no_grad_result(loss, student);
  const double coef = norm == 0.0 ? 0.0 : 1.0 / (norm * n2);  // NaN stays NaN
  gs.mul_(coef);
  return {loss, thread_invariant_mm(symmetrised_in_place<T>(gs), g.xs).to(student.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> cc_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  bool student_grad, double gamma, int64_t order) {
  check_feature_pair_args(student, teacher, at::kCPU);
  gram::check_cc_params(gamma, order);
  if (student.scalar_type() == at::kDouble) return cc_impl<double>(student, teacher, student_grad, gamma, order);
  return cc_impl<float>(student, teacher, student_grad, gamma, order);
}

// ---- PKT ---------------------------------------------------------------------
// H = x̂ x̂ᵀ, S = max((H + 1) / 2, 0), P = S / rowsum(S) per side,
// L = mean_ij P_t log((P_t + eps) / (P_s + eps)).
// dP = −P_t / (P_s + eps) / N², dS = (dP − Σ_j dP P_s) / rowsum(S_s), dH = dS / 2
// (0 where the clamp acted: an antipodal pair whose cosine rounded below −1).
template <class T>
std::tuple<at::Tensor, at::Tensor> pkt_impl(const at::Tensor& student, const at::Tensor& teacher,
                                            bool student_grad, double eps) {
  const auto acc = accumulation_type(student);
  const gram::PktPair pair = gram::pkt_pair(student, teacher, acc, eps, &empty_for_output);
  const at::Tensor &hs = pair.hs, &ht = pair.ht;
  const int64_t n = pair.xs.size(0);
  const double inv_n2 = 1.0 / (double(n) * double(n));
  T* hs_p = hs.data_ptr<T>();
  const T* ht_p = ht.data_ptr<T>();
  std::vector<double> loss_rows(n, 0.0);
  const auto row = pkt_row_kernel<T>();
  at::parallel_for(0, n, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      loss_rows[i] = row(hs_p + i * n, ht_p + i * n, n, inv_n2, eps, student_grad);
    }
  });
  const at::Tensor loss = at::scalar_tensor(ordered_sum(loss_rows) * inv_n2, at::TensorOptions().dtype(acc));
  if (!student_grad) return no_grad_result(loss, student);
  const at::Tensor d_xh = thread_invariant_mm(symmetrised_in_place<T>(hs), pair.rows_s.xh);
  return {loss, gram::pkt_student_grad_from(pair, d_xh, eps, student.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> pkt_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   bool student_grad, double eps) {
  check_feature_pair_args(student, teacher, at::kCPU);
  gram::check_pkt_eps(eps);
  if (student.scalar_type() == at::kDouble) return pkt_impl<double>(student, teacher, student_grad, eps);
  return pkt_impl<float>(student, teacher, student_grad, eps);
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("pkt_forward", &fastkd::cpu::pkt_forward_cpu);
  m.impl("sp_forward", &fastkd::cpu::sp_forward_cpu);
  m.impl("cc_forward", &fastkd::cpu::cc_forward_cpu);
}
