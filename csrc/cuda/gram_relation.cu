// PKT, SP and CC on CUDA: fastkd::pkt_forward, fastkd::sp_forward and
// fastkd::cc_forward for CUDA tensors (docs/spec.md §2). Same contract and maths as
// the CPU ops (csrc/cpu/gram_relation.cpp) and the Triton launchers
// (kernels/gram_relation.py): the Gram matrices with at::mm (cuBLAS; PKT: of
// the normalised rows x̂), a row kernel that computes the row's loss terms
// and writes ∂loss/∂G in place of the student's Gram row, then
// dX = (dG + dGᵀ) X with at::mm (PKT: dx̂, then the normalisation's O(N·D)
// gradient with ATen, csrc/common/gram_relation.h). O(N²) memory.
// float32 / bfloat16 / float16 inputs, widened to float32; float64 is
// refused, as by every GPU kernel here.
//
// Row kernels: one 256-thread block per row i (grid-strided beyond 2^20
// rows), threads striding over j so that each warp reads 32 consecutive
// floats of the row (coalesced); the row sums are cub::BlockReduce over
// float2 pairs, broadcast through shared memory. SP and PKT make three
// passes over their row (sums; loss and the projection of the
// normalisation's gradient; dG), CC one. Each thread writes only the
// entries it has itself read, so overwriting G_s in place needs no barrier.
// Traffic floor: read 2·N² floats per pass and write N² (the second and
// third passes re-read a row of 4N bytes, from L1/L2 for N up to ~10⁴);
// arithmetic O(N²) besides the O(N² D) matmuls, so the kernels are bound by
// memory bandwidth and the matmuls dominate for D ≳ 10.
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

#include "../common/gram_relation.h"
#include "block_reduce.cuh"
#include "op_scope.cuh"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
// Rows beyond this many blocks are grid-strided.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

unsigned row_grid(int64_t n) { return static_cast<unsigned>(std::min(n, kMaxBlocks)); }

// ---- device helpers -------------------------------------------------------------

// max(x, floor) keeping NaN (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float x, float floor) { return x < floor ? floor : x; }

using Reduce2 = cub::BlockReduce<float2, kRowThreads>;

// The block-wide (Σ a, Σ b) of every thread's pair, in every thread. `out` is
// shared memory that no thread reads again before the next __syncthreads
// after this call's (the caller's end-of-row barrier).
__device__ __forceinline__ float2 block_sum2(typename Reduce2::TempStorage& temp, float2* out, float a, float b) {
  const float2 total = Reduce2(temp).Reduce(make_float2(a, b), SumOp2());
  if (threadIdx.x == 0) *out = total;
  __syncthreads();  // publishes *out, and frees temp for the next reduction
  return *out;
}

// ---- SP ------------------------------------------------------------------------------
// Ĝ = G / max(‖G_i‖, 1e-12), loss row Σ_j (Ĝ_t − Ĝ_s)²_ij; with `grad`,
// dG = (dĜ − Ĝ (Ĝ·dĜ)) / ‖G_i‖, dĜ = −2 (Ĝ_t − Ĝ_s) / N² (no projection
// where ‖G_i‖ <= eps: there the divisor is the constant eps).
__global__ void __launch_bounds__(kRowThreads) sp_row_kernel(
    float* __restrict__ gs,         // [n, n] student Gram matrix; out: dG (grad)
    const float* __restrict__ gt,   // [n, n] teacher Gram matrix
    float* __restrict__ loss_rows,  // [n] out
    int64_t n, float inv_n2, bool grad) {
  __shared__ typename Reduce2::TempStorage temp;
  __shared__ float2 norms_sh, sums_sh;
  const float eps = static_cast<float>(gram::kNormalizeEps);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    float* gs_row = gs + i * n;
    const float* gt_row = gt + i * n;
    float ss = 0.f, st = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      ss += gs_row[j] * gs_row[j];
      st += gt_row[j] * gt_row[j];
    }
    const float2 sq = block_sum2(temp, &norms_sh, ss, st);
    const float norm_s = sqrtf(sq.x);
    const float r_s = nan_max(norm_s, eps);
    const float r_t = nan_max(sqrtf(sq.y), eps);
    float loss = 0.f, dot = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const float ys = gs_row[j] / r_s;
      const float diff = gt_row[j] / r_t - ys;
      loss += diff * diff;
      dot += ys * (-2.f * inv_n2) * diff;
    }
    const float2 sums = block_sum2(temp, &sums_sh, loss, dot);
    if (threadIdx.x == 0) loss_rows[i] = sums.x;
    if (grad) {
      const float proj = norm_s > eps ? sums.y : 0.f;
      for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
        const float ys = gs_row[j] / r_s;
        const float dy = (-2.f * inv_n2) * (gt_row[j] / r_t - ys);
        gs_row[j] = (dy - ys * proj) / r_s;
      }
    }
    __syncthreads();  // the shared sums are rewritten for the next row
  }
}

// ---- CC ------------------------------------------------------------------------------
// K = exp(−2γ) Σ_p (2γ)^p / p! G^p per side; sq row Σ_j (K_s − K_t)²_ij; with
// `grad`, (K_s − K_t) dK_s/dG in place of G_s (the launcher scales it by
// 1 / (‖K_s − K_t‖_F N²) once the norm is known).
__global__ void __launch_bounds__(kRowThreads) cc_row_kernel(
    float* __restrict__ gs,        // [n, n] student Gram matrix; out: (K_s − K_t) dK_s/dG (grad)
    const float* __restrict__ gt,  // [n, n] teacher Gram matrix
    float* __restrict__ sq_rows,   // [n] out
    int64_t n, float two_gamma, float scale, int64_t order, bool grad) {
  __shared__ typename Reduce2::TempStorage temp;
  __shared__ float2 sums_sh;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    float* gs_row = gs + i * n;
    const float* gt_row = gt + i * n;
    float sq = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      float k_s, dk_s, k_t, dk_t;
      gram::cc_taylor<float>(gs_row[j], two_gamma, order, k_s, dk_s);
      gram::cc_taylor<float>(gt_row[j], two_gamma, order, k_t, dk_t);
      const float diff = scale * (k_s - k_t);
      sq += diff * diff;
      if (grad) gs_row[j] = diff * scale * dk_s;
    }
    const float2 sums = block_sum2(temp, &sums_sh, sq, 0.f);
    if (threadIdx.x == 0) sq_rows[i] = sums.x;
    __syncthreads();
  }
}

// ---- PKT -----------------------------------------------------------------------------
// S = max((H + 1) / 2, 0), P = S / rowsum(S) per side; loss row Σ_j P_t log((P_t + eps) / (P_s + eps));
// with `grad`, dH = (dP − Σ_j dP P_s) / (2 rowsum(S_s)), dP = −P_t / (P_s + eps) / N², and
// dH = 0 where the clamp acted (an antipodal pair whose cosine rounded below −1).
__device__ __forceinline__ float pkt_similarity(float h) {
  const float s = (h + 1.f) * 0.5f;
  return s < 0.f ? 0.f : s;  // a NaN passes through
}

__global__ void __launch_bounds__(kRowThreads) pkt_row_kernel(
    float* __restrict__ hs,         // [n, n] student Gram matrix of x̂; out: dH (grad)
    const float* __restrict__ ht,   // [n, n] teacher, likewise
    float* __restrict__ loss_rows,  // [n] out
    int64_t n, float eps, float inv_n2, bool grad) {
  __shared__ typename Reduce2::TempStorage temp;
  __shared__ float2 rows_sh, sums_sh;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    float* hs_row = hs + i * n;
    const float* ht_row = ht + i * n;
    float a = 0.f, b = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      a += pkt_similarity(hs_row[j]);
      b += pkt_similarity(ht_row[j]);
    }
    const float2 r = block_sum2(temp, &rows_sh, a, b);
    float loss = 0.f, dot = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const float p_s = pkt_similarity(hs_row[j]) / r.x;
      const float p_t = pkt_similarity(ht_row[j]) / r.y;
      loss += p_t * logf((p_t + eps) / (p_s + eps));
      dot += -inv_n2 * p_t / (p_s + eps) * p_s;
    }
    const float2 sums = block_sum2(temp, &sums_sh, loss, dot);
    if (threadIdx.x == 0) loss_rows[i] = sums.x;
    if (grad) {
      for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
        const bool clamped = (hs_row[j] + 1.f) * 0.5f < 0.f;
        const float p_s = pkt_similarity(hs_row[j]) / r.x;
        const float p_t = pkt_similarity(ht_row[j]) / r.y;
        const float d_p = -inv_n2 * p_t / (p_s + eps);
        hs_row[j] = clamped ? 0.f : 0.5f * (d_p - sums.y) / r.x;
      }
    }
    __syncthreads();
  }
}

// ---- launchers and ops --------------------------------------------------------------

void check_args(const at::Tensor& student, const at::Tensor& teacher) {
  check_feature_pair_args(student, teacher, at::kCUDA);
  check_not_float64_on_cuda(student, "fastkd PKT / SP / CC ops", "student");
}

std::tuple<at::Tensor, at::Tensor> no_grad_result(const at::Tensor& loss, const at::Tensor& student) {
  return {loss, at::zeros({0, 0}, student.options())};
}

std::tuple<at::Tensor, at::Tensor> sp_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   bool student_grad) {
  check_args(student, teacher);
  const CudaOpScope scope(student);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const gram::GramPair g = gram::gram_pair(student, teacher, at::kFloat);
  const at::Tensor &gs = g.gs, &gt = g.gt;
  const int64_t n = g.xs.size(0);
  const double inv_n2 = 1.0 / (double(n) * double(n));
  at::Tensor loss_rows = at::empty({n}, g.xs.options());
  sp_row_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(gs.data_ptr<float>(), gt.data_ptr<float>(),
                                                         loss_rows.data_ptr<float>(), n,
                                                         static_cast<float>(inv_n2), student_grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor loss = loss_rows.sum(at::kDouble).mul_(inv_n2).to(at::kFloat);
  if (!student_grad) return no_grad_result(loss, student);
  return {loss, gram::gram_student_grad(g, student.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> cc_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                   bool student_grad, double gamma, int64_t order) {
  check_args(student, teacher);
  gram::check_cc_params(gamma, order);
  const CudaOpScope scope(student);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const gram::GramPair g = gram::gram_pair(student, teacher, at::kFloat);
  const at::Tensor &gs = g.gs, &gt = g.gt;
  const int64_t n = g.xs.size(0);
  at::Tensor sq_rows = at::empty({n}, g.xs.options());
  cc_row_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(
      gs.data_ptr<float>(), gt.data_ptr<float>(), sq_rows.data_ptr<float>(), n, static_cast<float>(2.0 * gamma),
      static_cast<float>(std::exp(-2.0 * gamma)), order, student_grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // the norm stays on the device (float64): reading it on the host would synchronise
  const at::Tensor norm = sq_rows.sum(at::kDouble).sqrt_();
  const double n2 = double(n) * double(n);
  const at::Tensor loss = norm.div(n2).to(at::kFloat);
  if (!student_grad) return no_grad_result(loss, student);
  // 1 / (‖K_s − K_t‖_F N²), 0 where the norm is 0 (NaN stays NaN)
  const at::Tensor coef = at::where(norm == 0.0, at::zeros_like(norm), norm.mul(n2).reciprocal_());
  gs.mul_(coef.to(at::kFloat));
  return {loss, gram::gram_student_grad(g, student.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> pkt_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    bool student_grad, double eps) {
  check_args(student, teacher);
  gram::check_pkt_eps(eps);
  const CudaOpScope scope(student);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const gram::PktPair pair = gram::pkt_pair(student, teacher, at::kFloat, eps);
  const at::Tensor &hs = pair.hs, &ht = pair.ht;
  const int64_t n = pair.xs.size(0);
  const double inv_n2 = 1.0 / (double(n) * double(n));
  at::Tensor loss_rows = at::empty({n}, pair.xs.options());
  pkt_row_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(hs.data_ptr<float>(), ht.data_ptr<float>(),
                                                          loss_rows.data_ptr<float>(), n, static_cast<float>(eps),
                                                          static_cast<float>(inv_n2), student_grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor loss = loss_rows.sum(at::kDouble).mul_(inv_n2).to(at::kFloat);
  if (!student_grad) return no_grad_result(loss, student);
  return {loss, gram::pkt_student_grad(pair, eps, student.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("pkt_forward", &fastkd::cuda::pkt_forward_cuda);
  m.impl("sp_forward", &fastkd::cuda::sp_forward_cuda);
  m.impl("cc_forward", &fastkd::cuda::cc_forward_cuda);
}
