// RKD distance and angle losses on CUDA: fastkd::rkd_distance_forward and
// fastkd::rkd_angle_forward for CUDA tensors (docs/spec.md §2). Same contract and the
// same formulation as the CPU ops (csrc/cpu/rkd.cpp, read its comments)
// and the Triton kernels (kernels/rkd.py): Gram matrices of the
// centred embeddings (at::mm), O(N²) memory, pairs that the Gram form cannot
// resolve recomputed from their differences, the student's gradient from the
// same call. float32 / bfloat16 / float16 inputs (widened to float32);
// float64 is refused, as by every GPU kernel here.
//
// Distance (float32 Gram), one thread block per row i, threads striding over j
// (coalesced along the row), one cub::BlockReduce per row:
//   pair_sq_kernel         ‖x_i − x_j‖² = G_ii + G_jj − 2 G_ij; pairs below
//                          factor · (G_ii + G_jj) (or NaN) recomputed by their
//                          thread from x_i − x_j; Σ_j d_ij         read G; write sq, near
//   distance_loss_kernel   ρ = d_s/μ_s − d_t/μ_t: Σ smooth_l1(ρ), Σ q d_s
//   distance_coef_kernel   C_ij = 2 (q − shift)/(μ_s d_ij), split into far
//                          (→ at::mm) and near pairs
//   near_grad_kernel       Σ_j C_ij (x_i − x_j) over the near pairs, from the
//                          differences (the matrix form would cancel); rows
//                          without near pairs only write zeros
// Traffic floor: the Gram matmuls, then a few passes over N² floats.
// The scalars between the passes (1/μ from float64 totals, the mean's share
// of ∂loss/∂ρ) stay float64 tensors on the device that the kernels read: no
// device → host synchronisation.
//
// Angle (float64 Gram split into float32 hi + lo halves): rkd_angle_kernel,
// one block per (32-row j-block, chunk of anchors). Lane l of every warp
// owns j = j0 + l, warp w owns the k = k0 + w + 8r (r < 8) of a 64-wide
// k-block, so the four [32, 64] tiles of G_s, G_t (hi, lo) sit in registers
// (32 floats per thread) while the block sweeps its anchors; per anchor, the
// anchor's rows (6 × 96 floats) are staged in shared memory, each thread
// evaluates 8 angles on both sides, and the sums over k per j (R and S, see
// below) are reduced across the 8 warps in shared memory and added to
// global memory by warp 0 (always the same thread for a given (i, j): no
// race, no atomics). The dG tile is accumulated in registers over the
// anchors and stored once per k-block into the chunk's partial copy.
// Every (j, k) pair is visited (twice the CPU kernel's k ≥ j), so that no
// block adds into another block's R and S rows. Then dG, dX = (dG + dGᵀ) X and
// the normalisers' part in float64 with ATen, as in rkd.cpp.
//
// Layout: device code, launchers, then the ops and their registration.
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

#include "../common/checks.h"
#include "../common/rkd_angle_grad.h"
#include "block_reduce.cuh"
#include "op_scope.cuh"

namespace fastkd {
namespace cuda {
namespace {

constexpr double kPdistEps = 1e-12;      // RepDistiller's clamp on squared distances
constexpr double kNormalizeEps = 1e-12;  // F.normalize's eps
constexpr double kEps32 = 1.1920928955078125e-07;
constexpr double kEps64 = 2.220446049250313e-16;

// Gram-form squared distances below factor · (‖x_i‖² + ‖x_j‖²) are recomputed
// from x_i − x_j: (eps / target)² for a distance accurate to `target`
// relative to the norms (rkd.cpp's near_factor): 1e-6 from the float32
// Gram (distance term), 1e-8 from the float64 Gram (angle normalisers).
constexpr double near_factor(double eps, double target) { return (eps / target) * (eps / target); }

constexpr int kRowThreads = 256;
// Rows beyond this many blocks are grid-strided.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// ---- device helpers -------------------------------------------------------------

__device__ __forceinline__ float fk_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double fk_sqrt(double x) { return sqrt(x); }

// max(x, floor) keeping NaN (fmax would drop it).
template <class T>
__device__ __forceinline__ T nan_max(T x, T floor) { return x < floor ? floor : x; }

// max(u, 0), NaN kept: 0 for the diagonal and coinciding samples (u < 0).
__device__ __forceinline__ float positive(float u) { return u < 0.f ? 0.f : u; }

// clamp(d, −1, 1), NaN kept: the smooth-L1 derivative (β = 1).
__device__ __forceinline__ float clamp_unit(float d) { return d > 1.f ? 1.f : (d < -1.f ? -1.f : d); }

// ½ d² for |d| < 1, |d| − ½ otherwise.
__device__ __forceinline__ float smooth_l1(float d) {
  const float ad = fabsf(d);
  return ad < 1.f ? 0.5f * d * d : ad - 0.5f;
}

// d_ij = sqrt(max(sq, 1e-12)), 0 on the diagonal.
__device__ __forceinline__ float distance(float sq, int64_t i, int64_t j) {
  return j == i ? 0.f : sqrtf(nan_max(sq, static_cast<float>(kPdistEps)));
}

// ---- RKD distance ------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kRowThreads) pair_sq_kernel(
    const T* __restrict__ gram,   // [n, n] Gram matrix of the centred rows
    const T* __restrict__ x,      // [n, d] the rows, contiguous (near pairs' differences)
    T* __restrict__ sq,           // [n, n] out: ‖x_i − x_j‖²
    uint8_t* __restrict__ near,   // [n, n] out: 1 where recomputed, and on the diagonal
    T* __restrict__ dsum,         // [n] out: Σ_{j ≠ i} sqrt(max(sq, 1e-12))
    int64_t n, int64_t d, T factor) {
  using Reduce = cub::BlockReduce<T, kRowThreads>;
  __shared__ typename Reduce::TempStorage temp;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const T g_ii = gram[i * n + i];
    const T* xi = x + i * d;
    T sum = 0;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const T norms = g_ii + gram[j * n + j];
      T s = norms - T(2) * gram[i * n + j];
      // NaN compares false: a NaN pair is near, and stays NaN
      const bool is_near = j != i && !(s >= factor * norms);
      if (is_near) {
        const T* xj = x + j * d;
        T direct = 0;
        for (int64_t c = 0; c < d; ++c) {
          const T diff = xj[c] - xi[c];
          direct += diff * diff;
        }
        s = direct;
      }
      sq[i * n + j] = s;
      near[i * n + j] = (is_near || j == i) ? 1 : 0;
      if (j != i) sum += fk_sqrt(nan_max(s, static_cast<T>(kPdistEps)));
    }
    const T total = Reduce(temp).Sum(sum);
    if (threadIdx.x == 0) dsum[i] = total;
    __syncthreads();  // temp is reused by the next row
  }
}

__global__ void __launch_bounds__(kRowThreads) distance_loss_kernel(
    const float* __restrict__ sq_s,  // [n, n] student squared distances
    const float* __restrict__ sq_t,  // [n, n] teacher squared distances
    float* __restrict__ loss_rows,   // [n] out: Σ_j smooth_l1(ρ_ij)
    float* __restrict__ qd_rows,     // [n] out: Σ_j q_ij d_s,ij
    const double* __restrict__ inv_mean,  // [2]: 1/μ_s, 1/μ_t
    int64_t n, float inv_n2) {
  using Reduce = cub::BlockReduce<float2, kRowThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const float inv_s = static_cast<float>(inv_mean[0]), inv_t = static_cast<float>(inv_mean[1]);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    float2 acc = make_float2(0.f, 0.f);
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const float d_s = distance(sq_s[i * n + j], i, j);
      const float d_t = distance(sq_t[i * n + j], i, j);
      // ρ = d_s/μ_s − d_t/μ_t;  q = clamp(ρ, −1, 1)/N², ∂(mean smooth_l1)/∂ρ
      const float rho = d_s * inv_s - d_t * inv_t;
      acc.x += smooth_l1(rho);
      acc.y += clamp_unit(rho) * inv_n2 * d_s;
    }
    const float2 total = Reduce(temp).Reduce(acc, SumOp2{});
    if (threadIdx.x == 0) {
      loss_rows[i] = total.x;
      qd_rows[i] = total.y;
    }
    __syncthreads();
  }
}

// `far` may alias `sq_t`: each element is read and then written by the same
// thread (no __restrict__ on either).
__global__ void __launch_bounds__(kRowThreads) distance_coef_kernel(
    const float* __restrict__ sq_s,   // [n, n] student squared distances
    const float* sq_t,                // [n, n] teacher squared distances
    const uint8_t* __restrict__ near, // [n, n] student near pairs (and diagonal)
    float* far,                       // [n, n] out: C_ij of the far pairs, 0 elsewhere
    float* __restrict__ close,        // [n, n] out: C_ij of the near pairs off the diagonal
    float* __restrict__ csum,         // [n] out: Σ_j far C_ij
    int* __restrict__ ncount,         // [n] out: near pairs of row i off the diagonal
    const double* __restrict__ inv_mean,  // [2]: 1/μ_s, 1/μ_t
    const double* __restrict__ shift_ptr, // []: Q/(μ_s N (N − 1)), the mean's share of ∂loss/∂ρ
    int64_t n, float inv_n2) {
  using Reduce = cub::BlockReduce<float2, kRowThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const float inv_s = static_cast<float>(inv_mean[0]), inv_t = static_cast<float>(inv_mean[1]);
  const float shift = static_cast<float>(*shift_ptr);
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    float2 acc = make_float2(0.f, 0.f);  // (Σ far C, near count)
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const int64_t e = i * n + j;
      const float s = sq_s[e];
      const float d_s = distance(s, i, j);
      const float d_t = distance(sq_t[e], i, j);
      const float q = clamp_unit(d_s * inv_s - d_t * inv_t) * inv_n2;
      // ∂loss/∂d_ij = (q − shift)/μ_s; x_i's gradient Σ_j C_ij (x_i − x_j) with
      // C = 2 ∂loss/∂d / d, 0 where the 1e-12 clamp holds d (and on the diagonal)
      const bool live = j != i && s > static_cast<float>(kPdistEps);
      const float c = live ? 2.f * inv_s * (q - shift) / d_s : 0.f;
      const bool is_near = j != i && near[e] != 0;
      far[e] = is_near ? 0.f : c;
      close[e] = is_near ? c : 0.f;
      acc.x += is_near ? 0.f : c;
      acc.y += is_near ? 1.f : 0.f;
    }
    const float2 total = Reduce(temp).Reduce(acc, SumOp2{});
    if (threadIdx.x == 0) {
      csum[i] = total.x;
      ncount[i] = static_cast<int>(total.y);
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kRowThreads) near_grad_kernel(
    const float* __restrict__ close,  // [n, n] C_ij of the near pairs, 0 elsewhere
    const int* __restrict__ ncount,   // [n]
    const float* __restrict__ x,      // [n, d] rows, contiguous
    float* __restrict__ grad,         // [n, d] out: Σ_j close_ij (x_i − x_j)
    int64_t n, int64_t d) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const bool any = ncount[i] > 0;  // the same for every thread of the block
    for (int64_t c = threadIdx.x; c < d; c += kRowThreads) {
      float acc = 0.f;
      if (any) {
        const float xi = x[i * d + c];
        for (int64_t j = 0; j < n; ++j) {
          const float cij = close[i * n + j];
          if (cij != 0.f || cij != cij) acc += cij * (xi - x[j * d + c]);  // NaN applied
        }
      }
      grad[i * d + c] = acc;
    }
  }
}

// ---- RKD angle ----------------------------------------------------------------------

constexpr int kAngleJ = 32;      // j-block: one lane each
constexpr int kAngleWarps = 8;
constexpr int kAngleKPerThread = 8;
constexpr int kAngleK = kAngleWarps * kAngleKPerThread;  // 64
constexpr int kAngleThreads = 32 * kAngleWarps;
constexpr int kAngleRow = kAngleJ + kAngleK;  // an anchor's staged row: js, then ks

struct AngleArgs {
  const float* gs_hi;  // [n, n] hi half of the student's float64 Gram matrix (centred rows)
  const float* gs_lo;  // [n, n] lo half: float(G − hi)
  const float* us;     // [n, n] signed inverse distances (0 diagonal, −1e12 coinciding)
  const float* gt_hi;  // teacher, likewise
  const float* gt_lo;
  const float* ut;
  float* d_part;       // [chunks, n, n] out: Σ_{i in chunk} W^(i)
  float* row_sums;     // [n, n] zeroed: R[i, j] = Σ_k W^(i)_jk
  float* ang_sums;     // [n, n] zeroed: S[i, j] = Σ_k g_ijk a_ijk
  double* loss_parts;  // [chunks, j_blocks] out: partial Σ smooth_l1
  int64_t n;
  int64_t anchors;     // per chunk
};

// The six [n, n] inputs in row_cache order (a switch, not a pointer array in local memory).
__device__ __forceinline__ const float* angle_source(const AngleArgs& a, int which) {
  switch (which) {
    case 0: return a.gs_hi;
    case 1: return a.gs_lo;
    case 2: return a.us;
    case 3: return a.gt_hi;
    case 4: return a.gt_lo;
    default: return a.ut;
  }
}

// (x_j − x_i)·(x_k − x_i) = G_jk − G_ik − G_ij + G_ii, the hi terms paired so
// that each difference cancels exactly where it cancels at all (Sterbenz):
// (G_jk − G_ik) + (G_ii − G_ij) when x_j is the nearer of x_j, x_k to x_i,
// (G_jk − G_ij) + (G_ii − G_ik) when x_k is; the small lo halves last
// (rkd_kernel.cpp's numerator()).
__device__ __forceinline__ float numerator(float jk_hi, float jk_lo, float ik_hi, float ik_lo, float ij_hi,
                                          float ij_lo, float ii_hi, float ii_lo, bool k_nearer) {
  const float hi = k_nearer ? (jk_hi - ij_hi) + (ii_hi - ik_hi) : (jk_hi - ik_hi) + (ii_hi - ij_hi);
  return hi + ((jk_lo - ik_lo) + (ii_lo - ij_lo));
}

template <bool kGrad>
__global__ void __launch_bounds__(kAngleThreads) rkd_angle_kernel(AngleArgs a) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t n = a.n;
  const int64_t j0 = int64_t(blockIdx.x) * kAngleJ;
  const int64_t j = j0 + lane;
  const bool j_in = j < n;
  const int64_t first = int64_t(blockIdx.y) * a.anchors;
  const int64_t last = first + a.anchors < n ? first + a.anchors : n;

  __shared__ float row_cache[6][kAngleRow];  // anchor i's rows at js and ks
  __shared__ float diag_cache[4];            // G_ii: student hi, lo; teacher hi, lo
  __shared__ float red[2][kAngleWarps][kAngleJ];

  double loss = 0.0;
  for (int64_t k0 = 0; k0 < n; k0 += kAngleK) {
    // This thread's 8 entries of the tiles; past n they are 0 (u = 0 there too).
    float s_hi[kAngleKPerThread], s_lo[kAngleKPerThread], t_hi[kAngleKPerThread], t_lo[kAngleKPerThread];
    float d_acc[kAngleKPerThread];
#pragma unroll
    for (int r = 0; r < kAngleKPerThread; ++r) {
      const int64_t k = k0 + warp + kAngleWarps * r;
      const bool in = j_in && k < n;
      const int64_t e = j * n + k;
      s_hi[r] = in ? a.gs_hi[e] : 0.f;
      s_lo[r] = in ? a.gs_lo[e] : 0.f;
      t_hi[r] = in ? a.gt_hi[e] : 0.f;
      t_lo[r] = in ? a.gt_lo[e] : 0.f;
      d_acc[r] = 0.f;
    }
    float tile_loss = 0.f;
    for (int64_t i = first; i < last; ++i) {
      const int64_t row = i * n;
      __syncthreads();  // the previous anchor's row_cache and red are consumed
      for (int t = threadIdx.x; t < 6 * kAngleRow; t += kAngleThreads) {
        const int which = t / kAngleRow, slot = t % kAngleRow;
        const int64_t col = slot < kAngleJ ? j0 + slot : k0 + (slot - kAngleJ);
        row_cache[which][slot] = col < n ? angle_source(a, which)[row + col] : 0.f;
      }
      if (threadIdx.x < 4) {
        // student hi, lo (sources 0, 1), teacher hi, lo (3, 4)
        diag_cache[threadIdx.x] = angle_source(a, threadIdx.x + (threadIdx.x >= 2 ? 1 : 0))[row + i];
      }
      __syncthreads();
      const float sij_hi = row_cache[0][lane], sij_lo = row_cache[1][lane], us_j = row_cache[2][lane];
      const float tij_hi = row_cache[3][lane], tij_lo = row_cache[4][lane], ut_j = row_cache[5][lane];
      const float fs_j = positive(us_j), ft_j = positive(ut_j);
      float w_sum = 0.f, s_sum = 0.f;
#pragma unroll
      for (int r = 0; r < kAngleKPerThread; ++r) {
        const int kk = kAngleJ + warp + kAngleWarps * r;
        const float us_k = row_cache[2][kk], ut_k = row_cache[5][kk];
        const float num_s = numerator(s_hi[r], s_lo[r], row_cache[0][kk], row_cache[1][kk], sij_hi, sij_lo,
                                      diag_cache[0], diag_cache[1], fabsf(us_k) > fabsf(us_j));
        const float num_t = numerator(t_hi[r], t_lo[r], row_cache[3][kk], row_cache[4][kk], tij_hi, tij_lo,
                                      diag_cache[2], diag_cache[3], fabsf(ut_k) > fabsf(ut_j));
        // a_ijk = num · u_ij · u_ik (0 where j or k coincides with i, or is i)
        const float ang_s = num_s * fs_j * positive(us_k);
        const float ang_t = num_t * ft_j * positive(ut_k);
        const float diff = ang_s - ang_t;
        tile_loss += smooth_l1(diff);
        if (kGrad) {
          const float g = clamp_unit(diff);
          // W = g |u_ij| |u_ik|: a coinciding j (or k) keeps F.normalize's
          // 1/eps derivative through the other factor; with both coinciding
          // the term has no derivative
          const float w = (us_j < 0.f && us_k < 0.f) ? 0.f : g * fabsf(us_j) * fabsf(us_k);
          d_acc[r] += w;
          w_sum += w;
          s_sum += g * ang_s;
        }
      }
      if (kGrad) {
        red[0][warp][lane] = w_sum;
        red[1][warp][lane] = s_sum;
        __syncthreads();
        if (warp == 0 && j_in) {
          float rw = 0.f, rs = 0.f;
#pragma unroll
          for (int w = 0; w < kAngleWarps; ++w) {
            rw += red[0][w][lane];
            rs += red[1][w][lane];
          }
          // (i, j) belongs to this block, and to lane `lane` of warp 0 alone
          a.row_sums[row + j] += rw;
          a.ang_sums[row + j] += rs;
        }
      }
    }
    loss += static_cast<double>(tile_loss);
    if (kGrad) {
      float* part = a.d_part + int64_t(blockIdx.y) * n * n;
#pragma unroll
      for (int r = 0; r < kAngleKPerThread; ++r) {
        const int64_t k = k0 + warp + kAngleWarps * r;
        if (j_in && k < n) part[j * n + k] = d_acc[r];
      }
    }
  }
  using Reduce = cub::BlockReduce<double, kAngleThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const double total = Reduce(temp).Sum(loss);
  if (threadIdx.x == 0) a.loss_parts[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = total;
}

// ---- launchers ------------------------------------------------------------------------

unsigned row_grid(int64_t n) { return static_cast<unsigned>(std::min(n, kMaxBlocks)); }

// (sq, near, Σ d) of the rows x [n, d] (contiguous, the Gram matrix's dtype); Σ d
// is a [] float64 tensor on the device (reading it here would synchronise).
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_sq(const at::Tensor& gram, const at::Tensor& x, double factor,
                                                   cudaStream_t stream) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor sq = at::empty_like(gram);
  at::Tensor near = at::empty({n, n}, x.options().dtype(at::kByte));
  at::Tensor dsum = at::empty({n}, gram.options());
  pair_sq_kernel<T><<<row_grid(n), kRowThreads, 0, stream>>>(
      gram.data_ptr<T>(), x.data_ptr<T>(), sq.data_ptr<T>(), near.data_ptr<uint8_t>(), dsum.data_ptr<T>(), n, d,
      static_cast<T>(factor));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sq, near, dsum.sum(at::kDouble)};
}

// Anchor chunks: enough blocks to fill a GPU (about 256 with the j-blocks), at
// most 8 partial dG copies, and those within 2^26 floats (256 MiB) unless one
// chunk alone exceeds it.
int64_t anchor_chunks(int64_t n, int64_t j_blocks) {
  const int64_t want = (256 + j_blocks - 1) / j_blocks;
  const int64_t fits = std::max<int64_t>(1, (int64_t(1) << 26) / (n * n));
  return std::max<int64_t>(1, std::min({want, fits, int64_t(8), n}));
}

// ---- the ops ----------------------------------------------------------------------------

void check_relational_args(const at::Tensor& student, const at::Tensor& teacher) {
  check_feature_pair_args(student, teacher, at::kCUDA);
  check_not_float64_on_cuda(student, "fastkd relational ops", "student");
}

// N = 1: no pair, loss 0 and gradient 0; a NaN (or inf) input still gives NaN.
std::tuple<at::Tensor, at::Tensor> single_sample(const at::Tensor& student, const at::Tensor& teacher,
                                                 bool student_grad) {
  const at::Tensor loss = (student.to(at::kFloat).sum() + teacher.to(at::kFloat).sum()).mul_(0);
  return {loss, student_grad ? at::zeros_like(student) : at::zeros({0, 0}, student.options())};
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_forward_cuda(const at::Tensor& student,
                                                             const at::Tensor& teacher, bool student_grad) {
  check_relational_args(student, teacher);
  const CudaOpScope scope(student);
  const int64_t n = student.size(0);
  if (n == 1) return single_sample(student, teacher, student_grad);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xs = student.to(at::kFloat).contiguous();
  const at::Tensor xt = teacher.to(at::kFloat).contiguous();
  const at::Tensor xs_c = xs - xs.mean(0, true);
  const at::Tensor xt_c = xt - xt.mean(0, true);
  const double factor = near_factor(kEps32, 1e-6);
  auto [sq_s, near_s, sum_s] = pair_sq<float>(at::mm(xs_c, xs_c.t()), xs, factor, stream);
  auto [sq_t, near_t, sum_t] = pair_sq<float>(at::mm(xt_c, xt_c.t()), xt, factor, stream);
  near_t.reset();
  const double pairs = double(n) * double(n - 1);
  // 1/μ from the float64 totals, on the device: the kernels read them
  const at::Tensor totals = at::stack({sum_s, sum_t});
  const at::Tensor inv_mean = at::full_like(totals, pairs).div_(totals);
  const double inv_n2 = 1.0 / (double(n) * double(n));
  const auto f32 = xs.options();
  at::Tensor loss_rows = at::empty({n}, f32), qd_rows = at::empty({n}, f32);
  distance_loss_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(
      sq_s.data_ptr<float>(), sq_t.data_ptr<float>(), loss_rows.data_ptr<float>(), qd_rows.data_ptr<float>(),
      inv_mean.data_ptr<double>(), n, static_cast<float>(inv_n2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor loss = loss_rows.sum(at::kDouble).mul_(inv_n2).to(at::kFloat);
  if (!student_grad) return {loss, at::zeros({0, 0}, student.options())};

  const at::Tensor shift = qd_rows.sum(at::kDouble).mul_(inv_mean[0]).div_(pairs);
  at::Tensor far = sq_t;  // overwritten element by element after it is read
  at::Tensor close = at::empty_like(sq_s);
  at::Tensor csum = at::empty({n}, f32);
  at::Tensor ncount = at::empty({n}, f32.dtype(at::kInt));
  distance_coef_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(
      sq_s.data_ptr<float>(), sq_t.data_ptr<float>(), near_s.data_ptr<uint8_t>(), far.data_ptr<float>(),
      close.data_ptr<float>(), csum.data_ptr<float>(), ncount.data_ptr<int>(), inv_mean.data_ptr<double>(),
      shift.data_ptr<double>(), n, static_cast<float>(inv_n2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t d = xs.size(1);
  at::Tensor grad = at::empty_like(xs);
  near_grad_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(
      close.data_ptr<float>(), ncount.data_ptr<int>(), xs.data_ptr<float>(), grad.data_ptr<float>(), n, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // far pairs: Σ_j C_ij (x_i − x_j) = x_i Σ_j C_ij − (C x)_i, on the centred rows
  grad.add_(xs_c * csum.unsqueeze(1)).sub_(at::mm(far, xs_c));
  return {loss, grad.to(student.scalar_type())};
}

// One side's angle-kernel inputs (rkd.cpp's angle_side): the centred
// rows in float64, their Gram matrix split into float32 hi + lo, and the
// signed inverse distances u (1 / max(e, 1e-12); −1e12 for distinct samples
// that coincide; 0 on the diagonal).
struct AngleSide {
  at::Tensor centred, hi, lo, u;
};

AngleSide angle_side(const at::Tensor& x, cudaStream_t stream) {
  const at::Tensor x64 = x.to(at::kDouble).contiguous();
  AngleSide side;
  side.centred = x64 - x64.mean(0, true);
  at::Tensor gram = at::mm(side.centred, side.centred.t());
  side.hi = gram.to(at::kFloat);
  side.lo = (gram - side.hi.to(at::kDouble)).to(at::kFloat);
  auto [sq, near, sum] = pair_sq<double>(gram, x64, near_factor(kEps64, 1e-8), stream);
  (void)sum;
  gram.reset();
  near.reset();
  sq.clamp_min_(0.0);  // NaN stays NaN
  at::Tensor u = at::where(sq == 0, -1.0 / kNormalizeEps, sq.sqrt().clamp_min_(kNormalizeEps).reciprocal_());
  u.fill_diagonal_(0.0);
  side.u = u.to(at::kFloat);
  return side;
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                          bool student_grad) {
  check_relational_args(student, teacher);
  const CudaOpScope scope(student);
  const int64_t n = student.size(0);
  if (n == 1) return single_sample(student, teacher, student_grad);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AngleSide s = angle_side(student, stream);
  AngleSide t = angle_side(teacher, stream);
  const int64_t j_blocks = (n + kAngleJ - 1) / kAngleJ;
  int64_t chunks = anchor_chunks(n, j_blocks);
  const int64_t anchors = (n + chunks - 1) / chunks;
  chunks = (n + anchors - 1) / anchors;
  const auto f32 = s.hi.options();
  at::Tensor loss_parts = at::empty({chunks, j_blocks}, f32.dtype(at::kDouble));
  at::Tensor d_part, row_sums, ang_sums;
  if (student_grad) {
    d_part = at::empty({chunks, n, n}, f32);
    row_sums = at::zeros({n, n}, f32);
    ang_sums = at::zeros({n, n}, f32);
  }
  AngleArgs args{s.hi.data_ptr<float>(), s.lo.data_ptr<float>(), s.u.data_ptr<float>(),
                 t.hi.data_ptr<float>(), t.lo.data_ptr<float>(), t.u.data_ptr<float>(),
                 student_grad ? d_part.data_ptr<float>() : nullptr,
                 student_grad ? row_sums.data_ptr<float>() : nullptr,
                 student_grad ? ang_sums.data_ptr<float>() : nullptr,
                 loss_parts.data_ptr<double>(), n, anchors};
  const dim3 grid(static_cast<unsigned>(j_blocks), static_cast<unsigned>(chunks));
  if (student_grad) {
    rkd_angle_kernel<true><<<grid, kAngleThreads, 0, stream>>>(args);
  } else {
    rkd_angle_kernel<false><<<grid, kAngleThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const double scale = 1.0 / (double(n) * double(n) * double(n));
  const at::Tensor loss = loss_parts.sum().mul_(scale).to(at::kFloat);
  if (!student_grad) return {loss, at::zeros({0, 0}, student.options())};
  t = AngleSide{};
  s.hi.reset();
  s.lo.reset();

  at::Tensor d_g = d_part.sum(0, false, at::kDouble);
  d_part.reset();
  const at::Tensor grad = rkd::angle_student_grad(std::move(d_g), row_sums, ang_sums, s.u, s.centred, scale);
  return {loss, grad.to(student.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("rkd_distance_forward", &fastkd::cuda::rkd_distance_forward_cuda);
  m.impl("rkd_angle_forward", &fastkd::cuda::rkd_angle_forward_cuda);
}
