// CUDA implementation of fastkd::crd_nce_forward (docs/spec.md §4, CRD): one direction
// of RepDistiller's contrastive memory loss, fused. Same contract, terms and
// gradient as the CPU op (csrc/cpu/crd.cpp, which derives them): for sample b
// and its K+1 bank indices j (column 0 the positive),
//
//   s_bj = bank[idx_bj] · v_b,   P_bj = exp(s_bj / T) / Z,   c = K / n_data,  c' = c + 1e-7
//   row_loss_b = log1p(c' / P_b0) + Σ_{k≥1} log1p(P_bk / c') + K log(c' / c)
//   d row_loss_b / d v_b = Σ_j g_bj bank[idx_bj],
//       g_b0 = −c' / (T (P_b0 + c')),   g_bk = P_bk / (T (P_bk + c')).
//
// One warp per work item (sample b, slice of its columns): lane l holds
// elements l, l + 32, ... of v_b and of the gradient in registers (R per
// lane, D <= 32·R), gathers each bank row of the slice with coalesced loads,
// reduces the dot product with warp shuffles, and adds g · row to its
// gradient registers: the (B, K+1, D) gather of the reference never exists.
// A batch has few samples (64–256) against K+1 = 16385 columns, so each
// sample's columns are split over enough warps to fill the GPU (about
// kTargetWarps work items, at least kMinColumnsPerSplit columns each); each
// item writes a partial loss and a partial gradient (both accumulated in
// double: a split sums hundreds of rows with weights of both signs), which
// ATen sums over the splits in a fixed order: deterministic, no atomics.
// Memory besides the inputs: splits × B × (D + 1) doubles.
//
// Memory traffic floor: the gather, B·(K+1)·D·sizeof(T) bytes of random bank
// rows plus the indices, once (twice when Z is set from the batch: the first
// pass only sums exp(s / T); it reads the Z passed in, a device tensor, and
// gathers nothing when Z is given, so that the op never reads Z on the host). Many warps in flight (small R: high occupancy)
// hide the gather's latency.
//
// float32 inputs compute the dot products, exp and log1p in float32 and
// accumulate the loss, the gradient and the exp sum for Z in double, as on
// CPU; float64 inputs stay float64. feat_dim is limited to kMaxFeatDim (R <= 32).
//
// Indices are checked in the kernels, not on the host (that would be a
// device → host synchronisation on every call): an index outside
// [0, n_data) gathers row 0 instead and gets a NaN score, so its sample's
// loss and gradient are NaN (and Z, when set from the batch), and nothing
// outside the bank is read (docs/spec.md §6; the Python layer checks on the
// host when FASTKD_CHECK_DEVICE_VALUES=1).
//
// Layout: the device code and raw-pointer launchers first, then the op
// (checks, outputs, device guard, stream) and its registration.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/crd_op.h"

namespace fastkd {
namespace cuda {
namespace {

// RepDistiller's ContrastLoss eps, in the denominators P + c'.
constexpr double kNceEps = 1e-7;
constexpr int kWarp = 32;
// 4 warps per block: small blocks, so that the last wave is short.
constexpr int kThreads = 128;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Elements per lane of v, the gathered row and the (double) gradient: R <= 32
// keeps them within 128 registers.
constexpr int kMaxPerLane = 32;
constexpr int64_t kMaxFeatDim = int64_t(kWarp) * kMaxPerLane;
// Work items to aim for (an H100 holds 132 SMs × 64 warps = 8448), and the
// fewest columns a split gets, so that the partial sums stay small.
constexpr int64_t kTargetWarps = 8192;
constexpr int64_t kMinColumnsPerSplit = 32;
// Blocks beyond this many are grid-strided.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// ---- device code --------------------------------------------------------------

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dev_log1p(double x) { return log1p(x); }

// Σ over the warp's lanes, returned to every lane.
template <class T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// The raw views every kernel reads.
template <class T>
struct CrdView {
  const T* v;          // [B, D], contiguous
  const T* bank;       // [n_data, D], rows at bank_stride, unit stride along D
  const int64_t* idx;  // [B, K+1], contiguous; entries outside [0, n_data) score NaN
  int64_t batch, dim, cols, n_data, bank_stride;
  int64_t cols_per_split, items;  // items = batch × splits
  T inv_temperature;
};

// This warp's work item: sample b and columns [lo, hi).
struct WorkItem {
  int64_t b, split, lo, hi;
};

template <class T>
__device__ __forceinline__ WorkItem work_item(const CrdView<T>& w, int64_t item) {
  WorkItem it;
  it.b = item % w.batch;
  it.split = item / w.batch;
  it.lo = it.split * w.cols_per_split;
  it.hi = w.cols < it.lo + w.cols_per_split ? w.cols : it.lo + w.cols_per_split;
  return it;
}

// Lane `lane`'s R elements of v_b (zeros past D).
template <class T, int R>
__device__ __forceinline__ void load_v(const CrdView<T>& w, int64_t b, int lane, T (&vr)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t d = lane + int64_t(kWarp) * r;
    vr[r] = d < w.dim ? w.v[b * w.dim + d] : T(0);
  }
}

// Gathers bank[idx_bj] into the lane's registers and returns s_bj to every
// lane; an index outside [0, n_data) gathers row 0 and returns NaN.
template <class T, int R>
__device__ __forceinline__ T gather_dot(const CrdView<T>& w, int64_t b, int64_t j, int lane,
                                        const T (&vr)[R], T (&rr)[R]) {
  const int64_t index = w.idx[b * w.cols + j];
  const bool in_bank = index >= 0 && index < w.n_data;  // the same for every lane
  const T* row = w.bank + (in_bank ? index : 0) * w.bank_stride;
  T partial = T(0);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t d = lane + int64_t(kWarp) * r;
    rr[r] = d < w.dim ? row[d] : T(0);
    partial += rr[r] * vr[r];
  }
  const T score = warp_sum(partial);
  return in_bank ? score : T(NAN);
}

// Z's pass: partial[split, b] = Σ_{j in the slice} exp(s_bj / T), in double;
// 0 where z_in, the Z passed in, is given (> 0, or NaN, which the loss then
// carries): the same for every thread, so the whole grid skips the gather.
template <class T, int R>
__global__ void __launch_bounds__(kThreads) _crd_exp_sum_kernel(CrdView<T> w, const T* __restrict__ z_in,
                                                               double* __restrict__ partial) {
  const bool z_given = !(*z_in <= T(0));
  const int lane = threadIdx.x % kWarp;
  const int64_t first = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  // the loops below are uniform over a warp: every lane has the same item and j
  for (int64_t item = first; item < w.items; item += stride) {
    const WorkItem it = work_item(w, item);
    T vr[R];
    T rr[R];
    load_v(w, it.b, lane, vr);
    double total = 0.0;
    for (int64_t j = it.lo; j < (z_given ? it.lo : it.hi); ++j) {
      total += static_cast<double>(dev_exp(gather_dot(w, it.b, j, lane, vr, rr) * w.inv_temperature));
    }
    if (lane == 0) partial[it.split * w.batch + it.b] = total;
  }
}

// The loss terms and the gradient: loss_partial[split, b] (without the
// constant K log(c'/c)) and grad_partial[split, b, :] (if not nullptr).
template <class T, int R>
__global__ void __launch_bounds__(kThreads) _crd_nce_kernel(
    CrdView<T> w,
    const T* __restrict__ z,              // [] Z > 0, on the device (no host sync)
    double* __restrict__ loss_partial,    // [splits, B]
    double* __restrict__ grad_partial,    // [splits, B, D] or nullptr
    T c_eps,                              // c' = K / n_data + 1e-7
    T inv_c_eps) {                        // 1 / c'
  const int lane = threadIdx.x % kWarp;
  const int64_t first = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  const T inv_z = T(1) / *z;
  const bool student_grad = grad_partial != nullptr;
  for (int64_t item = first; item < w.items; item += stride) {
    const WorkItem it = work_item(w, item);
    T vr[R];
    T rr[R];
    // the gradient sums up to K+1 rows with weights of both signs: in double
    double gr[R];
    load_v(w, it.b, lane, vr);
#pragma unroll
    for (int r = 0; r < R; ++r) gr[r] = 0.0;
    double loss = 0.0;
    for (int64_t j = it.lo; j < it.hi; ++j) {
      // P = exp(s / T) / Z
      const T p = dev_exp(gather_dot(w, it.b, j, lane, vr, rr) * w.inv_temperature) * inv_z;
      const T denom = p + c_eps;
      T g;
      if (j == 0) {
        // −log(P0 / (P0 + c')) = log1p(c' / P0);  d/ds = −c' / (T (P0 + c')).
        // P0 = inf (an infinite score): the ratio is inf / inf, NaN, where
        // log1p(c' / P0) would give 0 (p − p is NaN exactly when p is not finite).
        loss += static_cast<double>(p - p != T(0) ? p - p : dev_log1p(c_eps / p));
        g = -c_eps / denom * w.inv_temperature;
      } else {
        // −log(c / (Pk + c')) = log1p(Pk / c') + log(c' / c);  d/ds = Pk / (T (Pk + c'))
        loss += static_cast<double>(dev_log1p(p * inv_c_eps));
        g = p / denom * w.inv_temperature;
      }
      if (student_grad) {
#pragma unroll
        for (int r = 0; r < R; ++r) gr[r] += static_cast<double>(g) * static_cast<double>(rr[r]);
      }
    }
    const int64_t out = it.split * w.batch + it.b;
    if (lane == 0) loss_partial[out] = loss;
    if (student_grad) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t d = lane + int64_t(kWarp) * r;
        if (d < w.dim) grad_partial[out * w.dim + d] = gr[r];
      }
    }
  }
}

// ---- launchers ------------------------------------------------------------------

unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::min((items + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

template <class T, int R>
void launch_exp_sum(const CrdView<T>& w, const T* z_in, double* partial, cudaStream_t stream) {
  _crd_exp_sum_kernel<T, R><<<blocks_for(w.items), kThreads, 0, stream>>>(w, z_in, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, int R>
void launch_nce(const CrdView<T>& w, const T* z, double* loss_partial, double* grad_partial, T c_eps,
                T inv_c_eps, cudaStream_t stream) {
  _crd_nce_kernel<T, R><<<blocks_for(w.items), kThreads, 0, stream>>>(w, z, loss_partial,
                                                                      grad_partial, c_eps, inv_c_eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f.template operator()<R>() with the smallest R in {1, 2, 4, ..., 32}
// such that 32·R >= dim (dim <= kMaxFeatDim, checked by the op).
template <class F>
void with_per_lane(int64_t dim, F&& f) {
  const int64_t per_lane = (dim + kWarp - 1) / kWarp;
  if (per_lane <= 1) return f.template operator()<1>();
  if (per_lane <= 2) return f.template operator()<2>();
  if (per_lane <= 4) return f.template operator()<4>();
  if (per_lane <= 8) return f.template operator()<8>();
  if (per_lane <= 16) return f.template operator()<16>();
  return f.template operator()<32>();
}

// ---- the op -------------------------------------------------------------------

// Splits per sample: about kTargetWarps work items in all, at least
// kMinColumnsPerSplit columns each; returns (splits, columns per split) with
// no empty split.
std::pair<int64_t, int64_t> column_splits(int64_t batch, int64_t cols) {
  const int64_t by_target = (kTargetWarps + batch - 1) / batch;
  const int64_t by_size = (cols + kMinColumnsPerSplit - 1) / kMinColumnsPerSplit;
  const int64_t wanted = std::max<int64_t>(1, std::min(by_target, by_size));
  const int64_t per_split = (cols + wanted - 1) / wanted;
  return {(cols + per_split - 1) / per_split, per_split};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_nce_forward_cuda(
    const at::Tensor& v, const at::Tensor& bank, const at::Tensor& contrast_idx, const at::Tensor& z,
    double inv_temperature, bool student_grad) {
  check_crd_args(v, bank, contrast_idx, z, inv_temperature, at::kCUDA);
  TORCH_CHECK(v.size(1) <= kMaxFeatDim, "feat_dim must be <= ", kMaxFeatDim,
              " for the CUDA kernel, got ", v.size(1));
  const c10::cuda::CUDAGuard device_guard(v.device());
  const at::Tensor vc = v.contiguous();
  const at::Tensor idx = contrast_idx.contiguous();
  const int64_t batch = v.size(0), dim = v.size(1), n_data = bank.size(0), cols = idx.size(1);
  const at::TensorOptions options = v.options();
  // the Z passed in, in v's dtype; never read on the host
  const at::Tensor z_in = z.to(v.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  if (batch == 0) {
    // as on CPU: nothing to gather, and Z stays the one passed in
    const std::vector<int64_t> grad_sizes{0, student_grad ? dim : 0};
    return {at::empty({0}, options), at::empty(grad_sizes, options), z_in};
  }
  const auto [splits, per_split] = column_splits(batch, cols);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t negatives = cols - 1;
  const double c = double(negatives) / double(n_data);
  at::Tensor loss_partial = at::empty({splits, batch}, options.dtype(at::kDouble));
  at::Tensor grad_partial = student_grad ? at::empty({splits, batch, dim}, options.dtype(at::kDouble))
                                       : at::empty({0, 0}, options);
  at::Tensor z_out;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "crd_nce_forward_cuda", [&] {
    const CrdView<scalar_t> w{vc.data_ptr<scalar_t>(), bank.data_ptr<scalar_t>(),
                              idx.data_ptr<int64_t>(), batch, dim, cols, n_data,
                              n_data <= 1 ? dim : bank.stride(0), per_split, batch * splits,
                              static_cast<scalar_t>(inv_temperature)};
    // Z = mean_bj exp(s_bj / T) · n_data, rounded to the input dtype once
    // (as on CPU), so that the stored Z reproduces this batch's loss
    // exactly; or the Z passed in, chosen on the device (the exp-sum pass
    // then gathers nothing).
    at::Tensor partial = at::empty({splits, batch}, options.dtype(at::kDouble));
    with_per_lane(dim, [&]<int R>() {
      launch_exp_sum<scalar_t, R>(w, z_in.data_ptr<scalar_t>(), partial.data_ptr<double>(), stream);
    });
    const at::Tensor batch_z =
        partial.sum().div_(double(batch) * double(cols)).mul_(double(n_data)).to(v.scalar_type());
    z_out = at::where(z_in.le(0), batch_z, z_in);
    const scalar_t c_eps = static_cast<scalar_t>(c + kNceEps);
    const scalar_t inv_c_eps = static_cast<scalar_t>(1.0 / (c + kNceEps));
    with_per_lane(dim, [&]<int R>() {
      launch_nce<scalar_t, R>(w, z_out.data_ptr<scalar_t>(), loss_partial.data_ptr<double>(),
                              student_grad ? grad_partial.data_ptr<double>() : nullptr, c_eps,
                              inv_c_eps, stream);
    });
  });
  // Σ_k log((P_k + c') / c) = Σ_k log1p(P_k / c') + K log(c' / c)
  const double shift = negatives > 0 ? double(negatives) * std::log1p(kNceEps / c) : 0.0;
  at::Tensor row_loss = loss_partial.sum(0).add_(shift).to(v.scalar_type());
  at::Tensor grad = student_grad ? grad_partial.sum(0).to(v.scalar_type()) : grad_partial;
  return {row_loss, grad, z_out};
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("crd_nce_forward", &fastkd::cuda::crd_nce_forward_cuda);
}
