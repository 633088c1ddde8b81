// Divergence against a top-k (sparse) teacher on CUDA: fastkd::topk_divergence_forward
// for CUDA tensors (docs/spec.md §1). Same contract and numerics as the CPU kernel
// (csrc/cpu/topk_kernel.cpp, whose header derives the formulas): every
// divergence is Σ_ids terms + c·R, R = Σ_{v ∉ ids} q_v the student's mass off
// the teacher's k ids, summed directly (never as 1 − Σ_ids q, which cancels when
// the ids hold nearly all of the student's mass); the k support terms, the
// normaliser and R in double (csrc/common/topk_math.h), the vocabulary-sized
// work in float32. float64 inputs are refused, as by the dense CUDA op.
//
// One thread block per row (blocks grid-stride over rows when N exceeds the
// grid), threads stride over V so that a warp's loads are coalesced:
//   ids      mark the row's k ids in a shared-memory bitmap (V bits)   read k ids
//   stream 1 online max and Σ exp((s − max)/T) of the off-support
//            entries, per thread, then one block reduction             read s
//   support  the row max over the ids too, Σ_ids exp, the teacher's
//            normaliser, then ℓ and G = Σ_ids q_j g_j + c R (double);
//            with the gradient, (q_j g_j − q_j G)·grad_scale/T at the ids
//   stream 2 the gradient e_v (c − G)·grad_scale/(T Σe) off the support
//                                                       read s; write N·V
// With labels (the WITH_CE instantiations), the hard-label cross-entropy at
// T = 1 rides along, as in csrc/cuda/divergence.cu: row_ce = log Σ exp(s) −
// s_y = (max_s − s_y) + log Σ_v exp(s_v − max_s), from one extra load of s_y
// (thread 0, only for a label in [0, V)), and the gradient gets
// + hard_grad_scale · (softmax(s) − onehot(y)), added before the one cast to
// the input dtype (in double at the ids, in float32 in stream 2). At T = 1
// the student's normaliser Σe is the cross-entropy's and softmax(s) is q: no
// extra exp. At T ≠ 1 stream 1 also sums exp(s − max) off the support
// (sharing the running max: the max is the same at every T), the support pass
// on the ids (double), and stream 2 pays one more exp per element. No extra
// read or write of a row; 8·N bytes of labels read, 4·N of row_ce written. A
// kept row whose label is outside [0, V) gets row_ce NaN and a NaN gradient
// row (the Python layer checks the range first; this is the kernel's own
// guard), never an out-of-bounds load.
// The bitmap makes each off-support test one shared-memory load (a warp's 32
// neighbours share one word), and every gradient entry is written exactly once.
// Memory traffic floor: read N·V, write N·V elements of gradient (plus 12·N·k
// bytes of ids and values). Stream 2 re-reads the row from L2 while the rows
// resident at once (SMs × blocks per SM, V·sizeof(dtype) bytes each) fit in it.
// Shared memory: V/8 bytes per block (16 KiB at V = 128256), over 48 KiB only
// past V = 393216 (opted in up to the device's per-block limit, checked).
//
// The ids are checked by the kernel, with no device → host synchronisation
// (docs/spec.md §6): building the bitmap, an id outside [0, V) is not marked
// and an id already marked (atomicOr's old word has its bit) is a repeat;
// either flags the row, which then gets a NaN loss (and row_ce) and a NaN
// gradient row and nothing else: no gather or scatter leaves the row and no
// gradient entry is written twice. The Python layer refuses such ids with a
// ValueError first where values are checked on the host
// (fastkd._validate.values_checked_on_host).
//
// Layout: the device code and a raw-pointer launcher first, then the op
// (checks, outputs, device guard, stream) and its registration.
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
#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/topk_op.h"
#include "../common/topk_math.h"
#include "block_reduce.cuh"
#include "divergence_dispatch.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace fastkd::divergence;

// ---- device code --------------------------------------------------------------

// Running max and Σ exp((x − max)/T) of one thread's (then the block's) entries.
struct OnlineSum {
  float max, sum;
};

// Combines two partial (max, Σ) at their common max. A side without a finite
// entry (max −inf) has sum 0, or NaN if it met a NaN: its sum is added as is.
struct OnlineSumOp {
  float inv_t;
  __device__ __forceinline__ OnlineSum operator()(const OnlineSum& a, const OnlineSum& b) const {
    const float m = fk_max(a.max, b.max);
    if (m == -INFINITY) return {m, a.sum + b.sum};
    return {m, a.sum * fk_exp((a.max - m) * inv_t) + b.sum * fk_exp((b.max - m) * inv_t)};
  }
};

// OnlineSum plus the cross-entropy's Σ exp(x − max) at temperature 1 over the
// same entries and the same running max (labels at T ≠ 1 only).
struct OnlineSumCE {
  float max, sum, sum_ce;
};

struct OnlineSumCEOp {
  float inv_t;
  __device__ __forceinline__ OnlineSumCE operator()(const OnlineSumCE& a, const OnlineSumCE& b) const {
    const float m = fk_max(a.max, b.max);
    if (m == -INFINITY) return {m, a.sum + b.sum, a.sum_ce + b.sum_ce};
    return {m, a.sum * fk_exp((a.max - m) * inv_t) + b.sum * fk_exp((b.max - m) * inv_t),
            a.sum_ce * fk_exp(a.max - m) + b.sum_ce * fk_exp(b.max - m)};
  }
};

struct SumOp3d {
  __device__ __forceinline__ double3 operator()(const double3& a, const double3& b) const {
    return make_double3(a.x + b.x, a.y + b.y, a.z + b.z);
  }
};

struct MaxOp2 {
  __device__ __forceinline__ float2 operator()(const float2& a, const float2& b) const {
    return make_float2(fk_max(a.x, b.x), fk_max(a.y, b.y));
  }
};

// s[id] for one of the row's ids; an id outside the row (whose row the
// kernel's id check has already made NaN) reads nothing and gives NaN
template <class scalar_t>
__device__ __forceinline__ float logit_at(const scalar_t* s, int64_t id, int64_t V) {
  return (id >= 0 && id < V) ? static_cast<float>(s[id]) : NAN;
}

__device__ __forceinline__ bool marked(const uint32_t* bits, int64_t v) {
  return (bits[v >> 5] >> (v & 31)) & 1u;
}

// What the support pass needs besides one id's two logits.
struct SupportConstants {
  double inv_t;      // 1/T
  double max_s;      // the row max of the student logits
  double log_total;  // log Σ_v exp((s_v − max_s)/T)
  double max_t;      // the max of the teacher's k logits
  double log_sum_t;  // log Σ_j exp((t_j − max_t)/T)
};

template <int KIND>
__device__ __forceinline__ topk::SupportTerm support_term_at(float s, float t, const SupportConstants& c,
                                                              const Coefficient<double>& coef,
                                                              double& log_q) {
  // (s − max) is exact in double, and 0 at the max
  log_q = (static_cast<double>(s) - c.max_s) * c.inv_t - c.log_total;
  const double log_p = (static_cast<double>(t) - c.max_t) * c.inv_t - c.log_sum_t;
  return topk::support_term<KIND>(log_q, log_p, coef);
}

// WITH_CE: labels given (labels and row_ce non-null); a template parameter
// so that the label-free kernels compile exactly as without the feature.
template <int KIND, int BLOCK, class scalar_t, bool WITH_CE>
__global__ void __launch_bounds__(BLOCK) _topk_divergence_fwd_kernel(
    const scalar_t* __restrict__ student,  // [N, V] logits, row stride student_row_stride
    int64_t student_row_stride,
    const int64_t* __restrict__ index,     // [N, K] teacher ids; a row not distinct and in [0, V) is NaN
    const float* __restrict__ value,       // [N, K] teacher logits at those ids
    const bool* __restrict__ row_mask,     // [N] or nullptr
    float* __restrict__ row_loss,          // [N]
    scalar_t* __restrict__ student_grad,   // [N, V] contiguous, or nullptr
    const int64_t* __restrict__ labels,    // [N] hard labels if WITH_CE (else unused)
    float* __restrict__ row_ce,            // [N] if WITH_CE (else unused)
    double hard_grad_scale,                // the cross-entropy's gradient factor
    int64_t rows, int64_t V, int64_t K,
    float inv_t_float,                     // 1/T for the vocabulary-sized streams
    double inv_t,                          // 1/T for the support terms
    double grad_factor,                    // grad_scale / T
    Coefficient<double> coef) {
  static_assert(BLOCK % 32 == 0, "block size must be a whole number of warps");
  using ReduceOnline = cub::BlockReduce<OnlineSum, BLOCK>;
  using ReduceOnlineCE = cub::BlockReduce<OnlineSumCE, BLOCK>;
  using ReduceMax2 = cub::BlockReduce<float2, BLOCK>;
  using ReduceSum2 = cub::BlockReduce<double2, BLOCK>;
  using ReduceSum3 = cub::BlockReduce<double3, BLOCK>;
  __shared__ union {
    typename ReduceOnline::TempStorage online;
    typename ReduceOnlineCE::TempStorage online_ce;
    typename ReduceMax2::TempStorage max2;
    typename ReduceSum2::TempStorage sum2;
    typename ReduceSum3::TempStorage sum3;
  } temp;
  __shared__ OnlineSum online_result;
  __shared__ OnlineSumCE online_ce_result;
  __shared__ float2 max2_result;
  __shared__ double2 sum2_result;
  __shared__ double3 sum3_result;
  // set when the row holds an id outside [0, V) or one id twice
  __shared__ int bad_ids;
  // ceil(V / 32) words: bit v set ⇔ v is one of the row's ids
  extern __shared__ uint32_t support_bits[];

  const int64_t words = (V + 31) / 32;
  const double slope = topk::off_support_slope<KIND>(coef);
  const int64_t first = threadIdx.x;
  // The cross-entropy is at temperature 1: when T is 1 as well the student's
  // normaliser and q serve it, otherwise its own sums. Uniform over the grid,
  // so threads and barriers agree on the reductions taken.
  const bool unit_t = inv_t == 1.0;
  const bool sum_ce = WITH_CE && !unit_t;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    scalar_t* g = student_grad != nullptr ? student_grad + row * V : nullptr;
    // Every thread of the block reads the same mask entry: the branch is
    // uniform, so no thread skips the barriers below.
    if (row_mask != nullptr && !row_mask[row]) {
      if (threadIdx.x == 0) {
        row_loss[row] = 0.f;
        if constexpr (WITH_CE) row_ce[row] = 0.f;
      }
      if (g != nullptr) {
        for (int64_t v = first; v < V; v += BLOCK) g[v] = scalar_t(0.f);
      }
      continue;
    }
    const scalar_t* s = student + row * student_row_stride;
    const int64_t* ids = index + row * K;
    const float* t = value + row * K;

    // ids: the bitmap, and the row's id check (an id outside the row is not
    // marked, an id whose bit was already set is a repeat)
    if (threadIdx.x == 0) bad_ids = 0;
    for (int64_t w = first; w < words; w += BLOCK) support_bits[w] = 0u;
    __syncthreads();
    for (int64_t j = first; j < K; j += BLOCK) {
      const int64_t id = ids[j];
      if (id < 0 || id >= V) {
        bad_ids = 1;
      } else {
        const uint32_t bit = 1u << (id & 31);
        if (atomicOr(&support_bits[id >> 5], bit) & bit) bad_ids = 1;
      }
    }
    __syncthreads();
    // uniform over the block (read after the barrier), so every thread takes
    // the same branch; the barrier before `continue` keeps the next row's
    // reset of bad_ids and the bitmap after every thread's read
    if (bad_ids) {
      if (threadIdx.x == 0) {
        row_loss[row] = NAN;
        if constexpr (WITH_CE) row_ce[row] = NAN;
      }
      if (g != nullptr) {
        for (int64_t v = first; v < V; v += BLOCK) g[v] = scalar_t(NAN);
      }
      __syncthreads();
      continue;
    }

    // stream 1: off-support max and Σ exp, online per thread (one exp per
    // entry, a rescale when the max moves); −inf entries add nothing, a NaN
    // makes the sum NaN. With labels at T ≠ 1 also Σ exp(x − max) (sum_ce).
    OnlineSumCE off{-INFINITY, 0.f, 0.f};
    for (int64_t v = first; v < V; v += BLOCK) {
      if (marked(support_bits, v)) continue;
      const float x = static_cast<float>(s[v]);
      if (x > off.max) {
        off.sum = off.sum * fk_exp((off.max - x) * inv_t_float) + 1.f;
        if (sum_ce) off.sum_ce = off.sum_ce * fk_exp(off.max - x) + 1.f;
        off.max = x;
      } else if (x != -INFINITY) {
        off.sum += fk_exp((x - off.max) * inv_t_float);
        if (sum_ce) off.sum_ce += fk_exp(x - off.max);
      }
    }
    if (sum_ce) {
      off = block_all_reduce<BLOCK>(off, OnlineSumCEOp{inv_t_float}, temp.online_ce, online_ce_result);
    } else {
      const OnlineSum o = block_all_reduce<BLOCK>(OnlineSum{off.max, off.sum}, OnlineSumOp{inv_t_float},
                                                  temp.online, online_result);
      off.max = o.max;
      off.sum = o.sum;
    }

    // support: the row max (ids included) and the teacher's max
    float2 mx = make_float2(-INFINITY, -INFINITY);
    for (int64_t j = first; j < K; j += BLOCK) {
      mx.x = fk_max(mx.x, logit_at(s, ids[j], V));
      mx.y = fk_max(mx.y, t[j]);
    }
    mx = block_all_reduce<BLOCK>(mx, MaxOp2{}, temp.max2, max2_result);
    const float max_s = fk_max(off.max, mx.x);
    SupportConstants c;
    c.inv_t = inv_t;
    c.max_s = max_s;
    c.max_t = mx.y;

    // support: Σ_ids exp((s_j − max)/T) and Σ_j exp((t_j − max_t)/T), double
    // (and with sum_ce Σ_ids exp(s_j − max))
    double3 sums = make_double3(0.0, 0.0, 0.0);
    for (int64_t j = first; j < K; j += BLOCK) {
      const double s_j = static_cast<double>(logit_at(s, ids[j], V));
      sums.x += fk_exp((s_j - c.max_s) * inv_t);
      sums.y += fk_exp((static_cast<double>(t[j]) - c.max_t) * inv_t);
      if (sum_ce) sums.z += fk_exp(s_j - c.max_s);
    }
    if (sum_ce) {
      sums = block_all_reduce<BLOCK>(sums, SumOp3d{}, temp.sum3, sum3_result);
    } else {
      const double2 st = block_all_reduce<BLOCK>(make_double2(sums.x, sums.y), SumOp2{}, temp.sum2,
                                                 sum2_result);
      sums.x = st.x;
      sums.y = st.y;
    }
    // the off-support sum at the row max (no finite entry: 0, or NaN after a
    // NaN; an all −inf row has no max and a NaN loss, as on CPU)
    const double off_sum = off.max == -INFINITY
                               ? static_cast<double>(off.sum)
                               : static_cast<double>(off.sum) *
                                     fk_exp((static_cast<double>(off.max) - c.max_s) * inv_t);
    const double total = off_sum + sums.x;
    c.log_total = fk_log(total);
    c.log_sum_t = fk_log(sums.y);
    const double off_mass = off_sum / total;  // R

    // the cross-entropy: log Σ exp(s − max) (at T = 1 log_total itself) and
    // row_ce; `hard` is hard_grad_scale, or NaN for a label outside [0, V)
    int64_t y = 0;
    double log_ce = 0.0, hard = 0.0;
    if constexpr (WITH_CE) {
      // every thread reads the same label; s_y is loaded by thread 0 only,
      // and only for a label in the row
      y = labels[row];
      const bool in_range = y >= 0 && y < V;
      if (unit_t) {
        log_ce = c.log_total;
      } else {
        const double off_ce = off.max == -INFINITY
                                  ? static_cast<double>(off.sum_ce)
                                  : static_cast<double>(off.sum_ce) *
                                        fk_exp(static_cast<double>(off.max) - c.max_s);
        log_ce = fk_log(off_ce + sums.z);
      }
      hard = in_range ? hard_grad_scale : static_cast<double>(NAN);
      if (threadIdx.x == 0) {
        row_ce[row] = in_range ? static_cast<float>((c.max_s - static_cast<double>(s[y])) + log_ce)
                               : NAN;
      }
    }

    // support: ℓ = c R + Σ_ids terms, G = c R + Σ_ids q_j g_j
    double2 acc = make_double2(0.0, 0.0);
    for (int64_t j = first; j < K; j += BLOCK) {
      double log_q;
      const topk::SupportTerm term =
          support_term_at<KIND>(logit_at(s, ids[j], V), t[j], c, coef, log_q);
      acc.x += term.loss;
      acc.y += term.q_times_g;
    }
    acc = block_all_reduce<BLOCK>(acc, SumOp2{}, temp.sum2, sum2_result);
    // a divergence is never negative (rounding of a tiny one); NaN stays NaN
    if (threadIdx.x == 0) {
      const auto loss = slope * off_mass + acc.x;
      row_loss[row] = static_cast<float>(loss < 0 ? 0 : loss);
    }

    if (g != nullptr) {
      const double big_g = slope * off_mass + acc.y;
      // at the ids: dℓ/ds_j = (q_j g_j − q_j G)/T (+ hard · (softmax_j − [j = y]))
      for (int64_t j = first; j < K; j += BLOCK) {
        double log_q;
        const int64_t id = ids[j];
        if (id < 0 || id >= V) continue;
        const float s_j = logit_at(s, id, V);
        const topk::SupportTerm term = support_term_at<KIND>(s_j, t[j], c, coef, log_q);
        const double q = fk_exp(log_q);
        double grad = (term.q_times_g - q * big_g) * grad_factor;
        if constexpr (WITH_CE) {
          const double softmax = unit_t ? q : fk_exp((static_cast<double>(s_j) - c.max_s) - log_ce);
          grad += hard * (id == y ? softmax - 1.0 : softmax);
        }
        g[id] = static_cast<scalar_t>(static_cast<float>(grad));
      }
      // stream 2: off the ids q_v (c − G)/T = e_v (c − G)/(T Σe)
      // (+ hard · (softmax_v − [v = y]), softmax_v = e_v/Σe at T = 1)
      const float off_factor = static_cast<float>((slope - big_g) * grad_factor / total);
      const float inv_total = static_cast<float>(1.0 / total);
      const float log_ce_f = static_cast<float>(log_ce), hard_f = static_cast<float>(hard);
      for (int64_t v = first; v < V; v += BLOCK) {
        if (marked(support_bits, v)) continue;
        const float x = static_cast<float>(s[v]);
        const float e = fk_exp((x - max_s) * inv_t_float);
        float grad = e * off_factor;
        if constexpr (WITH_CE) {
          const float softmax = unit_t ? e * inv_total : fk_exp((x - max_s) - log_ce_f);
          grad += hard_f * (v == y ? softmax - 1.f : softmax);
        }
        g[v] = static_cast<scalar_t>(grad);
      }
    }
    // the bitmap is read above and cleared for the next row
    __syncthreads();
  }
}

// ---- launcher -----------------------------------------------------------------

// Rows beyond this many blocks are grid-strided: far more blocks than can be
// resident on any GPU, and well inside gridDim.x's limit.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <int KIND, int BLOCK, class scalar_t>
void launch(const TopKDivergenceArgs& a, cudaStream_t stream) {
  Coefficient<double> coef;
  coef.c = a.coef;
  coef.one_minus_c = 1.0 - a.coef;
  coef.log_c = std::log(a.coef);
  coef.log_one_minus_c = std::log1p(-a.coef);
  // labels select the WITH_CE instantiation (see the kernel)
  const auto kernel = a.labels != nullptr ? _topk_divergence_fwd_kernel<KIND, BLOCK, scalar_t, true>
                                          : _topk_divergence_fwd_kernel<KIND, BLOCK, scalar_t, false>;
  // the bitmap: dynamic shared memory, next to the kernel's static shared memory
  const size_t bitmap_bytes = static_cast<size_t>((a.vocab + 31) / 32) * sizeof(uint32_t);
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  TORCH_CHECK(bitmap_bytes + attributes.sharedSizeBytes <= static_cast<size_t>(optin),
              "fastkd::topk_divergence_forward on CUDA: V = ", a.vocab, " needs ", bitmap_bytes,
              " bytes of shared memory for its id bitmap, more than this device's ", optin,
              " per block");
  // Static and dynamic shared memory together above the default 48 KiB per
  // block need the opt-in, not the dynamic part alone.
  if (bitmap_bytes + attributes.sharedSizeBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bitmap_bytes)));
  }
  const unsigned grid = static_cast<unsigned>(std::min(a.rows, kMaxBlocks));
  kernel<<<grid, BLOCK, bitmap_bytes, stream>>>(
      static_cast<const scalar_t*>(a.student), a.student_row_stride, a.index,
      static_cast<const float*>(a.value), a.row_mask, static_cast<float*>(a.row_loss),
      static_cast<scalar_t*>(a.student_grad), a.labels, static_cast<float*>(a.row_ce),
      a.hard_grad_scale, a.rows, a.vocab, a.k,
      static_cast<float>(a.inv_temperature), a.inv_temperature, a.grad_scale * a.inv_temperature, coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Short rows (classification heads, V ≤ 2048) get small blocks so that most
// threads have work; vocabulary-sized rows get 512 threads. REVERSE_KL is
// refused by the op (infinite off the teacher's ids).
void topk_divergence_launch(const TopKDivergenceArgs& a, cudaStream_t stream) {
  dispatch_kind<KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD>(
      a.kind, "fastkd::topk_divergence_forward: unsupported kind ", [&]<int KIND>() {
        dispatch_float32_accumulated(a.dtype, "fastkd::topk_divergence_forward", [&]<class scalar_t>() {
          if (a.vocab <= 2048) {
            launch<KIND, 128, scalar_t>(a, stream);
          } else {
            launch<KIND, 512, scalar_t>(a, stream);
          }
        });
      });
}

// ---- the op -------------------------------------------------------------------

// No range check of the labels or the teacher's ids here (either would
// synchronise with the device): the kernel's guards turn a kept row with a
// label outside [0, V), or a row with an id outside [0, V) or twice, into NaN.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_divergence_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher_index, const at::Tensor& teacher_value,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature, double coef,
    double grad_scale, bool student_grad, const std::optional<at::Tensor>& labels,
    double hard_grad_scale) {
  CHECK_DEVICE_TYPE(student, at::kCUDA);
  check_not_float64_on_cuda(student, "fastkd::topk_divergence_forward", "student");
  const c10::cuda::CUDAGuard device_guard(student.device());
  TopKCall call = prepare_topk(
      student, teacher_index, teacher_value, row_mask, kind, inv_temperature, coef, grad_scale,
      student_grad, labels, hard_grad_scale, at::kCUDA, &empty_gradient_tensor);
  TopKDivergenceArgs& a = call.args;
  // unused by the kind; keeps log c and log(1 − c) finite
  if (kind != JSD && kind != SKEW_KL && kind != SKEW_REVERSE_KL) a.coef = 0.5;
  return run_divergence_launch(call, &topk_divergence_launch);
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("topk_divergence_forward", &fastkd::cuda::topk_divergence_forward_cuda);
}
