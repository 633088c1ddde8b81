// Fused softmax-divergence forward (+ gradient) on CUDA: fastkd::divergence_forward
// for CUDA tensors (docs/spec.md §1). Same contract and pass structure as the CPU
// kernel (csrc/cpu/divergence_kernel.cpp); the per-element math is the shared
// csrc/common/divergence_math.h, evaluated in float32 for float32, bfloat16
// and float16 inputs (float64 is refused: nothing here accumulates in double).
//
// One thread block per row (blocks grid-stride over rows when N exceeds the
// grid), threads stride over V so that a warp's loads are coalesced; each pass
// ends in one cub::BlockReduce whose result is broadcast to the block:
//   pass 1  max of s and t, and the first index of each max    read s, t
//   pass 2  Σ exp((s − max)/T), Σ exp((t − max)/T)
//           (+ Σ exp(s − max) with labels and T ≠ 1)            read s, t
//   pass 3  loss, Σu, Σv  (KL with the student gradient only: Σu = −1 is
//           known in advance, so the gradient (q − p)·grad_scale/T is written
//           here and pass 4 is skipped)                          read s, t
//   pass 4  gradients (u − q Σu)·grad_scale/T, (v − p Σv)·grad_scale/T
//                                                     read s, t; write grads
// With labels, the hard-label cross-entropy at T = 1 rides along (docs/spec.md §1.7:
// hard_weight · CE + soft_weight · KD): row_ce = log Σ exp(s) − s_y =
// (max_s − s_y) + log Σ exp(s − max_s), written after pass 2 from one extra
// load of s_y; the student gradient gets + hard_grad_scale · (softmax(s) −
// onehot(y)), added in float32 where the gradient is written (pass 3 or 4)
// before the one cast to the input dtype. It costs no extra read or write of
// a row: at T = 1 the student's normaliser is the cross-entropy's and
// softmax(s) is q, so not even an extra exp; at T ≠ 1 one exp per element in
// pass 2 (the third sum) and one where the gradient is written.
// The row's mode (index of the max) locates the shift of the unbounded log
// ratios of REVERSE_KL's u and KL's v (divergence_math.h); the CPU kernel finds
// it with a separate scan, here it rides along with pass 1's max.
// Memory traffic floor: read 2·N·V elements, write N·V per gradient requested
// (and 4·N bytes of row loss; with labels 8·N bytes read and 4·N of row_ce
// written). Passes 2–4 re-read the row; the re-reads come from L2 only while
// the rows resident on the GPU at once (SMs × blocks per SM, one row each:
// 2·V·sizeof(dtype) bytes) fit in it, so the floor is reached for small and
// moderate V, and large V approaches 3–4 reads.
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

#include "../common/divergence_math.h"
#include "../common/divergence_op.h"
#include "block_reduce.cuh"
#include "divergence_dispatch.cuh"
#include "hard_label.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace fastkd::divergence;

// ---- device code --------------------------------------------------------------

// Pass 1's per-thread (then per-block) state: the max of each row and the
// first index holding it (first strict maximum; ties resolved to the lower
// index when combining). `fk_max` keeps NaN sticky, as on CPU.
struct RowMax {
  float s, t;          // max_j s_j, max_j t_j
  int64_t s_at, t_at;  // first j with s_j == max (t_j == max); `none` if no such j
};

struct RowMaxOp {
  __device__ __forceinline__ static int64_t first_at(float a, int64_t ia, float b, int64_t ib) {
    return a > b ? ia : (b > a ? ib : (ia < ib ? ia : ib));
  }
  __device__ __forceinline__ RowMax operator()(const RowMax& a, const RowMax& b) const {
    return {fk_max(a.s, b.s), fk_max(a.t, b.t), first_at(a.s, a.s_at, b.s, b.s_at),
            first_at(a.t, a.t_at, b.t, b.t_at)};
  }
};

// Everything element_terms needs besides the two logits; the same constants
// and the same expressions as RowConstants / terms_at in
// csrc/cpu/divergence_kernel.cpp. log q = (s − max)/T − log_sum keeps the
// normaliser in parts and is exact at the max even under FMA contraction (see
// there); the *_mode values are the logits at the student's and the teacher's
// most probable entry.
struct RowConstants {
  float inv_t, max_s, log_sum_s, max_t, log_sum_t;
  float log_sum_gap;  // log_sum_t − log_sum_s, taken in double and rounded once
  float s_mode, t_at_s_mode, t_mode, s_at_t_mode;
};

template <int KIND>
__device__ __forceinline__ ElementTerms<float> terms_at(float s, float t, const RowConstants& c,
                                                        const Coefficient<float>& coef) {
  const float a_s = (s - c.max_s) * c.inv_t, a_t = (t - c.max_t) * c.inv_t;
  const float logq = a_s - c.log_sum_s;
  const float logp = a_t - c.log_sum_t;
  // log p − log q from the logit differences and one rounded row constant,
  // not logp − logq (each carries the rounding of its ~log V normaliser)
  const float log_ratio = (a_t - a_s) - c.log_sum_gap;
  // log(q/p) − (its value at q's mode), from logit differences; likewise for
  // log(p/q) at p's mode. Only KL / REVERSE_KL read them (dead code otherwise).
  const float ratio_q = (s - c.s_mode) * c.inv_t - (t - c.t_at_s_mode) * c.inv_t;
  const float ratio_p = (t - c.t_mode) * c.inv_t - (s - c.s_at_t_mode) * c.inv_t;
  return element_terms<KIND>({log_ratio, fk_exp(logp), fk_exp(logq), ratio_q, ratio_p}, coef);
}

// WITH_CE: labels given (labels and row_ce non-null); see the launcher for
// why a template parameter rather than a runtime flag.
template <int KIND, int BLOCK, class scalar_t, bool WITH_CE>
__global__ void __launch_bounds__(BLOCK) _divergence_fwd_kernel(
    const scalar_t* __restrict__ student,  // [N, V] student logits, row stride student_row_stride
    const scalar_t* __restrict__ teacher,  // [N, V] teacher logits, row stride teacher_row_stride
    int64_t student_row_stride, int64_t teacher_row_stride,
    int64_t rows_per_block,                // row r at (r / rows_per_block) · block stride +
    int64_t student_block_stride,          // (r % rows_per_block) · row stride
    int64_t teacher_block_stride,
    const bool* __restrict__ row_mask,     // [N] or nullptr
    float* __restrict__ row_loss,          // [N]
    scalar_t* __restrict__ student_grad,   // [N, V] contiguous, or nullptr
    scalar_t* __restrict__ teacher_grad,   // [N, V] contiguous, or nullptr
    const int64_t* __restrict__ labels,    // [N] hard labels if WITH_CE (else unused)
    float* __restrict__ row_ce,            // [N] if WITH_CE (else unused)
    float hard_grad_scale,                 // the cross-entropy's gradient factor
    int64_t rows, int64_t V, float inv_temperature,
    float grad_factor,                     // grad_scale / T
    Coefficient<float> coef) {
  static_assert(BLOCK % 32 == 0, "block size must be a whole number of warps");
  using ReduceMax = cub::BlockReduce<RowMax, BLOCK>;
  using Reduce2 = cub::BlockReduce<float2, BLOCK>;
  using Reduce3 = cub::BlockReduce<float3, BLOCK>;
  __shared__ union {
    typename ReduceMax::TempStorage max;
    typename Reduce2::TempStorage pair;
    typename Reduce3::TempStorage triple;
  } temp;
  __shared__ RowMax max_result;
  __shared__ float2 pair_result;
  __shared__ float3 triple_result;

  const bool want_s = student_grad != nullptr;
  const bool want_t = teacher_grad != nullptr;
  // KL with only the student gradient: Σu = −Σp = −1, so the gradient is
  // known in pass 3 and pass 4 is skipped.
  const bool fused_grad = KIND == KL && want_s && !want_t;
  // The gradients whose log ratios are shifted by their value at the mode.
  // (V > 0: the mode is loaded, and an empty row has none.)
  const bool need_modes = V > 0 && ((KIND == REVERSE_KL && want_s) || (KIND == KL && want_t));
  // The cross-entropy is at temperature 1: when T is 1 as well (the float the
  // kernel computes with), the student's normaliser and q serve it, otherwise
  // pass 2 sums exp(s − max_s) too. Uniform over the grid.
  const bool unit_t = inv_temperature == 1.f;
  const bool sum_ce = WITH_CE && !unit_t;
  const int64_t first = threadIdx.x;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    scalar_t* gs = want_s ? student_grad + row * V : nullptr;
    scalar_t* gt = want_t ? teacher_grad + row * V : nullptr;
    // Every thread of the block reads the same mask entry: the branch is
    // uniform, so no thread skips the barriers below.
    if (row_mask != nullptr && !row_mask[row]) {
      if (threadIdx.x == 0) {
        row_loss[row] = 0.f;
        if constexpr (WITH_CE) row_ce[row] = 0.f;
      }
      for (int64_t j = first; j < V; j += BLOCK) {
        if (want_s) gs[j] = scalar_t(0.f);
        if (want_t) gt[j] = scalar_t(0.f);
      }
      continue;
    }
    const int64_t block = row / rows_per_block, in_block = row - block * rows_per_block;
    const scalar_t* s = student + block * student_block_stride + in_block * student_row_stride;
    const scalar_t* t = teacher + block * teacher_block_stride + in_block * teacher_row_stride;

    // pass 1: max(x)/T == max(x/T) because T > 0.
    RowMax mx{-INFINITY, -INFINITY, V, V};
    for (int64_t j = first; j < V; j += BLOCK) {
      const float sj = static_cast<float>(s[j]), tj = static_cast<float>(t[j]);
      if (sj > mx.s) mx.s_at = j;
      if (tj > mx.t) mx.t_at = j;
      mx.s = fk_max(mx.s, sj);
      mx.t = fk_max(mx.t, tj);
    }
    mx = block_all_reduce<BLOCK>(mx, RowMaxOp{}, temp.max, max_result);
    RowConstants c;
    c.inv_t = inv_temperature;
    c.max_s = mx.s;
    c.max_t = mx.t;

    // pass 2: the log-sum-exp (an all −inf row gives NaN, as on CPU); with
    // labels and T ≠ 1 also the cross-entropy's Σ exp(s − max_s) (sum_ce is
    // uniform over the block, so both threads and barriers agree on the
    // reduction taken).
    float3 sums = make_float3(0.f, 0.f, 0.f);
    for (int64_t j = first; j < V; j += BLOCK) {
      const float sj = static_cast<float>(s[j]);
      sums.x += fk_exp((sj - c.max_s) * inv_temperature);
      sums.y += fk_exp((static_cast<float>(t[j]) - c.max_t) * inv_temperature);
      if (sum_ce) sums.z += fk_exp(sj - c.max_s);
    }
    if (sum_ce) {
      sums = block_all_reduce<BLOCK>(sums, SumOp3{}, temp.triple, triple_result);
    } else {
      const float2 st = block_all_reduce<BLOCK>(make_float2(sums.x, sums.y), SumOp2{}, temp.pair,
                                                pair_result);
      sums.x = st.x;
      sums.y = st.y;
    }
    c.log_sum_s = fk_log(sums.x);
    c.log_sum_t = fk_log(sums.y);
    c.log_sum_gap = static_cast<float>(::log(static_cast<double>(sums.y)) -
                                       ::log(static_cast<double>(sums.x)));
    HardLabel<float> h{0, 0.f, 0.f};
    if constexpr (WITH_CE) {
      // Every thread reads the same label; s_y is loaded (by thread 0 only)
      // for a label in [0, V) alone, so an out-of-range label (and any label
      // of an empty row) reads nothing out of bounds: row_ce is then NaN.
      h.y = labels[row];
      const bool in_range = h.y >= 0 && h.y < V;
      h.log_sum = unit_t ? c.log_sum_s : fk_log(sums.z);
      h.scale = in_range ? hard_grad_scale : NAN;
      if (threadIdx.x == 0) {
        row_ce[row] = in_range ? (c.max_s - static_cast<float>(s[h.y])) + h.log_sum : NAN;
      }
    }
    c.s_mode = c.t_at_s_mode = c.t_mode = c.s_at_t_mode = 0.f;
    if (need_modes) {
      // No index for a row without a maximum (NaN, or all −inf): such a row's
      // loss is NaN anyway; index 0 as on CPU keeps the loads in bounds.
      const int64_t s_at = mx.s_at < V ? mx.s_at : 0;
      const int64_t t_at = mx.t_at < V ? mx.t_at : 0;
      c.s_mode = static_cast<float>(s[s_at]);
      c.t_at_s_mode = static_cast<float>(t[s_at]);
      c.t_mode = static_cast<float>(t[t_at]);
      c.s_at_t_mode = static_cast<float>(s[t_at]);
      // a mode where the other side is −inf (an infinite divergence): shift
      // by the maxima instead, as the CPU kernel does
      if (!isfinite(c.t_at_s_mode)) {
        c.s_mode = c.max_s;
        c.t_at_s_mode = c.max_t;
      }
      if (!isfinite(c.s_at_t_mode)) {
        c.t_mode = c.max_t;
        c.s_at_t_mode = c.max_s;
      }
    }

    // pass 3: ℓ = Σ loss terms, Σu, Σv (divergence_math.h).
    float3 acc = make_float3(0.f, 0.f, 0.f);
    for (int64_t j = first; j < V; j += BLOCK) {
      const float sj = static_cast<float>(s[j]);
      const ElementTerms<float> e = terms_at<KIND>(sj, static_cast<float>(t[j]), c, coef);
      acc.x += e.loss;
      if (fused_grad) {
        float g = softmax_grad(e.u, e.q, -1.f, grad_factor);
        if constexpr (WITH_CE) g += hard_label_grad(sj, j, e.q, c.max_s, unit_t, h);
        gs[j] = static_cast<scalar_t>(g);
      } else {
        if (want_s) acc.y += e.u;
        if (want_t) acc.z += e.v;
      }
    }
    acc = block_all_reduce<BLOCK>(acc, SumOp3{}, temp.triple, triple_result);
    // a divergence is never negative (rounding of a tiny one); NaN stays NaN
    if (threadIdx.x == 0) row_loss[row] = acc.x < 0.f ? 0.f : acc.x;
    if (fused_grad || !(want_s || want_t)) continue;

    // pass 4: dL/ds = (u − q Σu)/T, dL/dt = (v − p Σv)/T, times grad_scale;
    // the student's plus the cross-entropy's hard_grad_scale · (softmax − onehot).
    const float sum_u = acc.y, sum_v = acc.z;
    for (int64_t j = first; j < V; j += BLOCK) {
      const float sj = static_cast<float>(s[j]);
      const ElementTerms<float> e = terms_at<KIND>(sj, static_cast<float>(t[j]), c, coef);
      if (want_s) {
        float g = softmax_grad(e.u, e.q, sum_u, grad_factor);
        if constexpr (WITH_CE) g += hard_label_grad(sj, j, e.q, c.max_s, unit_t, h);
        gs[j] = static_cast<scalar_t>(g);
      }
      if (want_t) gt[j] = static_cast<scalar_t>(softmax_grad(e.v, e.p, sum_v, grad_factor));
    }
  }
}

// ---- launcher -----------------------------------------------------------------

// Rows beyond this many blocks are grid-strided: far more blocks than can be
// resident on any GPU, and well inside gridDim.x's limit.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <int KIND, int BLOCK, class scalar_t>
void launch(const DivergenceArgs& a, cudaStream_t stream) {
  Coefficient<float> coef;
  coef.c = static_cast<float>(a.coef);
  coef.one_minus_c = static_cast<float>(1.0 - a.coef);
  coef.log_c = static_cast<float>(std::log(a.coef));
  coef.log_one_minus_c = static_cast<float>(std::log1p(-a.coef));
  const unsigned grid = static_cast<unsigned>(std::min(a.rows, kMaxBlocks));
  // The cross-entropy is a template parameter, not a runtime flag: as a flag
  // its state (label, scale, a third sum) is compiled into every kernel, and
  // it raised the registers of most label-free kernels on sm_90 by 8–20 (KL at
  // 512 threads 40 → 60: 3 → 2 resident blocks per SM; JSD and the skews
  // 32 → 40: 4 → 3); as a parameter the label-free kernels compile exactly as
  // before, for twice the instantiations (and compile time).
  const auto kernel = a.labels != nullptr ? _divergence_fwd_kernel<KIND, BLOCK, scalar_t, true>
                                          : _divergence_fwd_kernel<KIND, BLOCK, scalar_t, false>;
  kernel<<<grid, BLOCK, 0, stream>>>(
      static_cast<const scalar_t*>(a.student), static_cast<const scalar_t*>(a.teacher),
      a.student_row_stride, a.teacher_row_stride, a.rows_per_block, a.student_block_stride,
      a.teacher_block_stride, a.row_mask, static_cast<float*>(a.row_loss),
      static_cast<scalar_t*>(a.student_grad), static_cast<scalar_t*>(a.teacher_grad), a.labels,
      static_cast<float*>(a.row_ce), static_cast<float>(a.hard_grad_scale), a.rows, a.vocab,
      static_cast<float>(a.inv_temperature),
      static_cast<float>(a.grad_scale * a.inv_temperature), coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Short rows (classification heads, V ≤ 2048) get small blocks so that most
// threads have work; vocabulary-sized rows get 512 threads.
void divergence_forward_launch(const DivergenceArgs& a, cudaStream_t stream) {
  dispatch_kind<KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD>(
      a.kind, "fastkd::divergence_forward: unknown kind ", [&]<int KIND>() {
        dispatch_float32_accumulated(a.dtype, "fastkd::divergence_forward", [&]<class scalar_t>() {
          if (a.vocab <= 2048) {
            launch<KIND, 128, scalar_t>(a, stream);
          } else {
            launch<KIND, 512, scalar_t>(a, stream);
          }
        });
      });
}

// ---- the op -------------------------------------------------------------------

// No range check of the labels here (it would synchronise with the device):
// the Python layer checks them, and the kernel guards itself (see HardLabel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature,
    double coef, double grad_scale, bool student_grad, bool teacher_grad,
    const std::optional<at::Tensor>& labels, double hard_grad_scale) {
  CHECK_DEVICE_TYPE(student, at::kCUDA);
  CHECK_DEVICE_TYPE(teacher, at::kCUDA);
  check_not_float64_on_cuda(student, "fastkd::divergence_forward", "student");
  const c10::cuda::CUDAGuard device_guard(student.device());
  const DivergenceCall call =
      prepare_divergence(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale,
                         student_grad, teacher_grad, labels, hard_grad_scale, &empty_gradient_tensor);
  return run_divergence_launch(call, &divergence_forward_launch);
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("divergence_forward", &fastkd::cuda::divergence_forward_cuda);
}
