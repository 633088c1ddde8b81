// Self-attention relations (MiniLM) on CUDA: fastkd::attention_relation_forward
// / _backward for CUDA tensors (docs/spec.md §5.3). Same contracts and maths as
// the CPU ops (csrc/cpu/attention_relation.cpp) and the Triton launchers
// (kernels/attention_relation.py), flash-style: no (T, T) relation is stored.
//
// For batch element b and relation head a, X = states[b, :, a·d:(a+1)·d]
// (T × d, d = D / A) and z_ij = c · x_i · x_j with c = 1 / (√d · τ), one c per
// model; over the kept keys j of row i (mask[b, j], and j ≤ i when causal),
// R_i = softmax(z_i). Excluded keys get z = −inf.
//
//   forward    one block per (b·A + a, tile of kTile rows). It walks the key
//              tiles keeping, per row, the online statistics of RelationRow
//              (csrc/common/attention_relation_op.h): per model the running
//              max and l = Σ exp(z − shift), shift the max (0 while −inf), and
//              the KL's cross term relative to the shifts,
//                w = Σ e ((zt − shift_t) − (zs − shift_s)),  e = exp(zt − shift_t)
//              (a term with e = 0 is 0: 0 · log 0 = 0); then
//                KL_i = w / l_t − (log l_t − log l_s),
//              in which no term of the scores' size cancels. Writes lse_s,
//              lse_t as (shift, log l) pairs and KL per (b, a, row):
//              O(B · A · T) floats.
//   backward   with g_i the row's upstream gradient / A, recomputed per tile,
//              and log p = (zt − shift_t) − log l_t (likewise log q):
//                dzs_ij = g_i (q_ij − p_ij) c_s,
//                dzt_ij = g_i p_ij (log p_ij − log q_ij − KL_i) c_t   (0 where p_ij = 0),
//                dX = (dZ + dZᵀ) X                  (z depends on x_i and on x_j).
//              Two kernels write a float32 [B, T, D] buffer per model: the row
//              role dZ X (block per row tile, walking the key tiles), then the
//              column role dZᵀ X (block per key tile, walking the row tiles),
//              added to the row role's result. Each buffer element is written
//              by one thread of one block per kernel, in a fixed order: no
//              atomics, the gradients are deterministic.
//
// Tiles: a block of kThreads = 256 threads (8 warps) handles kTile = 32 rows
// against kTile = 32 keys. Warp w owns the tile rows w, w + 8, w + 16, w + 24
// and lane l the key (or channel) l, so a row's online softmax is a warp
// reduction and its statistics live in registers, the same in every lane.
// Dot products run over the head's channels in chunks of kChunk = 32, both
// operands staged in shared memory as float32 (bf16 / fp16 widened on load).
// Shared memory: four 32 × 33 float tiles, 16.9 KiB, static.
//
// Inputs are read through their strides (any layout); gradients come back
// contiguous in the input dtype. float32 accumulation; float64 is refused, as
// by every GPU kernel here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/attention_relation_op.h"
#include "../common/checks.h"
#include "float_dispatch.cuh"

namespace fastkd {
namespace cuda {
namespace {

// ---- device code ----------------------------------------------------------------

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarp * kWarps;      // 256
constexpr int kTile = kWarp;                  // rows and keys of a tile: one per lane
constexpr int kRowsPerWarp = kTile / kWarps;  // 4
constexpr int kChunk = kWarp;                 // channels per shared-memory chunk: one per lane
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kTile % kWarps == 0, "every warp owns the same number of tile rows");

// One model's vectors of one (b, a): x(t, c) = states[b, t, a·d + c], c < d.
template <class scalar_t>
struct HeadView {
  const scalar_t* base;  // &states[b, 0, a·d]
  int64_t stride_t, stride_d;
  int64_t width;  // d
};

template <class scalar_t>
__device__ __forceinline__ HeadView<scalar_t> head_view(const scalar_t* states, int64_t stride_b, int64_t stride_t,
                                                        int64_t stride_d, int64_t width, int64_t b, int64_t a) {
  return {states + b * stride_b + a * width * stride_d, stride_t, stride_d, width};
}

// The shared memory of every kernel here.
struct SharedTiles {
  float rows[kTile][kChunk + 1];  // a chunk of channels of kTile vectors (+1: no bank conflicts)
  float keys[kTile][kChunk + 1];
  float dzs[kTile][kTile + 1];    // the score gradients of a tile (backward)
  float dzt[kTile][kTile + 1];
};

// chunk[r][c] = x(first + r, c0 + c) as float32, 0 past T or past d.
template <class scalar_t>
__device__ __forceinline__ void load_chunk(const HeadView<scalar_t>& x, int64_t length, int64_t first, int64_t c0,
                                           float (*chunk)[kChunk + 1]) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    const int64_t t = first + r, channel = c0 + c;
    chunk[r][c] = (t < length && channel < x.width)
                      ? static_cast<float>(x.base[t * x.stride_t + channel * x.stride_d])
                      : 0.f;
  }
}

// dot[k] = x(i0 + r, ·) · x(j0 + lane, ·) for the tile rows r = warp + k·kWarps
// (0 past T). Every thread of the block must call it (barriers inside); it
// leaves sh.rows and sh.keys free (its last barrier).
template <class scalar_t>
__device__ __forceinline__ void dot_tile(const HeadView<scalar_t>& x, int64_t length, int64_t i0, int64_t j0,
                                         SharedTiles& sh, float (&dot)[kRowsPerWarp]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) dot[k] = 0.f;
  for (int64_t c0 = 0; c0 < x.width; c0 += kChunk) {
    load_chunk(x, length, i0, c0, sh.rows);
    load_chunk(x, length, j0, c0, sh.keys);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int r = warp + k * kWarps;
      float sum = dot[k];
      for (int c = 0; c < kChunk; ++c) sum += sh.rows[r][c] * sh.keys[lane][c];
      dot[k] = sum;
    }
    // the next chunk overwrites sh.rows and sh.keys
    __syncthreads();
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;  // the same in every lane: each step adds the same two values in every lane of a pair
}

// The warp's max; NaN entries are skipped here and reach l through exp(NaN − m).
__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// The problem, as the kernels read it.
template <class scalar_t>
struct RelationArgs {
  const scalar_t* student;  // [B, T, D_s], strides s_stride_*
  const scalar_t* teacher;  // [B, T, D_t], strides t_stride_*
  const bool* mask;         // [B, T] contiguous, or nullptr (every position kept)
  int64_t length, heads, width_s, width_t;
  int64_t s_stride_b, s_stride_t, s_stride_d, t_stride_b, t_stride_t, t_stride_d;
  float scale_s, scale_t;  // 1 / (√d · τ) of each model
  bool causal;

  __device__ __forceinline__ bool kept(int64_t b, int64_t t) const {
    return t < length && (mask == nullptr || mask[b * length + t]);
  }
  // may row i attend to key j (both kept, j ≤ i when causal)
  __device__ __forceinline__ bool keeps(int64_t b, int64_t i, int64_t j) const {
    return kept(b, i) && kept(b, j) && (!causal || j <= i);
  }
  __device__ __forceinline__ HeadView<scalar_t> student_head(int64_t b, int64_t a) const {
    return head_view(student, s_stride_b, s_stride_t, s_stride_d, width_s, b, a);
  }
  __device__ __forceinline__ HeadView<scalar_t> teacher_head(int64_t b, int64_t a) const {
    return head_view(teacher, t_stride_b, t_stride_t, t_stride_d, width_t, b, a);
  }
};

// Grid (B·A, ⌈T / kTile⌉): block (b·A + a, y) computes lse_s, lse_t and KL of
// rows y·kTile ... of head a of element b (0 for excluded rows).
template <class scalar_t>
__global__ void __launch_bounds__(kThreads) attention_relation_forward_kernel(
    RelationArgs<scalar_t> args,
    float* __restrict__ lse_s,  // [B, A, T, 2]: (shift, log l) per row
    float* __restrict__ lse_t,  // [B, A, T, 2]
    float* __restrict__ kl) {   // [B, A, T]
  __shared__ SharedTiles sh;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t b = blockIdx.x / args.heads, a = blockIdx.x % args.heads;
  const int64_t T = args.length;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const HeadView<scalar_t> xs = args.student_head(b, a), xt = args.teacher_head(b, a);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  using Row = attention_relation::RelationRow<float>;
  Row stats[kRowsPerWarp];  // the same in every lane of the warp
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) stats[k] = Row::empty();
  // causal rows of this tile see no key past its last row
  const int64_t key_end = args.causal ? (i0 + kTile < T ? i0 + kTile : T) : T;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    float dot_s[kRowsPerWarp], dot_t[kRowsPerWarp];
    dot_tile(xs, T, i0, j0, sh, dot_s);
    dot_tile(xt, T, i0, j0, sh, dot_t);
    const int64_t j = j0 + lane;
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int64_t i = i0 + warp + k * kWarps;
      const bool keep = args.keeps(b, i, j);
      const float zs = keep ? args.scale_s * dot_s[k] : neg_inf;
      const float zt = keep ? args.scale_t * dot_t[k] : neg_inf;
      stats[k].rebase(warp_max(zs), warp_max(zt));
      const float shift_s = stats[k].shift_s(), shift_t = stats[k].shift_t();
      const float e_t = Row::teacher_weight(zt, shift_t);
      stats[k].add(warp_sum(Row::student_weight(zs, shift_s)), warp_sum(e_t),
                   warp_sum(Row::cross_term(zs, zt, e_t, shift_s, shift_t)));
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int64_t i = i0 + warp + k * kWarps;
      if (i >= T) continue;
      const int64_t at = (b * args.heads + a) * T + i;
      // excluded rows keep the zeros the statistics start with
      if (args.kept(b, i)) stats[k].finish(lse_s + 2 * at, lse_t + 2 * at, kl + at);
    }
  }
}

// The statistics of the tile rows r = warp + k·kWarps (g = 0 for excluded rows):
// the split log-sum-exps (shift, log l) of both models, KL and g.
struct RowStats {
  float shift_s[kRowsPerWarp], log_sum_s[kRowsPerWarp], shift_t[kRowsPerWarp], log_sum_t[kRowsPerWarp];
  float kl[kRowsPerWarp], g[kRowsPerWarp];
};

template <class scalar_t>
__device__ __forceinline__ RowStats load_row_stats(const RelationArgs<scalar_t>& args, int64_t b, int64_t a,
                                                   int64_t i0, const float* lse_s, const float* lse_t,
                                                   const float* kl, const float* row_grad, float head_share) {
  const int warp = threadIdx.x / kWarp;
  RowStats stats;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t i = i0 + warp + k * kWarps;
    const bool row_kept = args.kept(b, i);
    const int64_t at = (b * args.heads + a) * args.length + i;
    stats.shift_s[k] = row_kept ? lse_s[2 * at] : 0.f;
    stats.log_sum_s[k] = row_kept ? lse_s[2 * at + 1] : 0.f;
    stats.shift_t[k] = row_kept ? lse_t[2 * at] : 0.f;
    stats.log_sum_t[k] = row_kept ? lse_t[2 * at + 1] : 0.f;
    stats.kl[k] = row_kept ? kl[at] : 0.f;
    stats.g[k] = row_kept ? row_grad[b * args.length + i] * head_share : 0.f;
  }
  return stats;
}

// sh.dzs, sh.dzt of the tile (rows i0 ..., keys j0 ...), the scales included;
// 0 where the pair is not kept. Ends with a barrier: the tiles are complete.
template <class scalar_t>
__device__ __forceinline__ void score_gradient_tile(const RelationArgs<scalar_t>& args, int64_t b, int64_t a,
                                                    int64_t i0, int64_t j0, const RowStats& stats,
                                                    SharedTiles& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float dot_s[kRowsPerWarp], dot_t[kRowsPerWarp];
  dot_tile(args.student_head(b, a), args.length, i0, j0, sh, dot_s);
  dot_tile(args.teacher_head(b, a), args.length, i0, j0, sh, dot_t);
  const int64_t j = j0 + lane;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int r = warp + k * kWarps;
    float dzs = 0.f, dzt = 0.f;
    if (args.keeps(b, i0 + r, j)) {
      const float log_q =
          attention_relation::log_relation(args.scale_s * dot_s[k], stats.shift_s[k], stats.log_sum_s[k]);
      const float log_p =
          attention_relation::log_relation(args.scale_t * dot_t[k], stats.shift_t[k], stats.log_sum_t[k]);
      const float p = expf(log_p);
      dzs = stats.g[k] * (expf(log_q) - p) * args.scale_s;
      // 0 · log 0 = 0: a key without teacher mass has no teacher gradient
      dzt = p == 0.f ? 0.f : stats.g[k] * p * (log_p - log_q - stats.kl[k]) * args.scale_t;
    }
    sh.dzs[r][lane] = dzs;
    sh.dzt[r][lane] = dzt;
  }
  __syncthreads();
}

// grad(out0 + o, ·) += Σ_n dz(o, n) · x(other0 + n, ·) over the tile's 32 n,
// with dz(o, n) = dz[o][n], or dz[n][o] when kTransposed; grad is one (b, a)'s
// block of a float32 [B, T, D] buffer: grad + t·D + c. Every thread of the
// block must call it (barriers inside); dz is read-only here.
template <bool kTransposed, class scalar_t>
__device__ __forceinline__ void add_tile_product(const float (*dz)[kTile + 1], const HeadView<scalar_t>& x,
                                                 int64_t length, int64_t other0, int64_t out0,
                                                 float* __restrict__ grad, int64_t D, SharedTiles& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t c0 = 0; c0 < x.width; c0 += kChunk) {
    load_chunk(x, length, other0, c0, sh.keys);
    __syncthreads();
    const int64_t channel = c0 + lane;
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int o = warp + k * kWarps;
      float sum = 0.f;
      for (int n = 0; n < kTile; ++n) sum += (kTransposed ? dz[n][o] : dz[o][n]) * sh.keys[n][lane];
      const int64_t t = out0 + o;
      // one thread owns this element in this kernel: a plain read-modify-write
      if (t < length && channel < x.width) grad[t * D + channel] += sum;
    }
    // the next chunk overwrites sh.keys
    __syncthreads();
  }
}

struct GradBuffers {
  float* student;  // [B, T, D_s] float32, zeros on entry of the row kernel; nullptr if not wanted
  float* teacher;  // [B, T, D_t]
  const float* lse_s;  // [B, A, T, 2]: (shift, log l) per row
  const float* lse_t;
  const float* kl;     // [B, A, T]
  const float* row_grad;  // [B, T]
  float head_share;       // 1 / A
};

// add_tile_product of the tile's dZ_s and dZ_t (sh.dzs, sh.dzt) into head a's
// columns of element b of each wanted gradient buffer ([B, T, D] float32).
template <bool kTransposed, class scalar_t>
__device__ __forceinline__ void add_head_gradients(const RelationArgs<scalar_t>& args, const GradBuffers& out,
                                                   int64_t b, int64_t a, int64_t other0, int64_t out0,
                                                   SharedTiles& sh) {
  const int64_t T = args.length, D_s = args.width_s * args.heads, D_t = args.width_t * args.heads;
  if (out.student != nullptr) {
    add_tile_product<kTransposed>(sh.dzs, args.student_head(b, a), T, other0, out0,
                                  out.student + b * T * D_s + a * args.width_s, D_s, sh);
  }
  if (out.teacher != nullptr) {
    add_tile_product<kTransposed>(sh.dzt, args.teacher_head(b, a), T, other0, out0,
                                  out.teacher + b * T * D_t + a * args.width_t, D_t, sh);
  }
}

// Grid (B·A, ⌈T / kTile⌉): block (b·A + a, y) adds the row role dZ X for rows
// y·kTile ... of head a of element b, walking the key tiles.
template <class scalar_t>
__global__ void __launch_bounds__(kThreads) attention_relation_backward_rows_kernel(RelationArgs<scalar_t> args,
                                                                                    GradBuffers out) {
  __shared__ SharedTiles sh;
  const int64_t b = blockIdx.x / args.heads, a = blockIdx.x % args.heads;
  const int64_t T = args.length;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const RowStats stats = load_row_stats(args, b, a, i0, out.lse_s, out.lse_t, out.kl, out.row_grad, out.head_share);
  const int64_t key_end = args.causal ? (i0 + kTile < T ? i0 + kTile : T) : T;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    score_gradient_tile(args, b, a, i0, j0, stats, sh);
    add_head_gradients<false>(args, out, b, a, j0, i0, sh);
    // the next tile overwrites sh.dzs and sh.dzt
    __syncthreads();
  }
}

// Grid (B·A, ⌈T / kTile⌉): block (b·A + a, y) adds the column role dZᵀ X for
// keys y·kTile ... of head a of element b, walking the row tiles. Runs after
// the row kernel (same stream), so its additions follow the row role's.
template <class scalar_t>
__global__ void __launch_bounds__(kThreads) attention_relation_backward_cols_kernel(RelationArgs<scalar_t> args,
                                                                                    GradBuffers out) {
  __shared__ SharedTiles sh;
  const int64_t b = blockIdx.x / args.heads, a = blockIdx.x % args.heads;
  const int64_t T = args.length;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  // causal: rows i < j0 see no key of this tile (row and key tiles are aligned)
  for (int64_t i0 = args.causal ? j0 : 0; i0 < T; i0 += kTile) {
    const RowStats stats =
        load_row_stats(args, b, a, i0, out.lse_s, out.lse_t, out.kl, out.row_grad, out.head_share);
    score_gradient_tile(args, b, a, i0, j0, stats, sh);
    add_head_gradients<true>(args, out, b, a, i0, j0, sh);
    __syncthreads();
  }
}

// ---- the ops ------------------------------------------------------------------

// Tiles along T are grid.y blocks (at most 65535).
constexpr int64_t kMaxLength = int64_t(65535) * kTile;

// The common checks, then the CUDA kernels' limits: no float64 (float32
// accumulation) and T, B·A within the grid.
void check_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t heads,
                  const std::optional<at::Tensor>& mask, double temperature) {
  attention_relation::check_args(student, teacher, heads, mask, temperature, at::kCUDA);
  check_not_float64_on_cuda(student, "fastkd::attention_relation", "student_states");
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "student_states must be float32, bfloat16 or float16 on CUDA, got ", dtype);
  TORCH_CHECK(student.size(1) <= kMaxLength, "sequences longer than ", kMaxLength,
              " are not supported on CUDA, got ", student.size(1));
  TORCH_CHECK(student.size(0) * heads <= std::numeric_limits<int32_t>::max(),
              "B * num_relation_heads must be below 2^31 on CUDA");
}

template <class scalar_t>
RelationArgs<scalar_t> relation_args(const at::Tensor& student, const at::Tensor& teacher, int64_t heads,
                                     const at::Tensor& mask, bool causal, double temperature) {
  const int64_t width_s = student.size(2) / heads, width_t = teacher.size(2) / heads;
  return {static_cast<const scalar_t*>(student.const_data_ptr()),
          static_cast<const scalar_t*>(teacher.const_data_ptr()),
          mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
          student.size(1), heads, width_s, width_t,
          student.stride(0), student.stride(1), student.stride(2),
          teacher.stride(0), teacher.stride(1), teacher.stride(2),
          static_cast<float>(1.0 / (std::sqrt(static_cast<double>(width_s)) * temperature)),
          static_cast<float>(1.0 / (std::sqrt(static_cast<double>(width_t)) * temperature)),
          causal};
}

dim3 grid_for(int64_t batch, int64_t heads, int64_t length) {
  return dim3(static_cast<unsigned>(batch * heads), static_cast<unsigned>((length + kTile - 1) / kTile));
}

at::Tensor contiguous_mask(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->contiguous() : at::Tensor();
}

// Returns (rows [B, T]: head-mean KL, 0 for excluded rows; lse_student, lse_teacher [B, A, T, 2]: split
// log-sum-exps (shift, log l); head_kl [B, A, T]), float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_relation_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, int64_t heads, const std::optional<at::Tensor>& mask,
    bool causal, double temperature) {
  check_inputs(student, teacher, heads, mask, temperature);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = student.size(0), length = student.size(1);
  const attention_relation::RelationStats stats(student, heads, at::kFloat);
  if (batch * length > 0) {
    const at::Tensor kept = contiguous_mask(mask);
    dispatch_float_dtype(student.scalar_type(), "fastkd::attention_relation", [&](auto tag) {
      using scalar_t = decltype(tag);
      attention_relation_forward_kernel<scalar_t><<<grid_for(batch, heads, length), kThreads, 0, stream>>>(
          relation_args<scalar_t>(student, teacher, heads, kept, causal, temperature),
          stats.lse_s.mutable_data_ptr<float>(), stats.lse_t.mutable_data_ptr<float>(),
          stats.head_kl.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return stats.outputs();
}

// Returns (grad_student [B, T, D_s] or [0], grad_teacher [B, T, D_t] or [0]) in the input dtype, contiguous.
std::tuple<at::Tensor, at::Tensor> attention_relation_backward_cuda(
    const at::Tensor& row_grad, const at::Tensor& student, const at::Tensor& teacher, int64_t heads,
    const std::optional<at::Tensor>& mask, bool causal, double temperature, const at::Tensor& lse_s,
    const at::Tensor& lse_t, const at::Tensor& head_kl, bool student_grad, bool teacher_grad) {
  check_inputs(student, teacher, heads, mask, temperature);
  const int64_t batch = student.size(0), length = student.size(1);
  attention_relation::check_backward_args(row_grad, student, heads, lse_s, lse_t, head_kl, at::kFloat);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_s = attention_relation::zero_gradient(student, at::kFloat, student_grad);
  at::Tensor grad_t = attention_relation::zero_gradient(teacher, at::kFloat, teacher_grad);
  if ((student_grad || teacher_grad) && batch * length > 0) {
    const at::Tensor kept = contiguous_mask(mask);
    const at::Tensor g = row_grad.to(at::kFloat).contiguous();
    const at::Tensor ls = lse_s.contiguous(), lt = lse_t.contiguous(), kl = head_kl.contiguous();
    const GradBuffers buffers{student_grad ? grad_s.mutable_data_ptr<float>() : nullptr,
                              teacher_grad ? grad_t.mutable_data_ptr<float>() : nullptr,
                              ls.const_data_ptr<float>(),
                              lt.const_data_ptr<float>(),
                              kl.const_data_ptr<float>(),
                              g.const_data_ptr<float>(),
                              static_cast<float>(1.0 / static_cast<double>(heads))};
    const dim3 grid = grid_for(batch, heads, length);
    dispatch_float_dtype(student.scalar_type(), "fastkd::attention_relation", [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto args = relation_args<scalar_t>(student, teacher, heads, kept, causal, temperature);
      attention_relation_backward_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args, buffers);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      attention_relation_backward_cols_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(args, buffers);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return attention_relation::backward_outputs(student, teacher, grad_s, grad_t, student_grad, teacher_grad);
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("attention_relation_forward", &fastkd::cuda::attention_relation_forward_cuda);
  m.impl("attention_relation_backward", &fastkd::cuda::attention_relation_backward_cuda);
}
