// Hidden-state distillation on CUDA: fastkd::hidden_state_forward for CUDA
// tensors (docs/spec.md §5.4, TinyBERT's MSE and DistilBERT's cosine loss).
// Same contract as the CPU op (csrc/cpu/hidden_state.cpp) and the formulas of
// csrc/common/hidden_state_op.h, evaluated in float32 for float32, bfloat16
// and float16 inputs (float64 is refused: nothing here accumulates in double).
//
// One thread block per row (blocks grid-stride over rows when N exceeds the
// grid), threads stride over D so that a warp's loads are coalesced. Rows of
// up to BLOCK · kPerThread features are held in registers: h and g are read
// once, the three sums (h·g or Σ(h − g)², h·h, g·g) merged across the block
// by one cub::BlockReduce, and the gradients written from the registers.
// Wider rows are streamed: the sums in a first pass, the gradients in a
// second that re-reads the row (from L2).
// Memory traffic floor: read 2·N·D elements, write N·D per requested gradient
// (and 4·N bytes of row loss). Excluded rows are not read: loss 0, zero
// gradients.
//
// Layout: the device code and a raw-pointer launcher (no at::Tensor) first,
// then the op (checks, outputs, device guard, stream) and its registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../common/hidden_state_op.h"
#include "block_reduce.cuh"
#include "float_dispatch.cuh"

namespace fastkd {
namespace cuda {
namespace {

// Features per thread held in registers on the cached path.
constexpr int kPerThread = 8;

// ---- device code --------------------------------------------------------------

// The kernel's view of one call: raw pointers and scalars, no at::Tensor.
struct HiddenStateArgs {
  const void* student;  // [N, D], row stride student_row_stride, unit stride along D
  const void* teacher;  // [N, D], row stride teacher_row_stride, unit stride along D
  int64_t student_row_stride, teacher_row_stride;
  const bool* row_mask;  // [N] or nullptr (every row kept)
  float* row_loss;       // [N]
  void* grad_student;    // [N, D] contiguous, or nullptr when not requested
  void* grad_teacher;    // [N, D] contiguous, or nullptr when not requested
  int64_t rows, dim;
  bool cosine;
  double grad_scale;
};

// The row's loss and the gradient coefficients from its three sums. Cosine:
// grad_h = self_h·h + cross·g, grad_g = self_g·g + cross·h. MSE: grad_h =
// self_h·(h − g) = −grad_g, the difference taken first (exact for close h and
// g, where self_h·h − self_h·g would cancel).
struct RowResult {
  float loss, self_h, self_g, cross;
  bool cosine;
};

__device__ __forceinline__ RowResult row_result(float3 sums, bool cosine, float dim, float grad_scale) {
  RowResult r;
  r.cosine = cosine;
  if (cosine) {
    const float eps = static_cast<float>(hidden_state::kCosineEps);
    const float norm_h = sums.y + eps, norm_g = sums.z + eps;
    // as the reference: the square root of the product of the guarded norms
    const float denom = sqrtf(norm_h * norm_g);
    const float cosine_value = sums.x / denom;
    r.loss = 1.f - cosine_value;
    r.self_h = grad_scale * cosine_value / norm_h;
    r.self_g = grad_scale * cosine_value / norm_g;
    r.cross = -(grad_scale / denom);
  } else {
    // sums.x = Σ (h − g)²; dℓ/dh = 2 (h − g) / D, dℓ/dg = −dℓ/dh
    r.loss = sums.x / dim;
    r.self_h = 2.f * grad_scale / dim;
    r.self_g = 0.f;
    r.cross = 0.f;
  }
  return r;
}

// Adds one element pair to the thread's sums.
__device__ __forceinline__ void accumulate(float3& sums, float h, float g, bool cosine) {
  if (cosine) {
    sums.x += h * g;
    sums.y += h * h;
    sums.z += g * g;
  } else {
    const float d = h - g;
    sums.x += d * d;
  }
}

template <class scalar_t>
__device__ __forceinline__ void store_grads(const HiddenStateArgs& a, int64_t row, int64_t j, float h,
                                            float g, const RowResult& r) {
  float grad_h, grad_g;
  if (r.cosine) {
    grad_h = r.self_h * h + r.cross * g;
    grad_g = r.self_g * g + r.cross * h;
  } else {
    grad_h = r.self_h * (h - g);
    grad_g = -grad_h;
  }
  const int64_t at = row * a.dim + j;
  if (a.grad_student != nullptr) static_cast<scalar_t*>(a.grad_student)[at] = static_cast<scalar_t>(grad_h);
  if (a.grad_teacher != nullptr) static_cast<scalar_t*>(a.grad_teacher)[at] = static_cast<scalar_t>(grad_g);
}

template <int BLOCK, bool CACHED, class scalar_t>
__global__ void __launch_bounds__(BLOCK) hidden_state_fwd_kernel(const HiddenStateArgs a) {
  static_assert(BLOCK % 32 == 0, "block size must be a whole number of warps");
  __shared__ typename cub::BlockReduce<float3, BLOCK>::TempStorage temp;
  __shared__ float3 reduced;
  const float dim = static_cast<float>(a.dim);
  const float grad_scale = static_cast<float>(a.grad_scale);
  const scalar_t zero = static_cast<scalar_t>(0.f);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    // every thread reads the same flag: the branch is uniform across the block
    if (a.row_mask != nullptr && !a.row_mask[row]) {
      for (int64_t j = threadIdx.x; j < a.dim; j += BLOCK) {
        if (a.grad_student != nullptr) static_cast<scalar_t*>(a.grad_student)[row * a.dim + j] = zero;
        if (a.grad_teacher != nullptr) static_cast<scalar_t*>(a.grad_teacher)[row * a.dim + j] = zero;
      }
      if (threadIdx.x == 0) a.row_loss[row] = 0.f;
      continue;
    }
    const scalar_t* h_row = static_cast<const scalar_t*>(a.student) + row * a.student_row_stride;
    const scalar_t* g_row = static_cast<const scalar_t*>(a.teacher) + row * a.teacher_row_stride;
    float3 sums = make_float3(0.f, 0.f, 0.f);
    float h_cached[CACHED ? kPerThread : 1];
    float g_cached[CACHED ? kPerThread : 1];
    if constexpr (CACHED) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int64_t j = threadIdx.x + static_cast<int64_t>(k) * BLOCK;
        h_cached[k] = j < a.dim ? static_cast<float>(h_row[j]) : 0.f;
        g_cached[k] = j < a.dim ? static_cast<float>(g_row[j]) : 0.f;
        accumulate(sums, h_cached[k], g_cached[k], a.cosine);
      }
    } else {
      for (int64_t j = threadIdx.x; j < a.dim; j += BLOCK) {
        accumulate(sums, static_cast<float>(h_row[j]), static_cast<float>(g_row[j]), a.cosine);
      }
    }
    sums = block_all_reduce<BLOCK>(sums, SumOp3{}, temp, reduced);
    const RowResult r = row_result(sums, a.cosine, dim, grad_scale);
    if (threadIdx.x == 0) a.row_loss[row] = r.loss;
    if (a.grad_student == nullptr && a.grad_teacher == nullptr) continue;
    if constexpr (CACHED) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int64_t j = threadIdx.x + static_cast<int64_t>(k) * BLOCK;
        if (j < a.dim) store_grads<scalar_t>(a, row, j, h_cached[k], g_cached[k], r);
      }
    } else {
      for (int64_t j = threadIdx.x; j < a.dim; j += BLOCK) {
        store_grads<scalar_t>(a, row, j, static_cast<float>(h_row[j]), static_cast<float>(g_row[j]), r);
      }
    }
  }
}

// ---- launcher -----------------------------------------------------------------

// Rows beyond this many blocks are grid-strided: far more blocks than can be
// resident on any GPU, and well inside gridDim.x's limit.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

template <int BLOCK, bool CACHED, class scalar_t>
void launch(const HiddenStateArgs& a, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(a.rows, kMaxBlocks));
  hidden_state_fwd_kernel<BLOCK, CACHED, scalar_t><<<grid, BLOCK, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fewest threads (at least two warps) that hold the row in registers at
// kPerThread features each; rows wider than 512 · kPerThread are streamed by 512.
template <class scalar_t>
void launch_for_width(const HiddenStateArgs& a, cudaStream_t stream) {
  if (a.dim <= 64 * kPerThread) return launch<64, true, scalar_t>(a, stream);
  if (a.dim <= 128 * kPerThread) return launch<128, true, scalar_t>(a, stream);
  if (a.dim <= 256 * kPerThread) return launch<256, true, scalar_t>(a, stream);
  if (a.dim <= 512 * kPerThread) return launch<512, true, scalar_t>(a, stream);
  launch<512, false, scalar_t>(a, stream);
}

// ---- the op -------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> hidden_state_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& row_mask,
    int64_t kind, double grad_scale, bool student_grad, bool teacher_grad) {
  hidden_state::check_args(student, teacher, row_mask, kind, grad_scale, at::kCUDA);
  check_not_float64_on_cuda(student, "fastkd::hidden_state_forward", "student and teacher");
  const c10::cuda::CUDAGuard device_guard(student.device());
  const int64_t rows = student.size(0), dim = student.size(1);
  const at::Tensor mask = row_mask.has_value() ? row_mask->contiguous() : at::Tensor();
  at::Tensor row_loss = at::empty({rows}, student.options().dtype(at::kFloat));
  at::Tensor grad_s = at::empty({student_grad ? rows : 0, student_grad ? dim : 0}, student.options());
  at::Tensor grad_t = at::empty({teacher_grad ? rows : 0, teacher_grad ? dim : 0}, teacher.options());
  if (rows == 0) return {row_loss, grad_s, grad_t};
  HiddenStateArgs a;
  a.student = student.const_data_ptr();
  a.teacher = teacher.const_data_ptr();
  a.student_row_stride = student.stride(0);
  a.teacher_row_stride = teacher.stride(0);
  a.row_mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  a.row_loss = row_loss.mutable_data_ptr<float>();
  a.grad_student = student_grad ? grad_s.mutable_data_ptr() : nullptr;
  a.grad_teacher = teacher_grad ? grad_t.mutable_data_ptr() : nullptr;
  a.rows = rows;
  a.dim = dim;
  a.cosine = kind == static_cast<int64_t>(hidden_state::HiddenStateKind::kCosine);
  a.grad_scale = grad_scale;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype(student.scalar_type(), "fastkd::hidden_state_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_for_width<scalar_t>(a, stream);
  });
  return {row_loss, grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("hidden_state_forward", &fastkd::cuda::hidden_state_forward_cuda);
}
