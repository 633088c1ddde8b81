// Fused multi-teacher (mixture) divergence forward (+ student gradient) on
// CUDA: fastkd::mixture_divergence_forward for CUDA tensors (docs/spec.md §1,
// multi-teacher). Same contract as the CPU kernel and the arithmetic of its
// double path (mixture_rows in csrc/cpu/mixture_kernel.cpp): the target p = Σ_k w_k softmax(t_k / T) is
// formed per element in log space,
//   log p = logsumexp_k((t_k − max_k)/T + log w_k − log Σ_k),
// and fed to element_terms<KIND> of csrc/common/divergence_math.h, shared
// with the CPU kernels. Teachers get no gradient.
//
// Precision: everything after the load is double, for every input dtype (the
// double instantiation of element_terms). In float, log p carries rounding
// at its own magnitude (~log V), re-added by every term of the mixture; where
// the divergence is tiny (T = 100: ~1e-4) that put the float32 loss 3× further
// from the float64 reference than PyTorch's float32 computation (see
// mixture_kernel.cpp), failing docs/spec.md §6's 2× rule. The price: per element,
// pass 1 costs K + 1 double exponentials, pass 2 K + 2 and a log (pass 3
// repeats pass 2); at ~20 fp64 instructions each, KL with K = 3 needs ~200
// fp64 operations per element against 18 (fp32) or 10 (bf16) bytes of
// traffic: on an H100 / H200 (34 TFLOPS fp64 without tensor cores) an
// estimated 1.5–3× above the memory floor (not measured yet).
//
// One thread block per row (blocks grid-stride over rows when N exceeds the
// grid), threads stride over V so that a warp's loads are coalesced (for each
// teacher too: thread j reads t_k[j] for every k); each pass ends in one
// cub::BlockReduce whose result is broadcast to the block:
//   pass 1  student: max, first index of the max and Σ exp((s − max)/T),
//           one online sweep; then per teacher k: max_k and
//           Σ_k = Σ exp((t_k − max_k)/T), one online sweep each, kept in
//           shared memory as (max_k, log w_k − log Σ_k)          read s, t
//   pass 2  log p (online over k), loss and Σu; KL writes its gradient
//           (q − p)·grad_scale/T here (Σu = −Σp = −1) and skips pass 3
//                                                                read s, t
//   pass 3  gradient (u − q Σu)·grad_scale/T          read s, t; write grad
// With labels, the student's hard-label cross-entropy at T = 1 rides along
// (docs/spec.md §1.7: hard_weight · CE + soft_weight · KD), exactly as in
// csrc/cuda/divergence.cu: row_ce = log Σ exp(s) − s_y = (max_s − s_y) +
// log Σ exp(s − max_s), written after pass 1 from one extra load of s_y; the
// gradient gets + hard_grad_scale · (softmax(s) − onehot(y)), added in double
// where the gradient is written (pass 2 for KL, pass 3 otherwise) before the
// one rounding to the input dtype. No extra read or write of a row: at T = 1
// the student's normaliser is the CE's and softmax(s) is q (not even an
// exp); at T ≠ 1 pass 1 sums exp(s − max) online too (one exp per element,
// one more block reduction), and the gradient store one exp per element.
// Memory traffic floor: read (K + 1)·N·V elements, write N·V of gradient (and
// 4·N or 8·N bytes of row loss; with labels 8·N bytes of labels read and 4·N
// or 8·N of row_ce written). Passes 2 and 3 re-read the row from L2 while
// the rows resident at once ((K + 1)·V elements each) fit in it.
//
// The teachers may have any outer strides (a permuted stack, or one teacher
// expanded over K with stride 0): they are only read.
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
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "../common/divergence_math.h"
#include "../common/mixture_op.h"
#include "block_reduce.cuh"
#include "divergence_dispatch.cuh"
#include "hard_label.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace fastkd::divergence;

// ---- device code --------------------------------------------------------------

template <class scalar_t>
__device__ __forceinline__ double load_wide(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return *p;
  } else {
    return static_cast<double>(static_cast<float>(*p));
  }
}

// Rounds to the output dtype as the CPU kernel does (double → float → dtype).
template <class scalar_t>
__device__ __forceinline__ scalar_t narrow(double x) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return x;
  } else {
    return static_cast<scalar_t>(static_cast<float>(x));
  }
}

// Online max m and d = Σ exp((x − m)/T) of a stream of logits, and the first
// index holding the max (`at`, for the student's mode). A NaN logit makes m
// and d NaN; −inf logits add nothing, also while m is still −inf (no
// −inf − (−inf)).
struct MaxSum {
  double m, d;
  int64_t at;
};

__device__ __forceinline__ void online_add(MaxSum& a, double x, int64_t j, double inv_t) {
  if (x > a.m) {
    a.d = a.d * fk_exp((a.m - x) * inv_t) + 1.0;  // a.m = −inf: exp(−inf) = 0
    a.m = x;
    a.at = j;
  } else if (x != x) {
    a.m = x;
    a.d = x;
  } else if (x != -INFINITY) {
    a.d += fk_exp((x - a.m) * inv_t);
  }
}

struct MaxSumOp {
  double inv_t;
  __device__ __forceinline__ MaxSum operator()(const MaxSum& a, const MaxSum& b) const {
    const double m = fk_max(a.m, b.m);
    if (m == -INFINITY) return {m, 0.0, a.at < b.at ? a.at : b.at};
    // NaN in either: m is NaN and so is d
    const double d = a.d * fk_exp((a.m - m) * inv_t) + b.d * fk_exp((b.m - m) * inv_t);
    const int64_t at = a.m > b.m ? a.at : (b.m > a.m ? b.at : (a.at < b.at ? a.at : b.at));
    return {m, d, at};
  }
};

// log p_j = logsumexp_k((t_k[j] − max_k)/T + off_k), online over k (one
// exponential per teacher). −inf where no teacher has mass (a weight-0
// teacher's offset is −inf); NaN in any teacher, weight 0 included, gives NaN
// (NaN − inf is NaN): docs/spec.md §6, NaN is never dropped.
template <class scalar_t>
__device__ __forceinline__ double log_mixture(const scalar_t* t, int64_t teacher_stride, int64_t K,
                                              const double* stats, double inv_t) {
  double top = -INFINITY, total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double a = (load_wide(t + k * teacher_stride) - stats[k]) * inv_t + stats[K + k];
    if (a > top) {
      total = total * fk_exp(top - a) + 1.0;
      top = a;
    } else if (a != a) {
      top = a;
      total = a;
    } else if (a != -INFINITY) {
      total += fk_exp(a - top);
    }
  }
  return top == -INFINITY ? top : top + fk_log(total);
}

// The student's row constants of the terms passes.
struct RowConstants {
  double inv_t, max_s, log_sum_s, inv_sum_s, log_p_at_mode;
};

// element_terms at one vocabulary position: terms_at of mixture_kernel.cpp.
template <int KIND, class scalar_t>
__device__ __forceinline__ ElementTerms<double> terms_at(double s, const scalar_t* t,
                                                         int64_t teacher_stride, int64_t K,
                                                         const double* stats,
                                                         const RowConstants& c,
                                                         const Coefficient<double>& coef) {
  const double a_s = (s - c.max_s) * c.inv_t;
  const double log_p = log_mixture(t, teacher_stride, K, stats, c.inv_t);
  ElementInputs<double> x;
  // in double, where log p − log q needs no special care
  x.log_ratio = log_p - (a_s - c.log_sum_s);
  x.q = fk_exp(a_s) * c.inv_sum_s;
  x.p = fk_exp(log_p);
  // log(q/p) minus its value at the student's mode (where a_s = 0), which
  // REVERSE_KL's u reads (divergence_math.h): log Σ_s cancels exactly.
  x.shifted_ratio_q = a_s - (log_p - c.log_p_at_mode);
  x.shifted_ratio_p = 0.0;  // teacher gradient only: never read here
  return element_terms<KIND>(x, coef);
}

// WITH_CE: labels given (labels and row_ce non-null); see the launcher for
// why a template parameter rather than a runtime flag.
template <int KIND, int BLOCK, class scalar_t, class loss_t, bool WITH_CE>
__global__ void __launch_bounds__(BLOCK) _mixture_fwd_kernel(
    const scalar_t* __restrict__ student,  // [N, V] logits, row stride student_row_stride
    const scalar_t* __restrict__ teacher,  // [K, N, V], strides (teacher_stride, teacher_row_stride,
                                           // 1); any outer strides, 0 included
    int64_t student_row_stride, int64_t teacher_stride, int64_t teacher_row_stride,
    const double* __restrict__ log_weights,  // [K] log w_k (−inf for weight 0)
    int64_t K,
    const bool* __restrict__ row_mask,     // [N] or nullptr
    loss_t* __restrict__ row_loss,         // [N]
    scalar_t* __restrict__ student_grad,   // [N, V] contiguous, or nullptr
    const int64_t* __restrict__ labels,    // [N] hard labels if WITH_CE (else unused)
    loss_t* __restrict__ row_ce,           // [N] if WITH_CE (else unused)
    double hard_grad_scale,                // the cross-entropy's gradient factor
    int64_t rows, int64_t V, double inv_temperature,
    double grad_factor,                    // grad_scale / T
    Coefficient<double> coef) {
  static_assert(BLOCK % 32 == 0, "block size must be a whole number of warps");
  using ReduceMax = cub::BlockReduce<MaxSum, BLOCK>;
  using Reduce2 = cub::BlockReduce<double2, BLOCK>;
  __shared__ union {
    typename ReduceMax::TempStorage max;
    typename Reduce2::TempStorage pair;
  } temp;
  __shared__ MaxSum max_result;
  __shared__ double2 pair_result;
  // [2K]: max_k, then log w_k − log Σ_k, of the current row
  extern __shared__ double teacher_stats[];

  const bool want_grad = student_grad != nullptr;
  // KL: Σu = −Σp = −1 (the weights are normalised by the op), so the
  // gradient is known in pass 2 and pass 3 is skipped.
  const bool fused_grad = KIND == KL && want_grad;
  // REVERSE_KL's u reads log(q/p) shifted by its value at the student's mode.
  const bool need_mode = KIND == REVERSE_KL && want_grad;
  const MaxSumOp max_sum{inv_temperature};
  // The cross-entropy is at temperature 1: when T is 1 as well, the
  // student's normaliser and q serve it, otherwise pass 1 sums exp(s − max)
  // too. Uniform over the grid.
  const bool unit_t = inv_temperature == 1.0;
  const bool sum_ce = WITH_CE && !unit_t;
  const int64_t first = threadIdx.x;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    scalar_t* g = want_grad ? student_grad + row * V : nullptr;
    // Every thread of the block reads the same mask entry: the branch is
    // uniform, so no thread skips the barriers below.
    if (row_mask != nullptr && !row_mask[row]) {
      if (threadIdx.x == 0) {
        row_loss[row] = loss_t(0);
        if constexpr (WITH_CE) row_ce[row] = loss_t(0);
      }
      if (want_grad) {
        for (int64_t j = first; j < V; j += BLOCK) g[j] = narrow<scalar_t>(0.0);
      }
      continue;
    }
    const scalar_t* s = student + row * student_row_stride;
    const scalar_t* t = teacher + row * teacher_row_stride;

    // pass 1, student (with labels at T ≠ 1 also Σ exp(s − max) at T = 1,
    // online: the max is the same at every T). An all −inf (or NaN) row has
    // a NaN loss (no distribution).
    MaxSum st{-INFINITY, 0.0, V};
    MaxSum ce{-INFINITY, 0.0, V};
    for (int64_t j = first; j < V; j += BLOCK) {
      const double sj = load_wide(s + j);
      online_add(st, sj, j, inv_temperature);
      if (sum_ce) online_add(ce, sj, j, 1.0);
    }
    st = block_all_reduce<BLOCK>(st, max_sum, temp.max, max_result);
    // sum_ce is uniform over the block: every thread takes this reduction or none does
    if (sum_ce) ce = block_all_reduce<BLOCK>(ce, MaxSumOp{1.0}, temp.max, max_result);
    RowConstants c;
    c.inv_t = inv_temperature;
    c.max_s = st.m;
    c.log_sum_s = fk_log(st.d);
    c.inv_sum_s = 1.0 / st.d;
    HardLabel<double> h{0, 0.0, 0.0};
    if constexpr (WITH_CE) {
      // Every thread reads the same label; s_y is loaded (by thread 0 only)
      // for a label in [0, V) alone, so an out-of-range label reads nothing
      // out of bounds: row_ce is then NaN. ce.m == max_s (the same logits).
      h.y = labels[row];
      const bool in_range = h.y >= 0 && h.y < V;
      h.log_sum = unit_t ? c.log_sum_s : fk_log(ce.d);
      h.scale = in_range ? hard_grad_scale : static_cast<double>(NAN);
      if (threadIdx.x == 0) {
        row_ce[row] = static_cast<loss_t>(in_range ? (c.max_s - load_wide(s + h.y)) + h.log_sum
                                                   : static_cast<double>(NAN));
      }
    }

    // pass 1, teachers, one at a time. A weight-0 teacher is still read: its
    // offset is −inf, so it adds nothing but NaN (docs/spec.md §6). The barriers of
    // the reductions order these shared writes after every read of the
    // previous row's stats.
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* tk = t + k * teacher_stride;
      MaxSum tt{-INFINITY, 0.0, V};
      for (int64_t j = first; j < V; j += BLOCK) {
        online_add(tt, load_wide(tk + j), j, inv_temperature);
      }
      tt = block_all_reduce<BLOCK>(tt, max_sum, temp.max, max_result);
      if (threadIdx.x == 0) {
        teacher_stats[k] = tt.m;
        teacher_stats[K + k] = log_weights[k] - fk_log(tt.d);
      }
    }
    __syncthreads();  // the stats, for every thread
    // log p at the student's mode; index 0 for a row without a maximum (NaN:
    // its loss is NaN anyway), as on CPU. Every thread computes it.
    const int64_t mode = st.at < V ? st.at : 0;
    c.log_p_at_mode =
        need_mode ? log_mixture(t + mode, teacher_stride, K, teacher_stats, c.inv_t) : 0.0;

    // pass 2: ℓ = Σ loss terms and Σu
    double2 acc = make_double2(0.0, 0.0);
    for (int64_t j = first; j < V; j += BLOCK) {
      const double sj = load_wide(s + j);
      const ElementTerms<double> e = terms_at<KIND>(sj, t + j, teacher_stride, K, teacher_stats, c, coef);
      acc.x += e.loss;
      if (fused_grad) {
        double gj = softmax_grad(e.u, e.q, -1.0, grad_factor);
        if constexpr (WITH_CE) gj += hard_label_grad(sj, j, e.q, c.max_s, unit_t, h);
        g[j] = narrow<scalar_t>(gj);
      } else if (want_grad) {
        acc.y += e.u;
      }
    }
    acc = block_all_reduce<BLOCK>(acc, SumOp2{}, temp.pair, pair_result);
    // a divergence is never negative (rounding of a tiny one); NaN stays NaN
    if (threadIdx.x == 0) row_loss[row] = static_cast<loss_t>(acc.x < 0.0 ? 0.0 : acc.x);
    if (fused_grad || !want_grad) continue;

    // pass 3: dℓ/ds = (u − q Σu)/T, times grad_scale, plus the
    // cross-entropy's hard_grad_scale · (softmax − onehot)
    const double sum_u = acc.y;
    for (int64_t j = first; j < V; j += BLOCK) {
      const double sj = load_wide(s + j);
      const ElementTerms<double> e = terms_at<KIND>(sj, t + j, teacher_stride, K, teacher_stats, c, coef);
      double gj = softmax_grad(e.u, e.q, sum_u, grad_factor);
      if constexpr (WITH_CE) gj += hard_label_grad(sj, j, e.q, c.max_s, unit_t, h);
      g[j] = narrow<scalar_t>(gj);
    }
  }
}

// log w_k − log Σw from weights in device memory, for a GPU teacher_weights
// that the op does not read on the host (a read would synchronise with the
// device on every step): one block sums the K weights and counts the invalid
// ones (not finite, or negative); if any is invalid or the sum is more than
// `tolerance` from 1, every log weight is NaN, so log p, every row's loss
// and the gradient are NaN (docs/spec.md §6). Otherwise the same values as
// the host path (−inf for a weight 0), up to the order of the sum.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) _log_weights_kernel(const double* __restrict__ weights,
                                                             int64_t K, double tolerance,
                                                             double* __restrict__ log_weights) {
  using Reduce2 = cub::BlockReduce<double2, BLOCK>;
  __shared__ typename Reduce2::TempStorage temp;
  __shared__ double2 result;
  // x: Σw, y: how many weights are invalid
  double2 acc = make_double2(0.0, 0.0);
  for (int64_t k = threadIdx.x; k < K; k += BLOCK) {
    const double w = weights[k];
    acc.x += w;
    if (!(isfinite(w) && w >= 0.0)) acc.y += 1.0;
  }
  acc = block_all_reduce<BLOCK>(acc, SumOp2{}, temp, result);
  // a NaN sum fails the comparison too
  const bool valid = acc.y == 0.0 && fabs(acc.x - 1.0) <= tolerance;
  const double log_sum = fk_log(acc.x);
  for (int64_t k = threadIdx.x; k < K; k += BLOCK) {
    const double w = weights[k];
    log_weights[k] = !valid ? static_cast<double>(NAN) : (w > 0.0 ? fk_log(w) - log_sum : -INFINITY);
  }
}

// ---- launcher -----------------------------------------------------------------

// Rows beyond this many blocks are grid-strided: far more blocks than can be
// resident on any GPU, and well inside gridDim.x's limit.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// The teachers' row stats live in shared memory, 16 bytes per teacher: up to
// 2048 teachers fit in the 48 KiB every GPU grants without opting in.
constexpr int64_t kMaxTeachers = 2048;
// Threads of the one block of _log_weights_kernel (K <= kMaxTeachers weights).
constexpr int kLogWeightsBlock = 256;

template <int KIND, int BLOCK, class scalar_t, class loss_t>
void launch(const MixtureDivergenceArgs& a, cudaStream_t stream) {
  Coefficient<double> coef;
  coef.c = a.coef;
  coef.one_minus_c = 1.0 - a.coef;
  coef.log_c = std::log(a.coef);
  coef.log_one_minus_c = std::log1p(-a.coef);
  const unsigned grid = static_cast<unsigned>(std::min(a.rows, kMaxBlocks));
  const size_t shared = static_cast<size_t>(2 * a.teachers) * sizeof(double);
  // The cross-entropy is a template parameter, not a runtime flag, as in
  // csrc/cuda/divergence.cu: the label-free kernels compile exactly as
  // before (no label state, no third sum), for twice the instantiations.
  const auto kernel = a.labels != nullptr ? _mixture_fwd_kernel<KIND, BLOCK, scalar_t, loss_t, true>
                                          : _mixture_fwd_kernel<KIND, BLOCK, scalar_t, loss_t, false>;
  kernel<<<grid, BLOCK, shared, stream>>>(
      static_cast<const scalar_t*>(a.student), static_cast<const scalar_t*>(a.teacher),
      a.student_row_stride, a.teacher_stride, a.teacher_row_stride, a.log_weights, a.teachers,
      a.row_mask, static_cast<loss_t*>(a.row_loss), static_cast<scalar_t*>(a.student_grad), a.labels,
      static_cast<loss_t*>(a.row_ce), a.hard_grad_scale, a.rows, a.vocab, a.inv_temperature,
      a.grad_scale * a.inv_temperature, coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Short rows (classification heads, V ≤ 2048) get 128 threads so that most
// have work; vocabulary-sized rows 256 (double math: about twice the
// registers per element of the float32 single-teacher kernel, half its 512).
// ptxas (sm_90, nvcc 13.0) reports 48–64 registers per thread; 12 of the 48
// label-free instantiations spill 4–12 bytes (the same with and without the
// WITH_CE parameter), 16 of the 48 with labels 8–48 bytes (56–64 registers).
template <int KIND, class scalar_t, class loss_t>
void launch_for_vocab(const MixtureDivergenceArgs& a, cudaStream_t stream) {
  if (a.vocab <= 2048) {
    launch<KIND, 128, scalar_t, loss_t>(a, stream);
  } else {
    launch<KIND, 256, scalar_t, loss_t>(a, stream);
  }
}

void mixture_divergence_launch(const MixtureDivergenceArgs& a, cudaStream_t stream) {
  dispatch_kind<KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD>(
      a.kind, "fastkd::mixture_divergence_forward: unknown kind ", [&]<int KIND>() {
        switch (a.dtype) {
          case DType::Float32: return launch_for_vocab<KIND, float, float>(a, stream);
          case DType::Float64: return launch_for_vocab<KIND, double, double>(a, stream);
          case DType::BFloat16: return launch_for_vocab<KIND, c10::BFloat16, float>(a, stream);
          case DType::Float16: return launch_for_vocab<KIND, c10::Half, float>(a, stream);
        }
        TORCH_CHECK(false, "fastkd::mixture_divergence_forward on CUDA: unknown dtype");
      });
}

// ---- the op -------------------------------------------------------------------

// The checks of csrc/common/mixture_op.h, on CUDA tensors; the weights
// may be on the CPU (a sequence or CPU tensor passed to fastkd.divergence:
// their values are checked on the host) or on the student's GPU (their
// values are guarded on the device, see _log_weights_kernel: no host
// synchronisation). No range check of the labels here (it would synchronise
// with the device): the Python layer checks them, and the kernel guards
// itself (see HardLabel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_divergence_forward_cuda(
    const at::Tensor& student, const at::Tensor& teachers, const at::Tensor& teacher_weights,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature, double coef,
    double grad_scale, bool student_grad, const std::optional<at::Tensor>& labels,
    double hard_grad_scale) {
  CHECK_DEVICE_TYPE(student, at::kCUDA);
  CHECK_DIM(teachers, 3);
  TORCH_CHECK(teachers.size(0) <= kMaxTeachers,
              "fastkd::mixture_divergence_forward on CUDA takes at most ", kMaxTeachers,
              " teachers, got ", teachers.size(0));
  const c10::cuda::CUDAGuard device_guard(student.device());
  MixtureCall call = prepare_mixture(student, teachers, teacher_weights, row_mask, kind,
                                     inv_temperature, coef, grad_scale, student_grad, labels,
                                     hard_grad_scale, at::kCUDA, &empty_gradient_tensor);
  MixtureDivergenceArgs& a = call.args;
  if (a.rows == 0) return call.outputs();

  // log w_k − log Σw (p sums to 1 exactly, as the reference's softmax of
  // T·log p does, which the fused KL gradient relies on), on the current
  // stream without waiting for the device: from host weights computed here
  // and copied from pinned memory asynchronously; from GPU weights by
  // _log_weights_kernel, which also guards their values.
  const int64_t count = a.teachers;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor log_weights;
  if (call.weights_on_host) {
    at::Tensor log_weights_host =
        at::empty({count}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
    double* lw = log_weights_host.data_ptr<double>();
    const double log_sum = std::log(call.weight_sum);
    for (int64_t k = 0; k < count; ++k) {
      const double w = call.weights[k];
      lw[k] = w > 0 ? std::log(w) - log_sum : -std::numeric_limits<double>::infinity();
    }
    log_weights = log_weights_host.to(
        at::TensorOptions().device(student.device()).dtype(at::kDouble), /*non_blocking=*/true);
  } else {
    const at::Tensor weights = teacher_weights.contiguous();
    log_weights = at::empty({count}, weights.options());
    _log_weights_kernel<kLogWeightsBlock><<<1, kLogWeightsBlock, 0, stream>>>(
        weights.data_ptr<double>(), count, kWeightSumTolerance, log_weights.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  a.log_weights = log_weights.data_ptr<double>();
  return run_divergence_launch(call, &mixture_divergence_launch);
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("mixture_divergence_forward", &fastkd::cuda::mixture_divergence_forward_cuda);
}
