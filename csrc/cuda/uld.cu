// Universal Logit Distillation on CUDA: fastkd::uld_forward for CUDA tensors
// (docs/spec.md §1.14). Same contract as the CPU op (csrc/cpu/uld.cpp): row
// losses Σ_k |sort↓(p)_k − sort↓(q)_k| (the shorter sorted row zero-padded)
// and, if asked for, the gradients times grad_scale, in one call. float32
// arithmetic for float32, bfloat16 and float16 inputs (float64 is refused).
//
// Rows are processed in chunks of R rows whose scratch (the packed keys of
// both models' rows, twice for the sort, and the per-entry sign
// coefficients) stays within kScratchEntries entries: the sorted rows exist
// for one chunk at a time and are never returned or kept for a backward.
//   1. _uld_keys_kernel (one block per row): max and Σ exp((x − max)/T) of
//      both rows (cub::BlockReduce), then one uint64 key per entry,
//      (float bits of p_j) << 32 | j: the bits of a probability ≥ 0 order like
//      its value, so sorting keys sorts values and carries the column.
//   2. cub::DeviceSegmentedRadixSort::SortKeysDescending, one segment per row
//      of either model.
//   3. _uld_rows_kernel (one block per row): ℓ = Σ_k |a_k − b_k| over the
//      padded width, and per sorted entry the mean over its run of equal
//      values of σ_k = sign(a_k − b_k) (sign(0) = 0; the thread at a run's
//      first entry walks the run), written to the entry's column; the
//      teacher's with −σ over the runs of b. Σ p g per row (block reduce;
//      equal to Σ_k a_k σ_k, the run means preserve run sums). Entries with
//      p = 0 get coefficient 0: the softmax Jacobian multiplies them by 0.
//   4. _uld_grad_kernel (one block per row): grad_j = grad_scale / T ·
//      p_j (g_j − Σ p g), p_j recomputed from the logits and the row's max
//      and sum; 0 on excluded rows, NaN on rows with a NaN probability.
// A side given as log-probabilities (student_is_logprob / teacher_is_logprob)
// is used as given: p_j = exp(x_j) (its max taken as 0 and its sum as 1, the
// temperature is 1), and grad_j = grad_scale · p_j g_j, without the softmax
// centring. Its exp can overflow: an infinite probability makes the row NaN.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/uld_op.h"
#include "block_reduce.cuh"
#include "float_dispatch.cuh"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kBlock = 256;
// Entries of one chunk's scratch: keys in and out (8 B each) and the
// coefficients (4 B) of both models' rows, 20 B per entry: 320 MiB.
constexpr int64_t kScratchEntries = int64_t(1) << 24;

// ---- device code --------------------------------------------------------------

// max that propagates NaN from either side (fmaxf drops it).
__device__ __forceinline__ float max_nan(float a, float b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

struct MaxNanOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return max_nan(a, b); }
};

__device__ __forceinline__ float key_value(uint64_t key) {
  return __uint_as_float(static_cast<uint32_t>(key >> 32));
}

__device__ __forceinline__ int32_t key_column(uint64_t key) {
  return static_cast<int32_t>(key & 0xFFFFFFFFull);
}

__device__ __forceinline__ float sign_of(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f); }

// Row max and Σ exp((x − max)/T) of one row, to every thread of the block.
template <class scalar_t>
__device__ void row_max_sum(const scalar_t* x, int64_t n, float inv_t,
                            typename cub::BlockReduce<float, kBlock>::TempStorage& temp, float& result,
                            float& m, float& sum) {
  float local = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += kBlock) local = max_nan(local, static_cast<float>(x[j]));
  m = block_all_reduce<kBlock>(local, MaxNanOp{}, temp, result);
  float part = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += kBlock) part += expf((static_cast<float>(x[j]) - m) * inv_t);
  sum = block_all_reduce<kBlock>(part, SumOp{}, temp, result);
}

// Writes the keys of one row; returns (to every thread) whether a probability
// is NaN or infinite. A log-probability row is exp(x) as given: max 0, sum 1.
template <class scalar_t>
__device__ bool row_keys(const scalar_t* x, int64_t n, float inv_t, bool is_logprob, uint64_t* keys, float* stats,
                         typename cub::BlockReduce<float, kBlock>::TempStorage& temp, float& result) {
  float m = 0.f, sum = 1.f;
  if (!is_logprob) row_max_sum(x, n, inv_t, temp, result, m, sum);
  float nan_seen = 0.f;
  for (int64_t j = threadIdx.x; j < n; j += kBlock) {
    const float p = expf((static_cast<float>(x[j]) - m) * inv_t) / sum;
    if (p != p || isinf(p)) nan_seen = 1.f;
    keys[j] = (static_cast<uint64_t>(__float_as_uint(p)) << 32) | static_cast<uint64_t>(j);
  }
  const bool row_nan = block_all_reduce<kBlock>(nan_seen, MaxNanOp{}, temp, result) > 0.f;
  if (threadIdx.x == 0) {
    stats[0] = m;
    stats[1] = sum;
  }
  return row_nan;
}

// stats per row of the chunk: [m_s, Σ_s, m_t, Σ_t, Σ p g, Σ q h, NaN flag, kept flag]
constexpr int kStats = 8;

template <class scalar_t>
__global__ void __launch_bounds__(kBlock) _uld_keys_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,  // chunk's first rows
    int64_t s_stride, int64_t t_stride, const bool* __restrict__ row_mask,       // chunk's mask or nullptr
    int64_t Vs, int64_t Vt, float inv_ts, float inv_tt, bool student_is_logprob, bool teacher_is_logprob,
    uint64_t* __restrict__ keys_s, uint64_t* __restrict__ keys_t, float* __restrict__ stats) {
  __shared__ typename cub::BlockReduce<float, kBlock>::TempStorage temp;
  __shared__ float result;
  const int64_t row = blockIdx.x;
  float* st = stats + row * kStats;
  const bool kept = row_mask == nullptr || row_mask[row];
  if (!kept) {
    // sorted like any row, never read
    for (int64_t j = threadIdx.x; j < Vs; j += kBlock) keys_s[row * Vs + j] = 0;
    for (int64_t j = threadIdx.x; j < Vt; j += kBlock) keys_t[row * Vt + j] = 0;
    if (threadIdx.x == 0) {
      st[6] = 0.f;
      st[7] = 0.f;
    }
    return;
  }
  const bool nan_s =
      row_keys(student + row * s_stride, Vs, inv_ts, student_is_logprob, keys_s + row * Vs, st, temp, result);
  const bool nan_t =
      row_keys(teacher + row * t_stride, Vt, inv_tt, teacher_is_logprob, keys_t + row * Vt, st + 2, temp, result);
  if (threadIdx.x == 0) {
    st[6] = (nan_s || nan_t) ? 1.f : 0.f;
    st[7] = 1.f;
  }
}

// Run means of the signs of one model's sorted row (`self`, n entries) against
// the other's (`other`, n_other entries), written to coef[column]; returns
// (to every thread) Σ_k self_k σ_k.
__device__ float run_means(const uint64_t* self, int64_t n, const uint64_t* other, int64_t n_other, float* coef,
                           typename cub::BlockReduce<float, kBlock>::TempStorage& temp, float& result) {
  float dot = 0.f;
  for (int64_t k = threadIdx.x; k < n; k += kBlock) {
    const float v = key_value(self[k]);
    const float b = k < n_other ? key_value(other[k]) : 0.f;
    dot += v * sign_of(v - b);
    if (v == 0.f) {
      coef[key_column(self[k])] = 0.f;
      continue;
    }
    if (k > 0 && key_value(self[k - 1]) == v) continue;  // not the first entry of its run
    float total = 0.f;
    int64_t end = k;
    for (; end < n && key_value(self[end]) == v; ++end) {
      total += sign_of(v - (end < n_other ? key_value(other[end]) : 0.f));
    }
    const float mean = total / static_cast<float>(end - k);
    for (int64_t e = k; e < end; ++e) coef[key_column(self[e])] = mean;
  }
  return block_all_reduce<kBlock>(dot, SumOp{}, temp, result);
}

__global__ void __launch_bounds__(kBlock) _uld_rows_kernel(
    const uint64_t* __restrict__ sorted_s, const uint64_t* __restrict__ sorted_t, int64_t Vs, int64_t Vt,
    float* __restrict__ stats, float* __restrict__ row_loss,  // chunk's row losses
    float* __restrict__ coef_s, float* __restrict__ coef_t, bool student_grad, bool teacher_grad) {
  __shared__ typename cub::BlockReduce<float, kBlock>::TempStorage temp;
  __shared__ float result;
  const int64_t row = blockIdx.x;
  float* st = stats + row * kStats;
  if (st[7] == 0.f) {  // excluded row
    if (threadIdx.x == 0) row_loss[row] = 0.f;
    return;
  }
  const uint64_t* a = sorted_s + row * Vs;
  const uint64_t* b = sorted_t + row * Vt;
  const int64_t width = Vs > Vt ? Vs : Vt;
  float part = 0.f;
  for (int64_t k = threadIdx.x; k < width; k += kBlock) {
    const float ak = k < Vs ? key_value(a[k]) : 0.f;
    const float bk = k < Vt ? key_value(b[k]) : 0.f;
    part += fabsf(ak - bk);
  }
  const float loss = block_all_reduce<kBlock>(part, SumOp{}, temp, result);
  const bool row_nan = st[6] != 0.f;
  if (threadIdx.x == 0) row_loss[row] = row_nan ? NAN : loss;
  if (row_nan) return;
  if (student_grad) {
    const float dot = run_means(a, Vs, b, Vt, coef_s + row * Vs, temp, result);
    if (threadIdx.x == 0) st[4] = dot;
  }
  if (teacher_grad) {
    // σ of b against a is −σ of a against b: run_means(b, a) computes sign(b − a) itself
    const float dot = run_means(b, Vt, a, Vs, coef_t + row * Vt, temp, result);
    if (threadIdx.x == 0) st[5] = dot;
  }
}

template <class scalar_t>
__global__ void __launch_bounds__(kBlock) _uld_grad_kernel(
    const scalar_t* __restrict__ x, int64_t stride, int64_t n, float inv_t, float scale,  // scale: grad_scale / T
    bool centred,  // false for log-probabilities: no softmax Jacobian
    const float* __restrict__ stats, int stat_offset,  // 0 for the student, 2 for the teacher
    const float* __restrict__ coef, scalar_t* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const float* st = stats + row * kStats;
  scalar_t* g = grad + row * n;
  const bool kept = st[7] != 0.f, row_nan = st[6] != 0.f;
  const float m = st[stat_offset], sum = st[stat_offset + 1];
  const float dot = centred ? st[4 + stat_offset / 2] : 0.f;
  for (int64_t j = threadIdx.x; j < n; j += kBlock) {
    float value = 0.f;
    if (kept) {
      const float p = expf((static_cast<float>(x[row * stride + j]) - m) * inv_t) / sum;
      value = row_nan ? NAN : scale * p * (coef[row * n + j] - dot);
    }
    g[j] = static_cast<scalar_t>(value);
  }
}

// ---- launcher -----------------------------------------------------------------

template <class scalar_t>
void uld_launch(const at::Tensor& s, const at::Tensor& t, const bool* mask, double inv_ts, double inv_tt,
                double grad_scale, bool student_is_logprob, bool teacher_is_logprob, at::Tensor& row_loss,
                at::Tensor* grad_s, at::Tensor* grad_t) {
  const int64_t rows = s.size(0), vs = s.size(1), vt = t.size(1);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(rows, kScratchEntries / (vs + vt)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto byte_options = s.options().dtype(at::kByte);
  const auto float_options = s.options().dtype(at::kFloat);
  at::Tensor keys_in = at::empty({chunk * (vs + vt) * 8}, byte_options);
  at::Tensor keys_out = at::empty({chunk * (vs + vt) * 8}, byte_options);
  at::Tensor coef = at::empty({chunk * (vs + vt)}, float_options);
  at::Tensor stats = at::empty({chunk * kStats}, float_options);
  // segment offsets: the chunk's student rows, then its teacher rows
  std::vector<int32_t> host_offsets(2 * chunk + 1);
  for (int64_t r = 0; r <= chunk; ++r) host_offsets[r] = static_cast<int32_t>(r * vs);
  for (int64_t r = 1; r <= chunk; ++r) host_offsets[chunk + r] = static_cast<int32_t>(chunk * vs + r * vt);
  at::Tensor offsets = at::empty({2 * chunk + 1}, s.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemcpyAsync(offsets.data_ptr<int32_t>(), host_offsets.data(),
                                 host_offsets.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  auto* in = reinterpret_cast<uint64_t*>(keys_in.data_ptr<uint8_t>());
  auto* out = reinterpret_cast<uint64_t*>(keys_out.data_ptr<uint8_t>());
  const int32_t* begin = offsets.data_ptr<int32_t>();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, temp_bytes, in, out, static_cast<int>(chunk * (vs + vt)), static_cast<int>(2 * chunk), begin,
      begin + 1, 0, 64, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, byte_options);
  const scalar_t* s_base = s.data_ptr<scalar_t>();
  const scalar_t* t_base = t.data_ptr<scalar_t>();
  float* coef_s = coef.data_ptr<float>();
  float* coef_t = coef_s + chunk * vs;
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t count = std::min(chunk, rows - first);
    const unsigned grid = static_cast<unsigned>(count);
    const scalar_t* s_rows = s_base + first * s.stride(0);
    const scalar_t* t_rows = t_base + first * t.stride(0);
    _uld_keys_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
        s_rows, t_rows, s.stride(0), t.stride(0), mask != nullptr ? mask + first : nullptr, vs, vt,
        static_cast<float>(inv_ts), static_cast<float>(inv_tt), student_is_logprob, teacher_is_logprob, in,
        in + chunk * vs, stats.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // a short last chunk sorts its stale tail segments too: harmless, never read
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
        temp.data_ptr<uint8_t>(), temp_bytes, in, out, static_cast<int>(chunk * (vs + vt)),
        static_cast<int>(2 * chunk), begin, begin + 1, 0, 64, stream));
    _uld_rows_kernel<<<grid, kBlock, 0, stream>>>(
        out, out + chunk * vs, vs, vt, stats.data_ptr<float>(), row_loss.data_ptr<float>() + first, coef_s, coef_t,
        grad_s != nullptr, grad_t != nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad_s != nullptr) {
      _uld_grad_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
          s_rows, s.stride(0), vs, static_cast<float>(inv_ts), static_cast<float>(grad_scale * inv_ts),
          !student_is_logprob, stats.data_ptr<float>(), 0, coef_s, grad_s->data_ptr<scalar_t>() + first * vs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_t != nullptr) {
      _uld_grad_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
          t_rows, t.stride(0), vt, static_cast<float>(inv_tt), static_cast<float>(grad_scale * inv_tt),
          !teacher_is_logprob, stats.data_ptr<float>(), 2, coef_t, grad_t->data_ptr<scalar_t>() + first * vt);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// ---- op -----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> uld_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& row_mask,
    double inv_student_temperature, double inv_teacher_temperature, double grad_scale, bool student_grad,
    bool teacher_grad, bool student_is_logprob, bool teacher_is_logprob) {
  // float64 first: the CUDA kernels accumulate in float32 and refuse it
  check_not_float64_on_cuda(student, "fastkd::uld_forward", "student and teacher");
  uld::check_args(student, teacher, row_mask, inv_student_temperature, inv_teacher_temperature, grad_scale,
                  student_is_logprob, teacher_is_logprob, at::kCUDA);
  // one chunk's segment offsets are int32
  TORCH_CHECK(student.size(1) + teacher.size(1) <= kScratchEntries,
              "student and teacher rows must have at most ", kScratchEntries, " entries together");
  const c10::cuda::CUDAGuard device_guard(student.device());
  uld::UldCall call(student, teacher, row_mask, student_grad, teacher_grad, at::kFloat);
  if (call.rows() == 0) return call.outputs();
  const at::Tensor& s = call.student;
  const at::Tensor& t = call.teacher;
  const bool* mask_ptr = call.mask_ptr();
  at::Tensor& row_loss = call.row_loss;
  at::Tensor* gs = student_grad ? &call.student_grad : nullptr;
  at::Tensor* gt = teacher_grad ? &call.teacher_grad : nullptr;
  dispatch_float_dtype(s.scalar_type(), "fastkd::uld_forward", [&](auto tag) {
    uld_launch<decltype(tag)>(s, t, mask_ptr, inv_student_temperature, inv_teacher_temperature, grad_scale,
                              student_is_logprob, teacher_is_logprob, row_loss, gs, gt);
  });
  return call.outputs();
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("uld_forward", &fastkd::cuda::uld_forward_cuda); }
