// CPU implementation of fastkd::attention_relation_forward / _backward
// (docs/spec.md §5.3, MiniLM self-attention relations), flash-style: the
// (T, T) relations are never stored.
//
// For batch element b and relation head a, X = states[b, :, a·d:(a+1)·d]
// (T × d, d = D / A) and z_ij = c · x_i · x_j with c = 1 / (√d · τ); over the
// kept keys j of row i, R_i = softmax(z_i). Per kept row the forward keeps, for
// student (s) and teacher (t), the online statistics of RelationRow
// (csrc/common/attention_relation_op.h) over key tiles: running maxima, sums
// of exp(z − shift) and the KL's cross term relative to the maxima, so that
//   lse = shift + log l,   KL_i = KL(R^t_i ‖ R^s_i) = w / l_t − (log l_t − log l_s)
// with no term of the scores' size cancelling. It returns the head-mean KL of
// every row and saves lse_s, lse_t as (shift, log l) pairs ((B, A, T, 2)) and
// KL ((B, A, T)) for the backward, which recomputes the score tiles and
// writes, with g_i the upstream gradient of row i divided by A and
// log p_ij = (zt_ij − shift_t) − log l_t (likewise log q_ij),
//   dzs_ij = g_i (q_ij − p_ij),   dzt_ij = g_i p_ij (log p_ij − log q_ij − KL_i),
//   dX = c (dZ + dZᵀ) X            (z depends on x_i and on x_j).
// Score tiles are GEMMs (ATen, single-threaded inside a task), their
// exponentials the tile kernels of attention_relation_kernel.cpp; each task is
// one (b, a) pair and owns the d columns of X's gradient it writes, so tasks
// never share output and the result does not depend on the thread count.
//
// Inputs: student [B, T, D_s], teacher [B, T, D_t] (float32 / float64 /
// bfloat16 / float16, one dtype), mask [B, T] bool or None (false: excluded as
// row and as key), causal (keys j ≤ i only). Accumulation in float32 (float64
// for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/attention_relation_op.h"
#include "../common/checks.h"
#include "attention_relation_kernel.h"
#include "capability.h"
#include "single_threaded_tasks.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kKeyTile = 256;

struct RelationShape {
  int64_t batch, length, heads, width_s, width_t;
  bool causal;
  double scale_s, scale_t;  // 1 / (√d · τ) of each model
};

RelationShape shape_of(const at::Tensor& student, const at::Tensor& teacher, int64_t heads, bool causal,
                       double temperature) {
  RelationShape r{student.size(0), student.size(1), heads, student.size(2) / heads, teacher.size(2) / heads,
                  causal, 0.0, 0.0};
  r.scale_s = 1.0 / (std::sqrt(static_cast<double>(r.width_s)) * temperature);
  r.scale_t = 1.0 / (std::sqrt(static_cast<double>(r.width_t)) * temperature);
  return r;
}

// One head's vectors of one batch element, [T, d], contiguous, in acc_t.
at::Tensor head_vectors(const at::Tensor& states, int64_t b, int64_t a, int64_t width, at::ScalarType acc) {
  return states.select(0, b).narrow(1, a * width, width).to(acc).contiguous();
}

// keys[j]: may key j be attended to at all (the mask); rows additionally need j ≤ i when causal.
std::vector<uint8_t> kept_keys(const std::optional<at::Tensor>& mask, int64_t b, int64_t length) {
  std::vector<uint8_t> kept(length, 1);
  if (mask.has_value()) {
    const at::Tensor row = mask->select(0, b).contiguous();
    const bool* m = row.data_ptr<bool>();
    for (int64_t j = 0; j < length; ++j) kept[j] = m[j] ? 1 : 0;
  }
  return kept;
}

// The tile kernels of the CPU capability in use.
template <typename acc_t>
struct TileKernels {
  void (*statistics)(const RelationTile<acc_t>&, attention_relation::RelationRow<acc_t>*);
  void (*gradients)(const RelationTile<acc_t>&, const RelationRowsBackward<acc_t>&);
};

template <typename acc_t>
TileKernels<acc_t> tile_kernels() {
  const TileKernels<acc_t> avx512{&AVX512::relation_tile_statistics, &AVX512::relation_tile_gradients};
  const TileKernels<acc_t> avx2{&AVX2::relation_tile_statistics, &AVX2::relation_tile_gradients};
  const TileKernels<acc_t> fallback{&DEFAULT::relation_tile_statistics, &DEFAULT::relation_tile_gradients};
  return pick_variant(avx512, avx2, fallback);
}

// Rows [i0, i0 + rows) against keys [j0, j0 + cols): zs, zt are their scores (c x_i) · x_j.
template <typename acc_t>
RelationTile<acc_t> tile(const RelationShape& r, const at::Tensor& zs, const at::Tensor& zt, int64_t rows,
                         int64_t cols, int64_t i0, int64_t j0, const std::vector<uint8_t>& kept) {
  return {zs.data_ptr<acc_t>(), zt.data_ptr<acc_t>(), rows, cols, i0, j0, kept.data(), r.causal,
          static_cast<acc_t>(r.scale_s), static_cast<acc_t>(r.scale_t)};
}

template <typename acc_t>
void forward_head(const RelationShape& r, const at::Tensor& xs, const at::Tensor& xt,
                  const std::vector<uint8_t>& kept, acc_t* lse_s, acc_t* lse_t, acc_t* kl) {
  using Row = attention_relation::RelationRow<acc_t>;
  const TileKernels<acc_t> kernels = tile_kernels<acc_t>();
  const at::Tensor qs = xs * r.scale_s, qt = xt * r.scale_t;  // the rows' side of the scores, scaled
  for (int64_t i0 = 0; i0 < r.length; i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, r.length - i0);
    Row stats[kRowBlock];
    for (int64_t k = 0; k < rows; ++k) stats[k] = Row::empty();
    const int64_t key_end = r.causal ? i0 + rows : r.length;
    for (int64_t j0 = 0; j0 < key_end; j0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, key_end - j0);
      const at::Tensor zs = at::mm(qs.narrow(0, i0, rows), xs.narrow(0, j0, cols).t()).contiguous();
      const at::Tensor zt = at::mm(qt.narrow(0, i0, rows), xt.narrow(0, j0, cols).t()).contiguous();
      kernels.statistics(tile<acc_t>(r, zs, zt, rows, cols, i0, j0, kept), stats);
    }
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t i = i0 + k;
      if (kept[i]) {
        stats[k].finish(lse_s + 2 * i, lse_t + 2 * i, kl + i);
      } else {
        lse_s[2 * i] = lse_s[2 * i + 1] = lse_t[2 * i] = lse_t[2 * i + 1] = kl[i] = 0;
      }
    }
  }
}

template <typename acc_t>
void backward_head(const RelationShape& r, const at::Tensor& xs, const at::Tensor& xt,
                   const std::vector<uint8_t>& kept, const acc_t* lse_s, const acc_t* lse_t, const acc_t* kl,
                   const acc_t* row_grad, at::Tensor* dxs, at::Tensor* dxt) {
  const TileKernels<acc_t> kernels = tile_kernels<acc_t>();
  const at::Tensor qs = xs * r.scale_s, qt = xt * r.scale_t;  // the rows' side of the scores, scaled
  for (int64_t i0 = 0; i0 < r.length; i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, r.length - i0);
    const int64_t key_end = r.causal ? i0 + rows : r.length;
    for (int64_t j0 = 0; j0 < key_end; j0 += kKeyTile) {
      const int64_t cols = std::min(kKeyTile, key_end - j0);
      const at::Tensor zs = at::mm(qs.narrow(0, i0, rows), xs.narrow(0, j0, cols).t()).contiguous();
      const at::Tensor zt = at::mm(qt.narrow(0, i0, rows), xt.narrow(0, j0, cols).t()).contiguous();
      at::Tensor dzs = at::empty_like(zs), dzt = at::empty_like(zt);
      const RelationRowsBackward<acc_t> rows_in{lse_s, lse_t, kl, row_grad, dzs.data_ptr<acc_t>(),
                                                dzt.data_ptr<acc_t>()};
      kernels.gradients(tile<acc_t>(r, zs, zt, rows, cols, i0, j0, kept), rows_in);
      if (dxs != nullptr) {
        dxs->narrow(0, i0, rows).addmm_(dzs, xs.narrow(0, j0, cols));
        dxs->narrow(0, j0, cols).addmm_(dzs.t(), xs.narrow(0, i0, rows));
      }
      if (dxt != nullptr) {
        dxt->narrow(0, i0, rows).addmm_(dzt, xt.narrow(0, j0, cols));
        dxt->narrow(0, j0, cols).addmm_(dzt.t(), xt.narrow(0, i0, rows));
      }
    }
  }
}

// Returns (rows [B, T]: head-mean KL, 0 for excluded rows; lse_student, lse_teacher [B, A, T, 2]: split
// log-sum-exps (shift, log l); head_kl [B, A, T]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_relation_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, int64_t heads, const std::optional<at::Tensor>& mask,
    bool causal, double temperature) {
  attention_relation::check_args(student, teacher, heads, mask, temperature, at::kCPU);
  const RelationShape r = shape_of(student, teacher, heads, causal, temperature);
  const auto acc = accumulation_type(student);
  const attention_relation::RelationStats stats(student, heads, acc);
  if (r.batch * r.length > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "attention_relation_forward", [&] {
      run_single_threaded_tasks(r.batch * heads, [&](int64_t task) {
        const int64_t b = task / heads, a = task % heads;
        const at::Tensor xs = head_vectors(student, b, a, r.width_s, acc);
        const at::Tensor xt = head_vectors(teacher, b, a, r.width_t, acc);
        const int64_t at_row = (b * heads + a) * r.length;
        forward_head<scalar_t>(r, xs, xt, kept_keys(mask, b, r.length),
                               stats.lse_s.data_ptr<scalar_t>() + 2 * at_row,
                               stats.lse_t.data_ptr<scalar_t>() + 2 * at_row,
                               stats.head_kl.data_ptr<scalar_t>() + at_row);
      });
    });
  }
  return stats.outputs();
}

// Returns (grad_student [B, T, D_s] or [0], grad_teacher [B, T, D_t] or [0]) in the input dtype.
std::tuple<at::Tensor, at::Tensor> attention_relation_backward_cpu(
    const at::Tensor& row_grad, const at::Tensor& student, const at::Tensor& teacher, int64_t heads,
    const std::optional<at::Tensor>& mask, bool causal, double temperature, const at::Tensor& lse_s,
    const at::Tensor& lse_t, const at::Tensor& head_kl, bool student_grad, bool teacher_grad) {
  attention_relation::check_args(student, teacher, heads, mask, temperature, at::kCPU);
  const RelationShape r = shape_of(student, teacher, heads, causal, temperature);
  const auto acc = accumulation_type(student);
  attention_relation::check_backward_args(row_grad, student, heads, lse_s, lse_t, head_kl, acc);
  // each head's share of a row's upstream gradient (the rows are head means)
  const at::Tensor g = (row_grad.to(acc) * (1.0 / static_cast<double>(heads))).contiguous();
  const at::Tensor ls = lse_s.contiguous(), lt = lse_t.contiguous(), kl = head_kl.contiguous();
  at::Tensor grad_s = attention_relation::zero_gradient(student, acc, student_grad);
  at::Tensor grad_t = attention_relation::zero_gradient(teacher, acc, teacher_grad);
  if ((student_grad || teacher_grad) && r.batch * r.length > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "attention_relation_backward", [&] {
      run_single_threaded_tasks(r.batch * heads, [&](int64_t task) {
        const int64_t b = task / heads, a = task % heads;
        const at::Tensor xs = head_vectors(student, b, a, r.width_s, acc);
        const at::Tensor xt = head_vectors(teacher, b, a, r.width_t, acc);
        at::Tensor dxs = student_grad ? at::zeros_like(xs) : at::Tensor();
        at::Tensor dxt = teacher_grad ? at::zeros_like(xt) : at::Tensor();
        const int64_t at_row = (b * heads + a) * r.length;
        backward_head<scalar_t>(r, xs, xt, kept_keys(mask, b, r.length), ls.data_ptr<scalar_t>() + 2 * at_row,
                                lt.data_ptr<scalar_t>() + 2 * at_row, kl.data_ptr<scalar_t>() + at_row,
                                g.data_ptr<scalar_t>() + b * r.length, student_grad ? &dxs : nullptr,
                                teacher_grad ? &dxt : nullptr);
        if (student_grad) grad_s.select(0, b).narrow(1, a * r.width_s, r.width_s).copy_(dxs);
        if (teacher_grad) grad_t.select(0, b).narrow(1, a * r.width_t, r.width_t).copy_(dxt);
      });
    });
  }
  return attention_relation::backward_outputs(student, teacher, grad_s, grad_t, student_grad, teacher_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("attention_relation_forward", &fastkd::cpu::attention_relation_forward_cpu);
  m.impl("attention_relation_backward", &fastkd::cpu::attention_relation_backward_cpu);
}
