// Shared by the CPU and CUDA implementations of
// fastkd::attention_relation_forward / attention_relation_backward
// (csrc/cpu/attention_relation.cpp, csrc/cuda/attention_relation.cu): the
// argument checks, the forward's online row statistics (RelationRow), the
// saved statistics and the backward's outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "checks.h"

#if defined(__CUDACC__)
#define FASTKD_AR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTKD_AR_HOST_DEVICE inline
#endif

namespace fastkd {
namespace attention_relation {

// student [B, T, D_s] and teacher [B, T, D_t] of one floating dtype on
// `device`, each width a positive multiple of `heads`; temperature finite and
// > 0; mask [B, T] bool on the student's device, or none. The device-specific
// limits (dtypes, grid sizes) are the caller's.
inline void check_args(const at::Tensor& student, const at::Tensor& teacher, int64_t heads,
                       const std::optional<at::Tensor>& mask, double temperature, c10::DeviceType device) {
  CHECK_DIM(student, 3);
  CHECK_DIM(teacher, 3);
  CHECK_DEVICE_TYPE(student, device);
  CHECK_SAME_DEVICE(student, teacher);
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
              "teacher_states (B, T) must match student_states'");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "teacher_states dtype must match student_states'");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "student_states must be floating point");
  TORCH_CHECK(heads >= 1, "num_relation_heads must be >= 1, got ", heads);
  TORCH_CHECK(student.size(2) > 0 && student.size(2) % heads == 0,
              "student_states width must be a positive multiple of num_relation_heads");
  TORCH_CHECK(teacher.size(2) > 0 && teacher.size(2) % heads == 0,
              "teacher_states width must be a positive multiple of num_relation_heads");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be > 0 and finite, got ",
              temperature);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == student.size(0) && mask->size(1) == student.size(1),
                "mask must be [B, T]");
    CHECK_SAME_DEVICE(student, (*mask));
  }
}

// One kept row's online statistics for both models, student (s) and teacher
// (t), over the key tiles seen so far (docs/spec.md §5.3; float or double):
//
//   max       the running maximum of the scores z, −inf before a finite one;
//   shift     max, or 0 while max is −inf (a finite reference point);
//   sum       l = Σ_j exp(z_j − shift);
//   cross     w = Σ_j e_j · ((zt_j − shift_t) − (zs_j − shift_s)),
//             e_j = exp(zt_j − shift_t), the terms with e_j = 0 left out
//             (0 · log 0 = 0: a key without teacher mass adds nothing).
//
// Then, with lse = shift + log l,
//   KL(R^t ‖ R^s) = Σ_j p_j (log p_j − log q_j) = w / l_t − (log l_t − log l_s).
// Every quantity here is relative to the maxima: zt_j − shift_t and
// zs_j − shift_s are single roundings of the small distances that decide the
// relations, and w / l_t is of the size of the KL and the entropies (≲ KL +
// log T), never of the scores'. The one-pass alternative,
// Σ e_j (zt_j − zs_j) / l_t − (lse_t − lse_s), subtracts terms of the scores'
// size (~1e3 for large states) and loses ~eps · |z| absolutely.
//
// When a tile raises the maxima, each accumulated term of w moves by the
// known amount (Δshift_s − Δshift_t) and is rescaled with l_t, so w gets
// (Δshift_s − Δshift_t) · l_t before the rescale: algebraically exact, and
// its rounding is relative to the shifts' moves, which telescope to the
// maxima's total rise. A tile that raises neither maximum leaves w and l
// exactly as they are (a move of 0, a rescale of exp(0) = 1).
//
// Use per tile: rebase(tile maxima) once, then add(exp terms) for its keys
// with the shifts of shift_s() / shift_t(). NaN scores are skipped by the
// maxima and reach l through exp(NaN − shift); +inf scores make l NaN.
template <class acc_t>
struct RelationRow {
  acc_t max_s, max_t, sum_s, sum_t, cross;

  FASTKD_AR_HOST_DEVICE static acc_t shift_of(acc_t max) { return max == -INFINITY ? acc_t(0) : max; }
  FASTKD_AR_HOST_DEVICE static RelationRow empty() { return {-INFINITY, -INFINITY, 0, 0, 0}; }
  FASTKD_AR_HOST_DEVICE acc_t shift_s() const { return shift_of(max_s); }
  FASTKD_AR_HOST_DEVICE acc_t shift_t() const { return shift_of(max_t); }

  // Moves the shifts to cover a tile whose kept scores have the maxima
  // tile_max_s and tile_max_t (−inf for none, NaNs skipped).
  FASTKD_AR_HOST_DEVICE void rebase(acc_t tile_max_s, acc_t tile_max_t) {
    const acc_t new_max_s = tile_max_s > max_s ? tile_max_s : max_s;
    const acc_t new_max_t = tile_max_t > max_t ? tile_max_t : max_t;
    const acc_t old_shift_s = shift_s(), old_shift_t = shift_t();
    const acc_t new_shift_s = shift_of(new_max_s), new_shift_t = shift_of(new_max_t);
    // exp(max − new shift): 0 while max is −inf (l = 0 then), 1 when it stays
    const acc_t rescale_s = std::exp(max_s - new_shift_s);
    const acc_t rescale_t = std::exp(max_t - new_shift_t);
    // each accumulated term of w moves by this much; l_t = 0 means w = 0 (no
    // term yet), and the moves may then be infinite
    const acc_t move = (new_shift_s - old_shift_s) - (new_shift_t - old_shift_t);
    if (sum_t != 0) cross = (cross + move * sum_t) * rescale_t;
    sum_s *= rescale_s;
    sum_t *= rescale_t;
    max_s = new_max_s;
    max_t = new_max_t;
  }

  // The sums' terms of a kept key with scores zs, zt (after rebase; shift_s,
  // shift_t the current shifts): its exp(zs − shift_s), e = exp(zt − shift_t)
  // and e · ((zt − shift_t) − (zs − shift_s)), 0 where e = 0.
  FASTKD_AR_HOST_DEVICE static acc_t student_weight(acc_t zs, acc_t shift_s) { return std::exp(zs - shift_s); }
  FASTKD_AR_HOST_DEVICE static acc_t teacher_weight(acc_t zt, acc_t shift_t) { return std::exp(zt - shift_t); }
  FASTKD_AR_HOST_DEVICE static acc_t cross_term(acc_t zs, acc_t zt, acc_t e, acc_t shift_s, acc_t shift_t) {
    return e == 0 ? acc_t(0) : e * ((zt - shift_t) - (zs - shift_s));
  }

  FASTKD_AR_HOST_DEVICE void add(acc_t weight_s, acc_t weight_t, acc_t term) {
    sum_s += weight_s;
    sum_t += weight_t;
    cross += term;
  }

  // The saved split log-sum-exps (shift, log l) and the row's KL.
  FASTKD_AR_HOST_DEVICE void finish(acc_t* lse_s, acc_t* lse_t, acc_t* kl) const {
    const acc_t log_sum_s = std::log(sum_s), log_sum_t = std::log(sum_t);
    lse_s[0] = shift_s();
    lse_s[1] = log_sum_s;
    lse_t[0] = shift_t();
    lse_t[1] = log_sum_t;
    *kl = cross / sum_t - (log_sum_t - log_sum_s);
  }
};

// log p_ij of a score z_ij from its row's split log-sum-exp (shift, log l):
// (z − shift) − log l, never z − (shift + log l), whose rounding of the sum is
// of the scores' size.
template <class acc_t>
FASTKD_AR_HOST_DEVICE acc_t log_relation(acc_t z, acc_t shift, acc_t log_sum) {
  return (z - shift) - log_sum;
}

// The backward's extra inputs for a checked `student` [B, T, D_s]: row_grad
// [B, T] and the forward's lse_s, lse_t [B, A, T, 2] and head_kl [B, A, T]
// in `stats_dtype` (the accumulation dtype), all on the student's device.
inline void check_backward_args(const at::Tensor& row_grad, const at::Tensor& student, int64_t heads,
                                const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& head_kl,
                                at::ScalarType stats_dtype) {
  const int64_t batch = student.size(0), length = student.size(1);
  TORCH_CHECK(row_grad.dim() == 2 && row_grad.size(0) == batch && row_grad.size(1) == length,
              "row_grad must be [B, T]");
  CHECK_SAME_DEVICE(student, row_grad);
  for (const at::Tensor* saved : {&lse_s, &lse_t, &head_kl}) {
    const bool split = saved != &head_kl;
    TORCH_CHECK(saved->dim() == (split ? 4 : 3) && saved->size(0) == batch && saved->size(1) == heads &&
                    saved->size(2) == length && (!split || saved->size(3) == 2) &&
                    saved->scalar_type() == stats_dtype,
                "the saved statistics must be lse_student, lse_teacher [B, A, T, 2] and head_kl [B, A, T] in the "
                "accumulation dtype (", stats_dtype, ")");
    CHECK_SAME_DEVICE(student, (*saved));
  }
}

// The forward's per-(b, a, row) statistics in `stats_dtype`, zero for the
// rows the kernels skip (excluded rows, empty batches): lse_s, lse_t
// [B, A, T, 2], each row's log-sum-exp split as (shift, log l) (see
// RelationRow: lse = shift + log l, kept apart for the backward's log p), and
// head_kl [B, A, T].
struct RelationStats {
  at::Tensor lse_s, lse_t, head_kl;

  RelationStats(const at::Tensor& student, int64_t heads, at::ScalarType stats_dtype)
      : lse_s(at::zeros({student.size(0), heads, student.size(1), 2}, student.options().dtype(stats_dtype))),
        lse_t(at::zeros_like(lse_s)),
        head_kl(at::zeros({student.size(0), heads, student.size(1)}, student.options().dtype(stats_dtype))) {}

  // (rows [B, T]: head-mean KL, 0 for excluded rows; lse_student, lse_teacher [B, A, T, 2]; head_kl [B, A, T]).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {head_kl.mean(1), lse_s, lse_t, head_kl};
  }
};

// A gradient buffer of `like`'s shape in the accumulation dtype, zeros, or
// undefined when not wanted.
inline at::Tensor zero_gradient(const at::Tensor& like, at::ScalarType acc, bool wanted) {
  return wanted ? at::zeros(like.sizes(), like.options().dtype(acc)) : at::Tensor();
}

// The backward's outputs (grad_student [B, T, D_s] or [0], grad_teacher
// [B, T, D_t] or [0]): each wanted gradient buffer in its input's dtype, an
// empty [0] tensor for the others.
inline std::tuple<at::Tensor, at::Tensor> backward_outputs(const at::Tensor& student, const at::Tensor& teacher,
                                                           const at::Tensor& grad_s, const at::Tensor& grad_t,
                                                           bool student_grad, bool teacher_grad) {
  auto finish = [](const at::Tensor& grad, const at::Tensor& like, bool wanted) {
    return wanted ? grad.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(grad_s, student, student_grad), finish(grad_t, teacher, teacher_grad)};
}

}  // namespace attention_relation
}  // namespace fastkd
