// Decoupled knowledge distillation on CUDA: fastkd::dkd_forward for CUDA
// tensors (docs/spec.md §1, mdistiller dkd_loss). Same contract as the CPU op
// (csrc/cpu/dkd.cpp): row losses α·TCKD + β·NCKD and, if asked for, the
// student gradient times grad_scale, in one call. The formulas are those of
// kernels/dkd.py, evaluated in float32 for float32, bfloat16 and float16
// inputs (float64 is refused: nothing here accumulates in double).
//
// Per row, with a = s/T, b = t/T and target y, everything follows from
// r = a_y − log Σ_{j≠y} e^{a_j} and the non-target log-softmax
// log q̂_j = a_j − log Σ_{j≠y} e^{a_j} (teacher: r_t, log p̂_j):
//   log q_y = −softplus(−r), log(1 − q_y) = −softplus(r)   (log space: exact
//                                                          when q_y ≈ 1 or ≈ 0)
//   TCKD = KL([p_y, 1 − p_y] ‖ [q_y, 1 − q_y])
//   NCKD = KL(p' ‖ q'), p', q' the softmaxes of z/T − 1000·onehot(y)
//          (mdistiller's offset): log q'_j = log q̂_j − δ (j ≠ y),
//          log q'_y = (r − 1000) − δ, δ = softplus(r − 1000)
//   dTCKD/da_y = q_y − p_y,  dTCKD/da_j = q̂_j ((1 − q_y) − (1 − p_y))  (j ≠ y)
//   dNCKD/da_j = q'_j − p'_j
//
// One thread block per row (blocks grid-stride over rows when N exceeds the
// grid), threads stride over C so that a warp's loads are coalesced:
//   pass 1  online max and Σ exp((x − max)/T) of the non-target logits of s
//           and t, merged across the block by one cub::BlockReduce    read s, t
//   pass 2  NCKD terms and the gradient (every constant is known after
//           pass 1), one cub::BlockReduce for Σ NCKD  read s, t; write gradient
// Memory traffic floor: read 2·N·C elements, write N·C for the gradient (and
// 4·N bytes of row loss); pass 2 re-reads the row, from L1 / L2 for
// classification-sized rows.
//
// Labels: their range is checked in the kernel, not on the host (that would
// be a device → host synchronisation on every call): it clamps the index it
// loads with and gives a row with an out-of-range label a NaN loss and
// gradient, so no label ever indexes outside its row (docs/spec.md §6; the
// Python layer checks on the host when FASTKD_CHECK_DEVICE_VALUES=1).
//
// Layout: the device code and a raw-pointer launcher (no at::Tensor) first,
// then the op (checks, outputs, device guard, stream) and its registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../common/dkd_op.h"
#include "block_reduce.cuh"

namespace fastkd {
namespace cuda {
namespace {

// mdistiller's offset on the target logit in the non-target softmax.
constexpr float kTargetOffset = 1000.f;

// ---- device code --------------------------------------------------------------

// max that propagates NaN from either side (fmaxf drops it).
__device__ __forceinline__ float max_nan(float a, float b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

// log(1 + e^x) = max(x, 0) + log1p(e^−|x|): no overflow; NaN stays NaN.
__device__ __forceinline__ float softplus(float x) {
  return (x > 0.f ? x : 0.f) + log1pf(expf(-fabsf(x)));
}

// p (log p − log q) with 0 · anything = 0 (a NaN p keeps the NaN).
__device__ __forceinline__ float xlogratio(float log_p, float log_q) {
  const float p = expf(log_p);
  return p == 0.f ? 0.f : p * (log_p - log_q);
}

// Running max m and d = Σ exp((x − m)/T) of one row's non-target logits, for
// the student (s) and the teacher (t).
struct MaxSum {
  float m_s, d_s, m_t, d_t;
};

// One element into a running (m, d): one exp per element. −inf adds nothing
// (and would make −inf − (−inf) while m is still −inf); NaN makes d NaN.
__device__ __forceinline__ void online_add(float& m, float& d, float x, float inv_t) {
  if (x > m) {
    d = d * expf((m - x) * inv_t) + 1.f;
    m = x;
  } else if (x != -INFINITY) {
    d += expf((x - m) * inv_t);
  }
}

// Two running (m, d) merged: both rescaled to the larger max. While both are
// empty (m = −inf) the shift is 0, so no −inf − (−inf) appears.
__device__ __forceinline__ void online_merge(float& m, float& d, float m2, float d2, float inv_t) {
  const float m_new = max_nan(m, m2);
  const float shift = m_new == -INFINITY ? 0.f : m_new;
  d = d * expf((m - shift) * inv_t) + d2 * expf((m2 - shift) * inv_t);
  m = m_new;
}

struct MaxSumOp {
  float inv_t;
  __device__ __forceinline__ MaxSum operator()(const MaxSum& a, const MaxSum& b) const {
    MaxSum r = a;
    online_merge(r.m_s, r.d_s, b.m_s, b.d_s, inv_t);
    online_merge(r.m_t, r.d_t, b.m_t, b.d_t, inv_t);
    return r;
  }
};

// Everything pass 2 needs besides the two logits (the same constants as
// kernels/dkd.py).
struct RowConstants {
  float inv_t, m_s, log_d_s, m_t, log_d_t;
  float delta_s, delta_t;  // δ = softplus(r − 1000)
  float diff_o;            // (1 − q_y) − (1 − p_y)
  float grad_y;            // α (q_y − p_y) + β (q'_y − p'_y)
  float loss_fixed;        // α·TCKD + β·(the NCKD term of the target)
};

__device__ __forceinline__ RowConstants row_constants(float s_y, float t_y, const MaxSum& ms,
                                                      float inv_t, float alpha, float beta) {
  RowConstants c;
  c.inv_t = inv_t;
  c.m_s = ms.m_s;
  c.m_t = ms.m_t;
  c.log_d_s = logf(ms.d_s);
  c.log_d_t = logf(ms.d_t);
  // r = a_y − log Σ_{j≠y} e^{a_j}; r − 1000 with the offset taken off before
  // log Σ is: exact where r ≈ 1000, the only place it matters.
  const float u_s = (s_y - c.m_s) * inv_t, u_t = (t_y - c.m_t) * inv_t;
  const float r_s = u_s - c.log_d_s, r_t = u_t - c.log_d_t;
  const float r_s_off = (u_s - kTargetOffset) - c.log_d_s;
  const float r_t_off = (u_t - kTargetOffset) - c.log_d_t;
  // TCKD on the binary split, in log space.
  const float log_qy = -softplus(-r_s), log_qo = -softplus(r_s);
  const float log_py = -softplus(-r_t), log_po = -softplus(r_t);
  const float tckd = xlogratio(log_py, log_qy) + xlogratio(log_po, log_qo);
  const float q_y = expf(log_qy), p_y = expf(log_py);
  // From whichever pair is accurate: the small complements when the target
  // dominates, else the target probabilities.
  c.diff_o = q_y + p_y > 1.f ? expf(log_qo) - expf(log_po) : p_y - q_y;
  // NCKD: the offset softmaxes differ from the non-target ones by δ.
  c.delta_s = softplus(r_s_off);
  c.delta_t = softplus(r_t_off);
  const float log_qn_y = r_s_off - c.delta_s, log_pn_y = r_t_off - c.delta_t;
  c.grad_y = alpha * -c.diff_o + beta * (expf(log_qn_y) - expf(log_pn_y));
  c.loss_fixed = alpha * tckd + beta * xlogratio(log_pn_y, log_qn_y);
  return c;
}

template <int BLOCK, class scalar_t>
__global__ void __launch_bounds__(BLOCK) _dkd_fwd_kernel(
    const scalar_t* __restrict__ student,  // [N, C] student logits, row stride student_row_stride
    const scalar_t* __restrict__ teacher,  // [N, C] teacher logits, row stride teacher_row_stride
    int64_t student_row_stride, int64_t teacher_row_stride,
    const int64_t* __restrict__ labels,    // [N] target classes
    float* __restrict__ row_loss,          // [N] α·TCKD + β·NCKD
    scalar_t* __restrict__ grad,           // [N, C] contiguous grad_scale · dℓ/ds, or nullptr
    int64_t rows, int64_t C, float alpha, float beta, float inv_temperature,
    float grad_factor) {                   // grad_scale / T
  static_assert(BLOCK % 32 == 0, "block size must be a whole number of warps");
  using ReduceMaxSum = cub::BlockReduce<MaxSum, BLOCK>;
  using ReduceSum = cub::BlockReduce<float, BLOCK>;
  __shared__ union {
    typename ReduceMaxSum::TempStorage max_sum;
    typename ReduceSum::TempStorage sum;
  } temp;
  __shared__ MaxSum max_sum_result;
  const MaxSumOp max_sum_op{inv_temperature};

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* s = student + row * student_row_stride;
    const scalar_t* t = teacher + row * teacher_row_stride;
    // Every thread reads the same label, so the branches on it are uniform.
    const int64_t y_raw = labels[row];
    const bool valid = y_raw >= 0 && y_raw < C;
    const int64_t y = valid ? y_raw : 0;

    // pass 1: max and Σ exp((x − max)/T) over the non-target classes.
    MaxSum ms{-INFINITY, 0.f, -INFINITY, 0.f};
    for (int64_t j = threadIdx.x; j < C; j += BLOCK) {
      if (j == y) continue;
      online_add(ms.m_s, ms.d_s, static_cast<float>(s[j]), inv_temperature);
      online_add(ms.m_t, ms.d_t, static_cast<float>(t[j]), inv_temperature);
    }
    ms = ReduceMaxSum(temp.max_sum).Reduce(ms, max_sum_op);
    if (threadIdx.x == 0) max_sum_result = ms;
    __syncthreads();
    ms = max_sum_result;
    const RowConstants c = row_constants(static_cast<float>(s[y]), static_cast<float>(t[y]), ms,
                                         inv_temperature, alpha, beta);

    // pass 2: NCKD over the non-target classes, and the gradient.
    float nckd = 0.f;
    scalar_t* g = grad != nullptr ? grad + row * C : nullptr;
    for (int64_t j = threadIdx.x; j < C; j += BLOCK) {
      const float sj = static_cast<float>(s[j]), tj = static_cast<float>(t[j]);
      // log q̂_j = (s_j − max)/T − log Σ: the rounding scales with the
      // distance from the max, small where the probability is large.
      const float log_qh = (sj - c.m_s) * c.inv_t - c.log_d_s;
      const float log_ph = (tj - c.m_t) * c.inv_t - c.log_d_t;
      const float log_qn = log_qh - c.delta_s, log_pn = log_ph - c.delta_t;
      if (j != y) nckd += xlogratio(log_pn, log_qn);
      if (g != nullptr) {
        float gj = j == y ? c.grad_y
                          : alpha * expf(log_qh) * c.diff_o + beta * (expf(log_qn) - expf(log_pn));
        if (!valid) gj = NAN;
        g[j] = static_cast<scalar_t>(grad_factor * gj);
      }
    }
    // (temp is free: pass 1's reduce ended before the barrier above.)
    nckd = ReduceSum(temp.sum).Reduce(nckd, SumOp{});
    if (threadIdx.x == 0) row_loss[row] = valid ? c.loss_fixed + beta * nckd : NAN;
    // temp and max_sum_result are reused by the next row.
    __syncthreads();
  }
}

// ---- launcher -----------------------------------------------------------------

// The kernel's view of one call: raw pointers and scalars, no at::Tensor.
struct DKDArgs {
  const void* student;
  const void* teacher;
  int64_t student_row_stride, teacher_row_stride;
  const int64_t* labels;
  float* row_loss;
  void* grad;  // nullptr when the gradient is not requested
  int64_t rows, classes;
  double alpha, beta, inv_temperature, grad_scale;
};

// Rows beyond this many blocks are grid-strided: far more blocks than can be
// resident on any GPU, and well inside gridDim.x's limit.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <int BLOCK, class scalar_t>
void launch(const DKDArgs& a, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(a.rows, kMaxBlocks));
  _dkd_fwd_kernel<BLOCK, scalar_t><<<grid, BLOCK, 0, stream>>>(
      static_cast<const scalar_t*>(a.student), static_cast<const scalar_t*>(a.teacher),
      a.student_row_stride, a.teacher_row_stride, a.labels, a.row_loss,
      static_cast<scalar_t*>(a.grad), a.rows, a.classes, static_cast<float>(a.alpha),
      static_cast<float>(a.beta), static_cast<float>(a.inv_temperature),
      static_cast<float>(a.grad_scale * a.inv_temperature));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Classification heads (C ≤ 2048) get 128 threads so that most threads have
// work; wider rows get 512.
template <class scalar_t>
void launch_for_classes(const DKDArgs& a, cudaStream_t stream) {
  if (a.classes <= 2048) {
    launch<128, scalar_t>(a, stream);
  } else {
    launch<512, scalar_t>(a, stream);
  }
}

void dkd_forward_launch(const DKDArgs& a, at::ScalarType dtype, cudaStream_t stream) {
  switch (dtype) {
    case at::kFloat: return launch_for_classes<float>(a, stream);
    case at::kBFloat16: return launch_for_classes<c10::BFloat16>(a, stream);
    case at::kHalf: return launch_for_classes<c10::Half>(a, stream);
    default: break;
  }
  TORCH_CHECK(false, "fastkd::dkd_forward on CUDA: unsupported dtype ", dtype);
}

// ---- the op -------------------------------------------------------------------

// The kernel takes any row stride, but unit stride along C and rows that do
// not overlap.
at::Tensor row_major(const at::Tensor& x) {
  const bool unit = x.size(1) <= 1 || x.stride(1) == 1;
  const bool apart = x.size(0) <= 1 || x.stride(0) >= x.size(1);
  return unit && apart ? x : x.contiguous();
}

std::tuple<at::Tensor, at::Tensor> dkd_forward_cuda(const at::Tensor& student,
                                                    const at::Tensor& teacher,
                                                    const at::Tensor& labels, double alpha,
                                                    double beta, double inv_temperature,
                                                    double grad_scale, bool student_grad) {
  check_dkd_args(student, teacher, labels, alpha, beta, inv_temperature, grad_scale, at::kCUDA);
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastkd::dkd_forward on CUDA: student must be float32, bfloat16 or float16 (the GPU "
              "kernels accumulate in float32), got ", dtype);

  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t rows = student.size(0), classes = student.size(1);
  const at::Tensor s = row_major(student), t = row_major(teacher), y = labels.contiguous();
  at::Tensor row_loss = at::empty({rows}, s.options().dtype(at::kFloat));
  at::Tensor grad = at::empty({student_grad ? rows : 0, student_grad ? classes : 0}, s.options());
  if (rows == 0) return {row_loss, grad};
  DKDArgs a;
  a.student = s.const_data_ptr();
  a.teacher = t.const_data_ptr();
  a.student_row_stride = s.stride(0);
  a.teacher_row_stride = t.stride(0);
  a.labels = y.const_data_ptr<int64_t>();
  a.row_loss = row_loss.mutable_data_ptr<float>();
  a.grad = student_grad ? grad.mutable_data_ptr() : nullptr;
  a.rows = rows;
  a.classes = classes;
  a.alpha = alpha;
  a.beta = beta;
  a.inv_temperature = inv_temperature;
  a.grad_scale = grad_scale;
  dkd_forward_launch(a, dtype, c10::cuda::getCurrentCUDAStream());
  return {row_loss, grad};
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("dkd_forward", &fastkd::cuda::dkd_forward_cuda); }
