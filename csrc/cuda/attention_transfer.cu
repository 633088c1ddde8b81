// Attention transfer on CUDA: fastkd::attention_transfer_forward / _backward
// for CUDA tensors (docs/spec.md §5, RepDistiller `Attention`). Same contracts as the
// CPU ops (csrc/cpu/attention_transfer.cpp); for the feature maps f of one
// sample,
//   v_k = (1/C) Σ_c f_ck^p            (attention map over the HW positions k)
//   a   = v / max(‖v‖₂, eps)          (F.normalize)
//   L   = 1/(N·HW) Σ_n Σ_k (a_s − a_t)²
// Student and teacher share N and HW (the caller pools the larger map); their
// channel counts may differ. Only the two (N,) norms are kept for the
// backward, which rebuilds v (the structure of kernels/attention_transfer.py).
//
// Kernels (b bytes per map element; maps N·C·HW, scratch rows N·HW float32):
//   attention_map_kernel       one pass over C per tile of positions, v into
//                              a scratch row                    read N·C·HW·b
//   at_loss_kernel             one block per sample: ‖v_s‖, ‖v_t‖, then
//                              Σ_k (a_s − a_t)² in a second loop over the row
//                              (not ‖a_s‖² + ‖a_t‖² − 2 a_s·a_t, which cancels
//                              when the maps agree)                read 8·N·HW twice
//   at_grad_coef_kernel        one block per sample: g = dL/dv through the
//                              normalisation, times the upstream gradient
//                              (read on the device), in place of v
//   attention_map_grad_kernel  elementwise dL/df_ck = g_k · (p/C) · f_ck^(p−1)
//                                                  read N·C·HW·b, write N·C·HW·b
// so the forward reads each map once (the floor) and the backward twice.
//
// Layouts: NCHW-contiguous maps are read with a warp's lanes along 32
// consecutive positions and the block's warps splitting the channels
// (partial sums combined in shared memory, in a fixed order); channels_last
// maps with a warp per position and its lanes along the channels (a warp
// shuffle reduction). Both coalesce. Any other strides are copied to NCHW
// first, and gradients come back in the layout read, as on CPU.
//
// Everything is accumulated in float32 (float64 is refused); bf16 / fp16
// maps are widened as they are loaded. Every sum has a fixed order: results
// do not depend on the launch.
//
// Layout of this file: device code and raw-pointer launchers (no at::Tensor)
// first, then the ops (checks, outputs, device guard, stream) and their
// registration.
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
#include <tuple>

#include "../common/attention_transfer_op.h"
#include "block_reduce.cuh"
#include "float_dispatch.cuh"

namespace fastkd {
namespace cuda {
namespace {

// ---- device code --------------------------------------------------------------

constexpr int kWarp = 32;
constexpr int kMapWarps = 8;                     // warps per block of the map kernels
constexpr int kMapThreads = kWarp * kMapWarps;   // 256
constexpr int kRowThreads = 256;                 // per-sample kernels

// x^p by square-and-multiply (the products of the CPU kernel's pow_int).
__device__ __forceinline__ float pow_int(float x, int64_t p) {
  float r = 1.f, base = x;
  for (int64_t e = p; e > 0; e >>= 1) {
    if (e & 1) r *= base;
    base *= base;
  }
  return r;
}

// f^p; kP = 2 and kP = 1 are compiled as their own cases, kP = 0 takes p at
// run time.
template <int kP>
__device__ __forceinline__ float power(float x, int64_t p) {
  if constexpr (kP == 2) {
    return x * x;
  } else if constexpr (kP == 1) {
    return x;
  } else {
    return pow_int(x, p);
  }
}

// d(f^p)/df / p = f^(p−1).
template <int kP>
__device__ __forceinline__ float power_derivative_over_p(float x, int64_t p) {
  if constexpr (kP == 2) {
    return x;
  } else if constexpr (kP == 1) {
    return 1.f;
  } else {
    return p == 1 ? 1.f : pow_int(x, p - 1);
  }
}

// F.normalize's denominator max(‖v‖, eps), NaN kept.
__device__ __forceinline__ float clamp_norm(float norm, float eps) {
  return norm < eps ? eps : norm;
}

// v[n, k] = (1/C) Σ_c f[n, c, k]^p for NCHW maps. Work items are (sample,
// tile of 32 positions); lane → position, warp → channels warp, warp + 8, ...
template <int kP, class scalar_t>
__global__ void __launch_bounds__(kMapThreads) attention_map_nchw_kernel(
    const scalar_t* __restrict__ f,  // [N, C, HW] NCHW-contiguous
    float* __restrict__ v,           // [N, HW]
    int64_t samples, int64_t C, int64_t HW, int64_t p, float inv_c) {
  __shared__ float partial[kMapWarps][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t tiles = (HW + kWarp - 1) / kWarp;
  for (int64_t item = blockIdx.x; item < samples * tiles; item += gridDim.x) {
    const int64_t n = item / tiles;
    const int64_t k = (item % tiles) * kWarp + lane;
    float sum = 0.f;
    if (k < HW) {
      const scalar_t* column = f + n * C * HW + k;
      for (int64_t c = warp; c < C; c += kMapWarps) sum += power<kP>(static_cast<float>(column[c * HW]), p);
    }
    partial[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && k < HW) {
      float total = 0.f;
      for (int w = 0; w < kMapWarps; ++w) total += partial[w][lane];
      v[n * HW + k] = total * inv_c;
    }
    // partial is rewritten by the next item
    __syncthreads();
  }
}

// The same for channels_last maps. Work items are (sample, tile of 8
// positions); warp → position, lane → channels lane, lane + 32, ...
template <int kP, class scalar_t>
__global__ void __launch_bounds__(kMapThreads) attention_map_channels_last_kernel(
    const scalar_t* __restrict__ f,  // [N, HW, C] (channels_last)
    float* __restrict__ v,           // [N, HW]
    int64_t samples, int64_t C, int64_t HW, int64_t p, float inv_c) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t tiles = (HW + kMapWarps - 1) / kMapWarps;
  for (int64_t item = blockIdx.x; item < samples * tiles; item += gridDim.x) {
    const int64_t n = item / tiles;
    const int64_t k = (item % tiles) * kMapWarps + warp;
    // k is the same for the whole warp: every lane takes part in the shuffles
    if (k >= HW) continue;
    const scalar_t* run = f + (n * HW + k) * C;
    float sum = 0.f;
    for (int64_t c = lane; c < C; c += kWarp) sum += power<kP>(static_cast<float>(run[c]), p);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) v[n * HW + k] = sum * inv_c;
  }
}

// Per sample: ‖v_s‖, ‖v_t‖ and Σ_k (a_s − a_t)².
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) at_loss_kernel(
    const float* __restrict__ vs,  // [N, HW] student v
    const float* __restrict__ vt,  // [N, HW] teacher v
    float* __restrict__ s_norm,    // [N]
    float* __restrict__ t_norm,    // [N]
    float* __restrict__ row_loss,  // [N]
    int64_t samples, int64_t HW, float eps) {
  using Reduce2 = cub::BlockReduce<float2, BLOCK>;
  using Reduce1 = cub::BlockReduce<float, BLOCK>;
  __shared__ union {
    typename Reduce2::TempStorage pair;
    typename Reduce1::TempStorage single;
  } temp;
  __shared__ float2 pair_result;
  for (int64_t n = blockIdx.x; n < samples; n += gridDim.x) {
    const float* s = vs + n * HW;
    const float* t = vt + n * HW;
    float2 sq = make_float2(0.f, 0.f);
    for (int64_t k = threadIdx.x; k < HW; k += BLOCK) {
      sq.x += s[k] * s[k];
      sq.y += t[k] * t[k];
    }
    sq = block_all_reduce<BLOCK>(sq, SumOp2{}, temp.pair, pair_result);
    const float ns = sqrtf(sq.x), nt = sqrtf(sq.y);
    const float inv_s = 1.f / clamp_norm(ns, eps), inv_t = 1.f / clamp_norm(nt, eps);
    float acc = 0.f;
    for (int64_t k = threadIdx.x; k < HW; k += BLOCK) {
      const float d = s[k] * inv_s - t[k] * inv_t;
      acc += d * d;
    }
    acc = Reduce1(temp.single).Reduce(acc, SumOp{});
    if (threadIdx.x == 0) {
      s_norm[n] = ns;
      t_norm[n] = nt;
      row_loss[n] = acc;
    }
    // temp is reused by the next sample
    __syncthreads();
  }
}

// Per sample, in place of v: g = dL/dv. With ga = dL/da_s = −dL/da_t =
// upstream · 2 (a_s − a_t) / (N·HW), through a = v / max(‖v‖, eps):
//   g = (ga − a (a·ga)) / ‖v‖ where ‖v‖ >= eps, ga / eps otherwise
// (clamp_min passes the gradient at equality, as torch does).
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) at_grad_coef_kernel(
    float* __restrict__ vs,              // [N, HW] student v in, g_s out
    float* __restrict__ vt,              // [N, HW] teacher v in, g_t out
    const float* __restrict__ s_norm,    // [N] ‖v_s‖ from the forward
    const float* __restrict__ t_norm,    // [N] ‖v_t‖
    const float* __restrict__ upstream,  // [1] upstream gradient of L
    int64_t samples, int64_t HW, float factor,  // 2 / (N·HW)
    float eps) {
  using Reduce2 = cub::BlockReduce<float2, BLOCK>;
  __shared__ typename Reduce2::TempStorage temp;
  __shared__ float2 pair_result;
  const float f = upstream[0] * factor;
  for (int64_t n = blockIdx.x; n < samples; n += gridDim.x) {
    float* s = vs + n * HW;
    float* t = vt + n * HW;
    const float ns = s_norm[n], nt = t_norm[n];
    const float den_s = clamp_norm(ns, eps), den_t = clamp_norm(nt, eps);
    float2 dot = make_float2(0.f, 0.f);
    for (int64_t k = threadIdx.x; k < HW; k += BLOCK) {
      const float a_s = s[k] / den_s, a_t = t[k] / den_t;
      const float ga = f * (a_s - a_t);
      dot.x += a_s * ga;
      dot.y += a_t * ga;
    }
    // Both barriers inside: every thread has read its v before any is overwritten.
    dot = block_all_reduce<BLOCK>(dot, SumOp2{}, temp, pair_result);
    const float along_s = ns >= eps ? dot.x : 0.f;
    const float along_t = nt >= eps ? dot.y : 0.f;
    for (int64_t k = threadIdx.x; k < HW; k += BLOCK) {
      const float a_s = s[k] / den_s, a_t = t[k] / den_t;
      const float ga = f * (a_s - a_t);
      s[k] = (ga - a_s * along_s) / den_s;
      t[k] = (a_t * along_t - ga) / den_t;
    }
  }
}

// dL/df = g_k · (p/C) · f^(p−1), elementwise over each sample's C·HW elements
// in memory order (f and the gradient share the layout). Work items are
// (sample, chunk of kMapThreads elements); offsets inside a sample are 32-bit
// (the op refuses samples of 2^31 elements or more).
template <bool kChannelsLast, int kP, class scalar_t>
__global__ void __launch_bounds__(kMapThreads) attention_map_grad_kernel(
    const scalar_t* __restrict__ f,  // [N, C, H, W] NCHW- or channels_last-contiguous
    const float* __restrict__ g,     // [N, HW] dL/dv
    scalar_t* __restrict__ out,      // [N, C, H, W], the layout of f
    int64_t samples, int32_t C, int32_t HW, int64_t p, float scale) {  // scale = p / C
  const int32_t sample = C * HW;
  const int64_t chunks = (sample + kMapThreads - 1) / kMapThreads;
  for (int64_t item = blockIdx.x; item < samples * chunks; item += gridDim.x) {
    const int64_t n = item / chunks;
    const int64_t e64 = (item % chunks) * kMapThreads + threadIdx.x;
    if (e64 >= sample) continue;
    const auto e = static_cast<int32_t>(e64);
    const int32_t k = kChannelsLast ? e / C : e % HW;
    const int64_t at = n * sample + e;
    const float x = static_cast<float>(f[at]);
    out[at] = static_cast<scalar_t>(g[n * HW + k] * scale * power_derivative_over_p<kP>(x, p));
  }
}

// ---- launchers ----------------------------------------------------------------

// Work items beyond this many blocks are grid-strided.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(items, kMaxBlocks)));
}

// One map as the kernels read it.
struct MapArgs {
  const void* data;
  int64_t channels;
  bool channels_last;
};

// Calls f(std::integral_constant<int, kP>) with kP = 2 or 1 for those p, else 0.
template <class F>
void with_power(int64_t p, F&& f) {
  if (p == 2) {
    f(std::integral_constant<int, 2>{});
  } else if (p == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

template <class scalar_t>
void launch_attention_map(const MapArgs& m, float* v, int64_t samples, int64_t HW, int64_t p,
                          cudaStream_t stream) {
  const auto* f = static_cast<const scalar_t*>(m.data);
  const float inv_c = 1.f / static_cast<float>(m.channels);
  with_power(p, [&](auto power_tag) {
    constexpr int kP = decltype(power_tag)::value;
    if (m.channels_last) {
      const int64_t tiles = (HW + kMapWarps - 1) / kMapWarps;
      attention_map_channels_last_kernel<kP, scalar_t>
          <<<grid_for(samples * tiles), kMapThreads, 0, stream>>>(f, v, samples, m.channels, HW, p, inv_c);
    } else {
      const int64_t tiles = (HW + kWarp - 1) / kWarp;
      attention_map_nchw_kernel<kP, scalar_t>
          <<<grid_for(samples * tiles), kMapThreads, 0, stream>>>(f, v, samples, m.channels, HW, p, inv_c);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <class scalar_t>
void launch_attention_map_grad(const MapArgs& m, const float* g, void* out, int64_t samples, int64_t HW,
                               int64_t p, cudaStream_t stream) {
  const auto* f = static_cast<const scalar_t*>(m.data);
  auto* o = static_cast<scalar_t*>(out);
  const float scale = static_cast<float>(p) / static_cast<float>(m.channels);
  const int64_t chunks = (m.channels * HW + kMapThreads - 1) / kMapThreads;
  const unsigned grid = grid_for(samples * chunks);
  const auto C = static_cast<int32_t>(m.channels);
  const auto hw = static_cast<int32_t>(HW);
  with_power(p, [&](auto power_tag) {
    constexpr int kP = decltype(power_tag)::value;
    if (m.channels_last) {
      attention_map_grad_kernel<true, kP, scalar_t>
          <<<grid, kMapThreads, 0, stream>>>(f, g, o, samples, C, hw, p, scale);
    } else {
      attention_map_grad_kernel<false, kP, scalar_t>
          <<<grid, kMapThreads, 0, stream>>>(f, g, o, samples, C, hw, p, scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- the ops ------------------------------------------------------------------

void check_at_args(const at::Tensor& student, const at::Tensor& teacher, int64_t p, double eps) {
  attention::check_args(student, teacher, p, eps, at::kCUDA);
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastkd::attention_transfer on CUDA: maps must be float32, bfloat16 or float16 (the GPU "
              "kernels accumulate in float32), got ", dtype);
  constexpr int64_t kMaxSample = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(student.numel() / student.size(0) <= kMaxSample &&
                  teacher.numel() / teacher.size(0) <= kMaxSample,
              "maps of more than 2^31 - 1 elements per sample are not supported");
}

MapArgs map_args(const at::Tensor& x) {
  return {x.const_data_ptr(), x.size(1), attention::reads_channels_last(x)};
}

// v of both maps into two fresh (N, HW) float32 rows.
std::tuple<at::Tensor, at::Tensor> attention_maps(const at::Tensor& s, const at::Tensor& t, int64_t p,
                                                  cudaStream_t stream) {
  const int64_t n = s.size(0), hw = s.size(2) * s.size(3);
  at::Tensor v_s = at::empty({n, hw}, s.options().dtype(at::kFloat));
  at::Tensor v_t = at::empty({n, hw}, s.options().dtype(at::kFloat));
  dispatch_float_dtype(s.scalar_type(), "fastkd::attention_transfer", [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_attention_map<scalar_t>(map_args(s), v_s.mutable_data_ptr<float>(), n, hw, p, stream);
    launch_attention_map<scalar_t>(map_args(t), v_t.mutable_data_ptr<float>(), n, hw, p, stream);
  });
  return {v_s, v_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_transfer_forward_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, int64_t p, double eps) {
  check_at_args(student_in, teacher_in, p, eps);
  const c10::cuda::CUDAGuard device_guard(student_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor student = attention::readable(student_in), teacher = attention::readable(teacher_in);
  const int64_t n = student.size(0), hw = student.size(2) * student.size(3);
  const auto options = student.options().dtype(at::kFloat);
  at::Tensor s_norm = at::empty({n}, options);
  at::Tensor t_norm = at::empty({n}, options);
  at::Tensor row_loss = at::empty({n}, options);
  const auto [v_s, v_t] = attention_maps(student, teacher, p, stream);
  at_loss_kernel<kRowThreads><<<grid_for(n), kRowThreads, 0, stream>>>(
      v_s.const_data_ptr<float>(), v_t.const_data_ptr<float>(), s_norm.mutable_data_ptr<float>(),
      t_norm.mutable_data_ptr<float>(), row_loss.mutable_data_ptr<float>(), n, hw, static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Each sample's sum comes from one block; torch sums the N row losses.
  at::Tensor loss = row_loss.sum().div_(static_cast<double>(n) * static_cast<double>(hw));
  return {loss, s_norm, t_norm};
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student_in, const at::Tensor& teacher_in,
    const at::Tensor& s_norm, const at::Tensor& t_norm, int64_t p, double eps, bool student_grad,
    bool teacher_grad) {
  check_at_args(student_in, teacher_in, p, eps);
  attention::check_backward_args(grad, student_in, s_norm, t_norm, at::kFloat, at::kCUDA);
  const int64_t n = student_in.size(0), hw = student_in.size(2) * student_in.size(3);
  const c10::cuda::CUDAGuard device_guard(student_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor student = attention::readable(student_in), teacher = attention::readable(teacher_in);
  at::Tensor grad_s = attention::grad_buffer(student, student_grad);
  at::Tensor grad_t = attention::grad_buffer(teacher, teacher_grad);
  if (!student_grad && !teacher_grad) return {grad_s, grad_t};
  // The upstream gradient stays on the device: no host sync.
  const at::Tensor upstream = grad.reshape({1}).to(at::kFloat).contiguous();
  const at::Tensor s_norm_c = s_norm.contiguous(), t_norm_c = t_norm.contiguous();
  const auto [g_s, g_t] = attention_maps(student, teacher, p, stream);
  at_grad_coef_kernel<kRowThreads><<<grid_for(n), kRowThreads, 0, stream>>>(
      g_s.mutable_data_ptr<float>(), g_t.mutable_data_ptr<float>(), s_norm_c.const_data_ptr<float>(),
      t_norm_c.const_data_ptr<float>(), upstream.const_data_ptr<float>(), n, hw,
      static_cast<float>(2.0 / (static_cast<double>(n) * static_cast<double>(hw))), static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dispatch_float_dtype(student.scalar_type(), "fastkd::attention_transfer", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (student_grad) {
      launch_attention_map_grad<scalar_t>(map_args(student), g_s.const_data_ptr<float>(),
                                          grad_s.mutable_data_ptr(), n, hw, p, stream);
    }
    if (teacher_grad) {
      launch_attention_map_grad<scalar_t>(map_args(teacher), g_t.const_data_ptr<float>(),
                                          grad_t.mutable_data_ptr(), n, hw, p, stream);
    }
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("attention_transfer_forward", &fastkd::cuda::attention_transfer_forward_cuda);
  m.impl("attention_transfer_backward", &fastkd::cuda::attention_transfer_backward_cuda);
}
