// CUDA implementation of fastkd::info_nce_forward / fastkd::info_nce_backward
// (docs/spec.md §4), with the same tiling and contract as the CPU op
// (csrc/cpu/info_nce.cpp): the (N, M) similarity matrix is never stored.
// (The keep mode, fastkd::info_nce_softmax_forward / _backward, at the end of
// this file, stores it as the softmax instead and skips the recompute.)
// Each op walks q in tiles of `tile_rows` rows; a tile's raw products
// q_tile kᵀ (tile_rows × M, from an ATen GEMM, i.e. cuBLAS) are the only large
// temporary, so memory is O(tile_rows · M), not O(N · M). What is ours is the
// small kernels between the GEMMs:
//
//   forward   _info_nce_row_lse_kernel: per row of the tile, the log-sum-exp
//             of logits = products / T (max, then Σ exp(x − max), each a
//             cub block reduction) and the positive logit at the row's label:
//             row_loss = lse − logit_{i, y_i}; row_lse is kept (O(N)).
//             A label outside [0, M) is never read through: its row loss
//             is NaN (the labels are not checked on the host, which would
//             synchronise the device with it; docs/spec.md §6).
//   backward  recomputes the tile's products, then
//             _info_nce_logit_grad_kernel turns them in place into
//             G_ij = (exp(x_ij − lse_i) − [j = y_i]) · grad_row_loss_i / T
//             (a NaN row where y_i lies outside [0, M));
//             dq_tile = G k and dk += Gᵀ q_tile are two more GEMMs.
//
// This is honest about what it is: GEMMs from ATen plus fused element / row
// kernels, not a flash-style single kernel (that is the Triton backend,
// kernels/info_nce.py). Its extra cost over a fused kernel is the
// round trip of each logits tile through global memory (written by the GEMM,
// read by the row kernel; in the backward read and written once more), i.e.
// 2–3 · N · M · sizeof(acc) bytes of traffic besides the GEMMs'
// 2·N·M·D (forward) and 3 × 2·N·M·D (backward) multiply-adds.
//
// bfloat16 / float16 inputs are upcast tile by tile (k once) and everything
// is computed in float32 (float32 GEMMs: no TF32 unless the user enabled it
// in torch); float64 inputs stay float64, as on CPU.
//
// Layout: the device code and raw-pointer launchers first, then the ops
// (checks, outputs, device guard, stream) and their registration.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../common/info_nce_op.h"
#include "block_reduce.cuh"
#include "op_scope.cuh"

namespace fastkd {
namespace cuda {
namespace {

// Blocks beyond this many are grid-strided.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// Threads per block of the element-wise gradient kernel.
constexpr int kElementThreads = 256;

// ---- device code --------------------------------------------------------------

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

// max that keeps a NaN from either side (so that a NaN logit gives a NaN lse)
template <class T>
__device__ __forceinline__ T max_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}

struct MaxNanOp {
  template <class T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return max_nan(a, b);
  }
};

// One block per row of the tile (blocks grid-stride over rows); threads
// stride over M so that a warp's loads are coalesced. The row is read twice
// (max, then Σ exp), the second time from L2.
template <class T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) _info_nce_row_lse_kernel(
    const T* __restrict__ products,     // [rows, M] contiguous, q_i · k_j (not yet / T)
    const int64_t* __restrict__ labels,  // [rows]; outside [0, M): a NaN row loss
    T* __restrict__ row_loss,            // [rows] lse_i − logit_{i, y_i}
    T* __restrict__ row_lse,             // [rows]
    int64_t rows, int64_t M, T inv_temperature) {
  using Reduce = cub::BlockReduce<T, BLOCK>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ T result;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x = products + row * M;
    // logits x_ij / T, rounded as the CPU op's mul_(inv_temperature)
    T m = -INFINITY;
    for (int64_t j = threadIdx.x; j < M; j += BLOCK) m = max_nan(m, x[j] * inv_temperature);
    m = block_all_reduce<BLOCK>(m, MaxNanOp{}, temp, result);
    // shifted by 0 where the max is +inf (a +inf logit), as torch.logsumexp:
    // inf − inf would make the lse NaN instead of +inf
    const T shift = m == T(INFINITY) ? T(0) : m;
    T sum = T(0);
    for (int64_t j = threadIdx.x; j < M; j += BLOCK) sum += dev_exp(x[j] * inv_temperature - shift);
    sum = block_all_reduce<BLOCK>(sum, SumOp{}, temp, result);
    if (threadIdx.x == 0) {
      const T lse = shift + dev_log(sum);
      const int64_t y = labels[row];
      row_lse[row] = lse;
      // a label outside the row is never used as an address
      row_loss[row] = (y >= 0 && y < M) ? lse - x[y] * inv_temperature : T(NAN);
    }
  }
}

// G_ij = (exp(x_ij / T − lse_i) − [j = y_i]) · scale_i, in place over the
// tile's products; scale_i = grad_row_loss_i / T, NaN where y_i lies outside
// [0, M) (the label is only compared with j). Grid-stride over elements.
template <class T>
__global__ void __launch_bounds__(kElementThreads) _info_nce_logit_grad_kernel(
    T* __restrict__ g,                   // [rows, M] contiguous: products in, G out
    const int64_t* __restrict__ labels,  // [rows]; outside [0, M): a NaN row of G
    const T* __restrict__ lse,           // [rows]
    const T* __restrict__ scale,         // [rows]
    int64_t rows, int64_t M, T inv_temperature) {
  const int64_t total = rows * M;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / M;
    const int64_t j = e - i * M;
    const int64_t y = labels[i];
    T p = dev_exp(g[e] * inv_temperature - lse[i]);
    if (j == y) p -= T(1);
    g[e] = (y >= 0 && y < M) ? p * scale[i] : T(NAN);
  }
}

// ---- launchers ------------------------------------------------------------------

template <class T>
void launch_row_lse(const T* products, const int64_t* labels, T* row_loss, T* row_lse, int64_t rows,
                    int64_t m, T inv_temperature, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(rows, kMaxBlocks));
  // Short rows (a few thousand keys) get small blocks so that most threads have work.
  if (m <= 2048) {
    _info_nce_row_lse_kernel<T, 128><<<grid, 128, 0, stream>>>(products, labels, row_loss, row_lse,
                                                               rows, m, inv_temperature);
  } else {
    _info_nce_row_lse_kernel<T, 512><<<grid, 512, 0, stream>>>(products, labels, row_loss, row_lse,
                                                               rows, m, inv_temperature);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void launch_logit_grad(T* g, const int64_t* labels, const T* lse, const T* scale, int64_t rows,
                       int64_t m, T inv_temperature, cudaStream_t stream) {
  const int64_t blocks = (rows * m + kElementThreads - 1) / kElementThreads;
  const unsigned grid = static_cast<unsigned>(std::min(blocks, kMaxBlocks));
  _info_nce_logit_grad_kernel<T><<<grid, kElementThreads, 0, stream>>>(g, labels, lse, scale, rows, m,
                                                                       inv_temperature);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- the ops ------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> info_nce_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& labels,
                                                         double inv_temperature,
                                                         int64_t tile_rows) {
  check_info_nce_args(q, k, labels, inv_temperature, tile_rows, at::kCUDA);
  const CudaOpScope scope(q);
  const auto acc = accumulation_type(q);
  const int64_t n = q.size(0), m = k.size(0);
  at::Tensor row_loss = at::empty({n}, q.options().dtype(acc));
  at::Tensor row_lse = at::empty({n}, q.options().dtype(acc));
  if (n == 0) return {row_loss, row_lse};
  const at::Tensor k_acc = k.to(acc);
  const at::Tensor labels_c = labels.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    const at::Tensor products = at::mm(q.narrow(0, start, rows).to(acc), k_acc.t());  // contiguous
    AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_forward_cuda", [&] {
      launch_row_lse<scalar_t>(products.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>() + start,
                               row_loss.data_ptr<scalar_t>() + start,
                               row_lse.data_ptr<scalar_t>() + start, rows, m,
                               static_cast<scalar_t>(inv_temperature), stream);
    });
  }
  return {row_loss, row_lse};
}

std::tuple<at::Tensor, at::Tensor> info_nce_backward_cuda(
    const at::Tensor& grad_row_loss, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& labels, const at::Tensor& row_lse, double inv_temperature,
    int64_t tile_rows) {
  check_info_nce_args(q, k, labels, inv_temperature, tile_rows, at::kCUDA);
  check_info_nce_backward_args(grad_row_loss, q, row_lse, at::kCUDA);
  const int64_t n = q.size(0), m = k.size(0);
  const CudaOpScope scope(q);

  const auto acc = accumulation_type(q);
  InfoNceGrads grads(q, k, acc);
  if (n == 0) return grads.outputs();

  const at::Tensor k_acc = k.to(acc);
  const at::Tensor lse_acc = row_lse.to(acc).contiguous();
  const at::Tensor labels_c = labels.contiguous();
  // d row_loss_i / d logits_ij = P_ij − [j = y_i]; d logits / d (q kᵀ) = 1 / T.
  const at::Tensor row_scale = grad_row_loss.to(acc).mul(inv_temperature).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    const at::Tensor q_tile = q.narrow(0, start, rows).to(acc);
    at::Tensor g = at::mm(q_tile, k_acc.t());  // contiguous; becomes G in place
    AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_backward_cuda", [&] {
      launch_logit_grad<scalar_t>(g.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>() + start,
                                  lse_acc.data_ptr<scalar_t>() + start,
                                  row_scale.data_ptr<scalar_t>() + start, rows, m,
                                  static_cast<scalar_t>(inv_temperature), stream);
    });
    grads.add_tile(g, q_tile, k_acc, start);
  }
  return grads.outputs();
}

// The keep mode: all the logits in one GEMM against k · inv_temperature (so
// that the row maximum's own exponent is exactly exp(0), as on CPU), the row
// kernel's log-sum-exp and loss, then P = exp(logits − lse) in place (two
// ATen element-wise passes; on a GPU a small share of the GEMM's time).
std::tuple<at::Tensor, at::Tensor> info_nce_softmax_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& labels,
                                                                 double inv_temperature) {
  check_info_nce_args(q, k, labels, inv_temperature, /*tile_rows=*/1, at::kCUDA);
  const CudaOpScope scope(q);
  const auto acc = accumulation_type(q);
  const int64_t n = q.size(0), m = k.size(0);
  at::Tensor row_loss = at::empty({n}, q.options().dtype(acc));
  if (n == 0) return {row_loss, at::empty({0, m}, q.options().dtype(acc))};
  at::Tensor row_lse = at::empty({n}, q.options().dtype(acc));
  at::Tensor probabilities = at::mm(q.to(acc), k.to(acc).mul(inv_temperature).t());  // becomes P in place
  const at::Tensor labels_c = labels.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_softmax_forward_cuda", [&] {
    launch_row_lse<scalar_t>(probabilities.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>(),
                             row_loss.data_ptr<scalar_t>(), row_lse.data_ptr<scalar_t>(), n, m,
                             scalar_t(1), stream);
  });
  probabilities.sub_(row_lse.unsqueeze(1)).exp_();
  return {row_loss, probabilities};
}

std::tuple<at::Tensor, at::Tensor> info_nce_softmax_backward_cuda(
    const at::Tensor& grad_row_loss, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& labels, const at::Tensor& probabilities, double inv_temperature) {
  check_info_nce_args(q, k, labels, inv_temperature, /*tile_rows=*/1, at::kCUDA);
  check_info_nce_softmax_backward_args(grad_row_loss, probabilities, q, k, at::kCUDA);
  const CudaOpScope scope(q);
  return info_nce_grads_from_probabilities(grad_row_loss, q, k, labels, probabilities, inv_temperature);
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("info_nce_forward", &fastkd::cuda::info_nce_forward_cuda);
  m.impl("info_nce_backward", &fastkd::cuda::info_nce_backward_cuda);
  m.impl("info_nce_softmax_forward", &fastkd::cuda::info_nce_softmax_forward_cuda);
  m.impl("info_nce_softmax_backward", &fastkd::cuda::info_nce_softmax_backward_cuda);
}
