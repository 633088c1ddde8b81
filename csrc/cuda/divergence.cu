// Fused softmax-divergence forward (+ gradient) on CUDA: fastkd::divergence_forward
// for CUDA tensors (SPEC §1). Same contract and pass structure as the CPU
// kernel (csrc/cpu/divergence_kernel.cpp); the per-element math is the shared
// csrc/common/divergence_math.h, evaluated in float32 for float32, bfloat16
// and float16 inputs (float64 is refused: nothing here accumulates in double).
//
// One thread block per row (blocks grid-stride over rows when N exceeds the
// grid), threads stride over V so that a warp's loads are coalesced; each pass
// ends in one cub::BlockReduce whose result is broadcast to the block:
//   pass 1  max of s and t, and the first index of each max    read s, t
//   pass 2  Σ exp((s − max)/T), Σ exp((t − max)/T)              read s, t
//   pass 3  loss, Σu, Σv  (KL with the student gradient only: Σu = −1 is
//           known in advance, so the gradient (q − p)·grad_scale/T is written
//           here and pass 4 is skipped)                          read s, t
//   pass 4  gradients (u − q Σu)·grad_scale/T, (v − p Σv)·grad_scale/T
//                                                     read s, t; write grads
// The row's mode (index of the max) locates the shift of the unbounded log
// ratios of REVERSE_KL's u and KL's v (divergence_math.h); the CPU kernel finds
// it with a separate scan, here it rides along with pass 1's max.
// Memory traffic floor: read 2·N·V elements, write N·V per gradient requested
// (and 4·N bytes of row loss). Passes 2–4 re-read the row; the re-reads come
// from L2 only while the rows resident on the GPU at once (SMs × blocks per
// SM, one row each: 2·V·sizeof(dtype) bytes) fit in it, so the floor is
// reached for small and moderate V, and large V approaches 3–4 reads.
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
  float s_mode, t_at_s_mode, t_mode, s_at_t_mode;
};

template <int KIND>
__device__ __forceinline__ ElementTerms<float> terms_at(float s, float t, const RowConstants& c,
                                                        const Coefficient<float>& coef) {
  const float logq = (s - c.max_s) * c.inv_t - c.log_sum_s;
  const float logp = (t - c.max_t) * c.inv_t - c.log_sum_t;
  // log(q/p) − (its value at q's mode), from logit differences; likewise for
  // log(p/q) at p's mode. Only KL / REVERSE_KL read them (dead code otherwise).
  const float ratio_q = (s - c.s_mode) * c.inv_t - (t - c.t_at_s_mode) * c.inv_t;
  const float ratio_p = (t - c.t_mode) * c.inv_t - (s - c.s_at_t_mode) * c.inv_t;
  return element_terms<KIND>({logp, logq, fk_exp(logp), fk_exp(logq), ratio_q, ratio_p}, coef);
}

template <int KIND, int BLOCK, class scalar_t>
__global__ void __launch_bounds__(BLOCK) _divergence_fwd_kernel(
    const scalar_t* __restrict__ student,  // [N, V] student logits, row stride student_row_stride
    const scalar_t* __restrict__ teacher,  // [N, V] teacher logits, row stride teacher_row_stride
    int64_t student_row_stride, int64_t teacher_row_stride,
    const bool* __restrict__ row_mask,     // [N] or nullptr
    float* __restrict__ row_loss,          // [N]
    scalar_t* __restrict__ student_grad,   // [N, V] contiguous, or nullptr
    scalar_t* __restrict__ teacher_grad,   // [N, V] contiguous, or nullptr
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
  const int64_t first = threadIdx.x;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    scalar_t* gs = want_s ? student_grad + row * V : nullptr;
    scalar_t* gt = want_t ? teacher_grad + row * V : nullptr;
    // Every thread of the block reads the same mask entry: the branch is
    // uniform, so no thread skips the barriers below.
    if (row_mask != nullptr && !row_mask[row]) {
      if (threadIdx.x == 0) row_loss[row] = 0.f;
      for (int64_t j = first; j < V; j += BLOCK) {
        if (want_s) gs[j] = scalar_t(0.f);
        if (want_t) gt[j] = scalar_t(0.f);
      }
      continue;
    }
    const scalar_t* s = student + row * student_row_stride;
    const scalar_t* t = teacher + row * teacher_row_stride;

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

    // pass 2: the log-sum-exp (an all −inf row gives NaN, as on CPU).
    float2 sum_st = make_float2(0.f, 0.f);
    for (int64_t j = first; j < V; j += BLOCK) {
      sum_st.x += fk_exp((static_cast<float>(s[j]) - c.max_s) * inv_temperature);
      sum_st.y += fk_exp((static_cast<float>(t[j]) - c.max_t) * inv_temperature);
    }
    sum_st = block_all_reduce<BLOCK>(sum_st, SumOp2{}, temp.pair, pair_result);
    c.log_sum_s = fk_log(sum_st.x);
    c.log_sum_t = fk_log(sum_st.y);
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
    }

    // pass 3: ℓ = Σ loss terms, Σu, Σv (divergence_math.h).
    float3 acc = make_float3(0.f, 0.f, 0.f);
    for (int64_t j = first; j < V; j += BLOCK) {
      const ElementTerms<float> e =
          terms_at<KIND>(static_cast<float>(s[j]), static_cast<float>(t[j]), c, coef);
      acc.x += e.loss;
      if (fused_grad) {
        gs[j] = static_cast<scalar_t>(softmax_grad(e.u, e.q, -1.f, grad_factor));
      } else {
        if (want_s) acc.y += e.u;
        if (want_t) acc.z += e.v;
      }
    }
    acc = block_all_reduce<BLOCK>(acc, SumOp3{}, temp.triple, triple_result);
    if (threadIdx.x == 0) row_loss[row] = acc.x;
    if (fused_grad || !(want_s || want_t)) continue;

    // pass 4: dL/ds = (u − q Σu)/T, dL/dt = (v − p Σv)/T, times grad_scale.
    const float sum_u = acc.y, sum_v = acc.z;
    for (int64_t j = first; j < V; j += BLOCK) {
      const ElementTerms<float> e =
          terms_at<KIND>(static_cast<float>(s[j]), static_cast<float>(t[j]), c, coef);
      if (want_s) gs[j] = static_cast<scalar_t>(softmax_grad(e.u, e.q, sum_u, grad_factor));
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
  _divergence_fwd_kernel<KIND, BLOCK, scalar_t><<<grid, BLOCK, 0, stream>>>(
      static_cast<const scalar_t*>(a.student), static_cast<const scalar_t*>(a.teacher),
      a.student_row_stride, a.teacher_row_stride, a.row_mask, static_cast<float*>(a.row_loss),
      static_cast<scalar_t*>(a.student_grad), static_cast<scalar_t*>(a.teacher_grad), a.rows,
      a.vocab, static_cast<float>(a.inv_temperature),
      static_cast<float>(a.grad_scale * a.inv_temperature), coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Short rows (classification heads, V ≤ 2048) get small blocks so that most
// threads have work; vocabulary-sized rows get 512 threads.
template <int KIND, class scalar_t>
void launch_for_vocab(const DivergenceArgs& a, cudaStream_t stream) {
  if (a.vocab <= 2048) {
    launch<KIND, 128, scalar_t>(a, stream);
  } else {
    launch<KIND, 512, scalar_t>(a, stream);
  }
}

template <int KIND>
void launch_for_dtype(const DivergenceArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::Float32: return launch_for_vocab<KIND, float>(a, stream);
    case DType::BFloat16: return launch_for_vocab<KIND, c10::BFloat16>(a, stream);
    case DType::Float16: return launch_for_vocab<KIND, c10::Half>(a, stream);
    case DType::Float64: break;  // refused by the op before any launch
  }
  TORCH_CHECK(false, "fastkd::divergence_forward on CUDA: float64 is not supported");
}

void divergence_forward_launch(const DivergenceArgs& a, cudaStream_t stream) {
  switch (a.kind) {
    case KL: return launch_for_dtype<KL>(a, stream);
    case REVERSE_KL: return launch_for_dtype<REVERSE_KL>(a, stream);
    case JSD: return launch_for_dtype<JSD>(a, stream);
    case SKEW_KL: return launch_for_dtype<SKEW_KL>(a, stream);
    case SKEW_REVERSE_KL: return launch_for_dtype<SKEW_REVERSE_KL>(a, stream);
    case TVD: return launch_for_dtype<TVD>(a, stream);
  }
  TORCH_CHECK(false, "fastkd::divergence_forward: unknown kind ", a.kind);
}

// ---- the op -------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature,
    double coef, double grad_scale, bool student_grad, bool teacher_grad) {
  CHECK_DEVICE_TYPE(student, at::kCUDA);
  CHECK_DEVICE_TYPE(teacher, at::kCUDA);
  TORCH_CHECK(student.scalar_type() != at::kDouble,
              "fastkd::divergence_forward on CUDA: student must be float32, bfloat16 or "
              "float16 (the GPU kernels accumulate in float32), got float64");
  const c10::cuda::CUDAGuard device_guard(student.device());
  const auto empty = [](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  };
  const DivergenceCall call =
      prepare_divergence(student, teacher, row_mask, kind, inv_temperature, coef, grad_scale,
                         student_grad, teacher_grad, empty);
  if (call.args.rows == 0) return call.outputs();
  divergence_forward_launch(call.args, c10::cuda::getCurrentCUDAStream());
  return call.outputs();
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("divergence_forward", &fastkd::cuda::divergence_forward_cuda);
}
