// CUDA implementation of fastkd::mmd_forward / fastkd::mmd_backward (docs/spec.md §3):
// the squared MMD between samples x (N, D) and y (M, D) without the (N, N),
// (M, M) or (N, M) kernel matrices. Same structure, arithmetic and rules as
// the CPU op (csrc/cpu/mmd.cpp), whose comments derive it:
//
// - Tiling: each op walks the rows of x (x–x and x–y terms), then of y (y–y),
//   in tiles of `tile_rows` rows. A tile's dot products a_i·b_j come from an
//   ATen GEMM (at::mm_out, i.e. cuBLAS) into one reused (tile_rows × max(N, M))
//   buffer; the custom kernels below turn that block into kernel sums
//   (forward) or gradient coefficients (backward), and the backward's
//   C b / Cᵀ a products are ATen GEMMs again. Memory is O(tile_rows ·
//   max(N, M)) for the block (twice that for the laplacian's near-pair
//   coefficients) plus O((N + M)·D); nothing is saved between the ops.
//   This is not one fused kernel: every tile costs a GEMM launch, one
//   elementwise/reduction kernel and a few ATen ops, and the block makes a
//   round trip through global memory (L2 for moderate tiles).
// - Distance kernels: the samples are first shifted by a common centre for
//   which every subtraction is exact (csrc/common/mmd_centre.h), so that the
//   norm form's rounding does not grow with a common offset.
// - Squared distances from the norms, ‖a‖² + ‖b‖² − 2 a·b clamped at 0 (NaN
//   stays NaN), exactly 0 for a point against itself (within-sample diagonal).
// - Laplacian near pairs (sq < (eps / target)² (‖a‖² + ‖b‖²), the CPU rule)
//   are recomputed from the differences inside the block kernel; in the
//   backward their coefficients go to a second block, and their gradient
//   C_ij (a_i − b_j) is summed from the differences by near_row_grad /
//   near_col_grad (one thread block per row / column, threads over D): no
//   index lists, no atomics. Those two kernels return at once unless the block
//   kernel raised the tile's near flag (read on the device, no host sync).
// - Gaussian summed over bandwidths; polynomial (a·b / c + 1)^degree.
//
// Precision: float32 for float32 / bfloat16 / float16 inputs (upcast once),
// float64 for float64, as on CPU; forward row sums in double, combined in
// double. The GEMMs follow torch's float32 matmul precision setting: with
// TF32 allowed (torch.backends.cuda.matmul.allow_tf32 / "high" precision)
// the distances lose about three digits. Row-sum reductions are in a fixed
// order: the results are deterministic for a given tile_rows.
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
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/mmd_op.h"
#include "op_scope.cuh"

namespace fastkd {
namespace cuda {
namespace {

// ---- device code --------------------------------------------------------------

__device__ __forceinline__ float fk_exp(float x) { return expf(x); }
__device__ __forceinline__ double fk_exp(double x) { return exp(x); }
__device__ __forceinline__ float fk_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double fk_sqrt(double x) { return sqrt(x); }

// u^e for an integer e >= 0 by squaring (1 for e = 0).
template <class T>
__device__ __forceinline__ T int_pow(T u, int64_t e) {
  T p = T(1);
  while (e > 0) {
    if (e & 1) p *= u;
    u *= u;
    e >>= 1;
  }
  return p;
}

// max(‖a‖² + ‖b‖² − 2 a·b, 0); NaN stays NaN (NaN < 0 is false).
template <class T>
__device__ __forceinline__ T squared_distance(T dot, T a_norm, T b_norm) {
  const T sq = a_norm + b_norm - T(2) * dot;
  return sq < T(0) ? T(0) : sq;
}

// Σ_d (a[d] − b[d])², the difference form of a near pair's squared distance.
template <class T>
__device__ __forceinline__ T exact_squared_distance(const T* __restrict__ a,
                                                    const T* __restrict__ b, int64_t dim) {
  T sq = T(0);
  for (int64_t d = 0; d < dim; ++d) {
    const T diff = a[d] - b[d];
    sq += diff * diff;
  }
  return sq;
}

// Everything the block kernel needs besides the block itself.
template <class T>
struct BlockArgs {
  const T* a;       // [rows, dim] the tile's rows, row stride lda, unit column stride
  int64_t lda;
  const T* a_norm;  // [rows] ‖a_i‖² (distance kernels)
  const T* b;       // [cols, dim] the other sample, row stride ldb
  int64_t ldb;
  const T* b_norm;  // [cols] ‖b_j‖²
  int64_t rows, cols, dim;
  int64_t diag;     // column of row 0's self-pair (within-sample blocks), −1 for cross blocks
  const T* exps;    // [n_exps] −1/(2σ²) (gaussian) or −1/σ (laplacian)
  int64_t n_exps;
  T inv_c, degree_over_c;
  int64_t degree;
  bool unbiased;
  T near_factor;    // laplacian near-pair threshold (eps / target)²
};

// One thread block per row of the tile (blocks grid-stride over rows), threads
// over the columns, so a warp reads consecutive dot products.
// SUM: row_sums[i] = Σ_j k(a_i, b_j) in double (self-pair left out when unbiased).
// !SUM: dots ← gradient coefficients C_ij (∂k/∂a_i = C_ij (a_i − b_j), or C_ij b_j
// for the polynomial), 0 on a within-sample diagonal where the contribution is 0
// or excluded; laplacian near pairs' C_ij go to near_coef instead (0 in dots) and
// raise *near_flag.
template <int BLOCK, MmdKernel KERNEL, bool SUM, class T>
__global__ void __launch_bounds__(BLOCK) _mmd_block_kernel(
    T* __restrict__ dots,            // [rows, cols] contiguous a_i·b_j (coefficients out if !SUM)
    T* __restrict__ near_coef,       // [rows, cols] contiguous, laplacian !SUM only, else nullptr
    int* __restrict__ near_flag,     // [1], laplacian !SUM only, else nullptr
    double* __restrict__ row_sums,   // [rows], SUM only, else nullptr
    BlockArgs<T> p) {
  static_assert(BLOCK % 32 == 0, "block size must be a whole number of warps");
  using Reduce = cub::BlockReduce<double, BLOCK>;
  __shared__ typename Reduce::TempStorage temp;

  for (int64_t i = blockIdx.x; i < p.rows; i += gridDim.x) {
    T* row = dots + i * p.cols;
    const int64_t self = p.diag < 0 ? -1 : p.diag + i;
    T a_norm = T(0);
    if constexpr (KERNEL != MmdKernel::kPolynomial) a_norm = p.a_norm[i];
    double acc = 0.0;
    int any_near = 0;
    for (int64_t j = threadIdx.x; j < p.cols; j += BLOCK) {
      const bool is_self = j == self;
      T k = T(0), coef = T(0), near_c = T(0);
      if constexpr (KERNEL == MmdKernel::kPolynomial) {
        // k = u^degree, ∂k/∂a = degree/c · u^(degree−1) · b with u = a·b/c + 1
        const T u = row[j] * p.inv_c + T(1);
        if constexpr (SUM) {
          k = int_pow(u, p.degree);
        } else {
          coef = p.degree_over_c * int_pow(u, p.degree - 1);
        }
        if (is_self && p.unbiased) k = coef = T(0);
      } else {
        const T b_norm = p.b_norm[j];
        T sq = is_self ? T(0) : squared_distance(row[j], a_norm, b_norm);
        bool near = false;
        if (KERNEL == MmdKernel::kLaplacian && !is_self && sq < p.near_factor * (a_norm + b_norm)) {
          sq = exact_squared_distance(p.a + i * p.lda, p.b + j * p.ldb, p.dim);
          near = true;
        }
        // gaussian: k = Σ exp(e sq), ∂k/∂a = Σ 2e exp(e sq) (a − b)
        // laplacian: k = Σ exp(e d), ∂k/∂a = Σ e exp(e d) / d (a − b), 0 at d = 0
        const T arg = KERNEL == MmdKernel::kLaplacian ? fk_sqrt(sq) : sq;
        T sum_k = T(0), sum_c = T(0);
        for (int64_t s = 0; s < p.n_exps; ++s) {
          const T e = p.exps[s];
          const T term = fk_exp(arg * e);
          sum_k += term;
          sum_c += (KERNEL == MmdKernel::kGaussian ? T(2) * e : e) * term;
        }
        if constexpr (SUM) {
          k = is_self && p.unbiased ? T(0) : sum_k;
        } else {
          coef = KERNEL == MmdKernel::kLaplacian ? (arg == T(0) ? T(0) : sum_c / arg) : sum_c;
          if (is_self) coef = T(0);  // a − a = 0
          if (near) {
            near_c = coef;
            coef = T(0);
            any_near = 1;
          }
        }
      }
      if constexpr (SUM) {
        acc += static_cast<double>(k);
      } else {
        row[j] = coef;
        if constexpr (KERNEL == MmdKernel::kLaplacian) near_coef[i * p.cols + j] = near_c;
      }
    }
    // The sum ends in a barrier every thread of the block reaches (the row
    // loop's bounds are uniform), so `temp` is free for the next row; so does
    // the laplacian's flag vote. The other coefficient blocks share nothing.
    if constexpr (SUM) {
      const double total = Reduce(temp).Sum(acc);
      if (threadIdx.x == 0) row_sums[i] = total;
      __syncthreads();
    } else if constexpr (KERNEL == MmdKernel::kLaplacian) {
      if (__syncthreads_or(any_near) && threadIdx.x == 0) atomicExch(near_flag, 1);
    }
  }
}

// out[i, :] += weight · Σ_j near_coef_ij (a_i − b_j): the row side of the near
// pairs' gradient from their differences. One block per row, threads over D.
template <int BLOCK, class T>
__global__ void __launch_bounds__(BLOCK) _mmd_near_row_grad_kernel(
    const int* __restrict__ near_flag, const T* __restrict__ near_coef,  // [rows, cols]
    const T* __restrict__ a, int64_t lda, const T* __restrict__ b, int64_t ldb,
    int64_t rows, int64_t cols, int64_t dim,
    T* __restrict__ out, int64_t ldo,  // [rows, dim]
    const T* __restrict__ weight) {    // 0-dim
  if (*near_flag == 0) return;  // the same value for every thread of the grid
  const T w = *weight;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const T* c_row = near_coef + i * cols;
    for (int64_t d = threadIdx.x; d < dim; d += BLOCK) {
      const T a_id = a[i * lda + d];
      T acc = T(0);
      for (int64_t j = 0; j < cols; ++j) {
        const T c = c_row[j];
        if (c != T(0)) acc += c * (a_id - b[j * ldb + d]);
      }
      out[i * ldo + d] += w * acc;
    }
  }
}

// out[j, :] += weight · Σ_i near_coef_ij (b_j − a_i): the column side (the
// cross term's gradient w.r.t. y). One block per column, threads over D.
template <int BLOCK, class T>
__global__ void __launch_bounds__(BLOCK) _mmd_near_col_grad_kernel(
    const int* __restrict__ near_flag, const T* __restrict__ near_coef,  // [rows, cols]
    const T* __restrict__ a, int64_t lda, const T* __restrict__ b, int64_t ldb,
    int64_t rows, int64_t cols, int64_t dim,
    T* __restrict__ out, int64_t ldo,  // [cols, dim]
    const T* __restrict__ weight) {
  if (*near_flag == 0) return;
  const T w = *weight;
  for (int64_t j = blockIdx.x; j < cols; j += gridDim.x) {
    for (int64_t d = threadIdx.x; d < dim; d += BLOCK) {
      const T b_jd = b[j * ldb + d];
      T acc = T(0);
      for (int64_t i = 0; i < rows; ++i) {
        const T c = near_coef[i * cols + j];
        if (c != T(0)) acc += c * (b_jd - a[i * lda + d]);
      }
      out[j * ldo + d] += w * acc;
    }
  }
}

// ---- launchers ----------------------------------------------------------------

// 256 threads stride a row of the block (up to max(N, M) columns); rows beyond
// kMaxBlocks blocks are grid-strided. The near-pair kernels put 128 threads
// over D (embedding widths of 64–1024).
constexpr int kBlockThreads = 256;
constexpr int kNearThreads = 128;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(items, kMaxBlocks)));
}

template <MmdKernel KERNEL, bool SUM, class T>
void launch_block(T* dots, T* near_coef, int* near_flag, double* row_sums, const BlockArgs<T>& args,
                  cudaStream_t stream) {
  _mmd_block_kernel<kBlockThreads, KERNEL, SUM, T><<<grid_for(args.rows), kBlockThreads, 0, stream>>>(
      dots, near_coef, near_flag, row_sums, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool SUM, class T>
void launch_block_for_kernel(MmdKernel kernel, T* dots, T* near_coef, int* near_flag, double* row_sums,
                             const BlockArgs<T>& args, cudaStream_t stream) {
  switch (kernel) {
    case MmdKernel::kGaussian:
      return launch_block<MmdKernel::kGaussian, SUM>(dots, near_coef, near_flag, row_sums, args, stream);
    case MmdKernel::kLaplacian:
      return launch_block<MmdKernel::kLaplacian, SUM>(dots, near_coef, near_flag, row_sums, args, stream);
    case MmdKernel::kPolynomial:
      return launch_block<MmdKernel::kPolynomial, SUM>(dots, near_coef, near_flag, row_sums, args, stream);
  }
  TORCH_CHECK(false, "fastkd::mmd on CUDA: unknown kernel ", static_cast<int>(kernel));
}

// ---- the ops ------------------------------------------------------------------

// The samples in the accumulation dtype (contiguous), their squared row norms
// (distance kernels), the exponents on the device, and the reused block buffers.
struct Problem {
  MmdKernel kernel;
  at::Tensor x, y, x_norm, y_norm, exps;
  int64_t degree;
  double c;
  bool unbiased;
  int64_t tile_rows;
  at::Tensor block, near_block;  // flat (tile_rows · max(N, M)); near_block: laplacian backward

  bool distance_based() const { return kernel != MmdKernel::kPolynomial; }
};

Problem prepare(const at::Tensor& x, const at::Tensor& y, int64_t kernel,
                at::ArrayRef<double> bandwidths, int64_t degree, double c, bool unbiased,
                int64_t tile_rows, bool backward) {
  const auto acc = accumulation_type(x);
  Problem p;
  p.kernel = static_cast<MmdKernel>(kernel);
  p.x = x.to(acc).contiguous();
  p.y = y.to(acc).contiguous();
  if (p.distance_based()) {
    // exact common shift: distances unchanged, norms independent of an offset
    std::tie(p.x, p.y) = mmd::exactly_centred(p.x, p.y);
    p.x_norm = p.x.square().sum(1);
    p.y_norm = p.y.square().sum(1);
  }
  std::vector<double> exps;
  if (p.distance_based()) {
    for (double s : bandwidths) {
      // held finite in the accumulation dtype (its slope 2e too): see mmd_centre.h
      const bool laplacian = p.kernel == MmdKernel::kLaplacian;
      exps.push_back(mmd::finite_in(laplacian ? -1.0 / s : -0.5 / (s * s), acc));
    }
  } else {
    exps.push_back(0.0);  // unread
  }
  p.exps = at::tensor(exps, at::TensorOptions().dtype(at::kDouble)).to(p.x.device(), acc);
  p.degree = degree;
  p.c = c;
  p.unbiased = unbiased;
  const int64_t widest = std::max(x.size(0), y.size(0));
  p.tile_rows = std::min(tile_rows, widest);
  p.block = at::empty({p.tile_rows * widest}, p.x.options());
  if (backward && p.kernel == MmdKernel::kLaplacian) {
    p.near_block = at::empty({p.tile_rows * widest}, p.x.options());
  }
  return p;
}

// The (rows, cols) view of a flat buffer's first rows · cols elements.
at::Tensor block_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

template <class T>
BlockArgs<T> block_args(const Problem& p, const at::Tensor& a, const at::Tensor& a_norm,
                        const at::Tensor& b, const at::Tensor& b_norm, bool within, int64_t start) {
  const bool dbl = std::is_same_v<T, double>;
  // machine epsilon / the distance error (relative to the norms) to stay under
  const double ratio = dbl ? 2.220446049250313e-16 / 1e-13 : 1.1920928955078125e-07 / 1e-6;
  BlockArgs<T> args;
  args.a = a.data_ptr<T>();
  args.lda = a.stride(0);
  args.a_norm = a_norm.defined() ? a_norm.data_ptr<T>() : nullptr;
  args.b = b.data_ptr<T>();
  args.ldb = b.stride(0);
  args.b_norm = b_norm.defined() ? b_norm.data_ptr<T>() : nullptr;
  args.rows = a.size(0);
  args.cols = b.size(0);
  args.dim = a.size(1);
  args.diag = within ? start : -1;
  args.exps = p.exps.data_ptr<T>();
  args.n_exps = p.exps.numel();
  args.inv_c = static_cast<T>(1.0 / p.c);
  args.degree_over_c = static_cast<T>(static_cast<double>(p.degree) / p.c);
  args.degree = p.degree;
  args.unbiased = p.unbiased;
  args.near_factor = static_cast<T>(ratio * ratio);
  return args;
}

at::Tensor narrow_or_empty(const at::Tensor& t, int64_t start, int64_t rows) {
  return t.defined() ? t.narrow(0, start, rows) : t;
}

// row_sums[i] = Σ_j k(a_i, b_j) for the rows of one tile.
void block_sums(const Problem& p, const at::Tensor& a, const at::Tensor& a_norm, const at::Tensor& b,
                const at::Tensor& b_norm, bool within, int64_t start, const at::Tensor& row_sums,
                cudaStream_t stream) {
  at::Tensor dots = block_view(p.block, a.size(0), b.size(0));
  at::mm_out(dots, a, b.t());
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "mmd_block_sums", [&] {
    const BlockArgs<scalar_t> args = block_args<scalar_t>(p, a, a_norm, b, b_norm, within, start);
    launch_block_for_kernel<true, scalar_t>(p.kernel, dots.data_ptr<scalar_t>(), nullptr, nullptr,
                                            row_sums.data_ptr<double>(), args, stream);
  });
}

// The gradient coefficients of one tile (see _mmd_block_kernel), and for the
// laplacian the near pairs' coefficients and flag.
struct CoefBlock {
  at::Tensor coef, near_coef, near_flag;
};

CoefBlock block_coef(const Problem& p, const at::Tensor& a, const at::Tensor& a_norm,
                     const at::Tensor& b, const at::Tensor& b_norm, bool within, int64_t start,
                     cudaStream_t stream) {
  CoefBlock out;
  out.coef = block_view(p.block, a.size(0), b.size(0));
  at::mm_out(out.coef, a, b.t());
  if (p.kernel == MmdKernel::kLaplacian) {
    out.near_coef = block_view(p.near_block, a.size(0), b.size(0));
    out.near_flag = at::zeros({1}, a.options().dtype(at::kInt));
  }
  AT_DISPATCH_FLOATING_TYPES(out.coef.scalar_type(), "mmd_block_coef", [&] {
    const BlockArgs<scalar_t> args = block_args<scalar_t>(p, a, a_norm, b, b_norm, within, start);
    launch_block_for_kernel<false, scalar_t>(
        p.kernel, out.coef.data_ptr<scalar_t>(),
        out.near_coef.defined() ? out.near_coef.data_ptr<scalar_t>() : nullptr,
        out.near_flag.defined() ? out.near_flag.data_ptr<int>() : nullptr, nullptr, args, stream);
  });
  return out;
}

// Σ_j ∂k(a_i, b_j)/∂a_i for the rows of a tile, C-weighted (near pairs excluded):
// distance kernels a_i Σ_j C_ij − (C b)_i, polynomial (C b)_i.
at::Tensor row_side_grad(const Problem& p, const at::Tensor& coef, const at::Tensor& a,
                         const at::Tensor& b) {
  if (!p.distance_based()) return at::mm(coef, b);
  return at::mm(coef, b).neg_().addcmul_(a, coef.sum(1, /*keepdim=*/true));
}

// Laplacian near pairs from their differences: out_rows[i] += row_weight · Σ_j C_ij (a_i − b_j)
// and, if out_cols is defined, out_cols[j] += col_weight · Σ_i C_ij (b_j − a_i).
void near_pairs_grad(const CoefBlock& blk, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& out_rows, const at::Tensor& row_weight,
                     const at::Tensor& out_cols, const at::Tensor& col_weight, cudaStream_t stream) {
  const int64_t rows = a.size(0), cols = b.size(0), dim = a.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mmd_near_pairs_grad", [&] {
    const int* flag = blk.near_flag.data_ptr<int>();
    const scalar_t* nc = blk.near_coef.data_ptr<scalar_t>();
    _mmd_near_row_grad_kernel<kNearThreads, scalar_t><<<grid_for(rows), kNearThreads, 0, stream>>>(
        flag, nc, a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(), b.stride(0), rows,
        cols, dim, out_rows.data_ptr<scalar_t>(), out_rows.stride(0), row_weight.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (out_cols.defined()) {
      _mmd_near_col_grad_kernel<kNearThreads, scalar_t><<<grid_for(cols), kNearThreads, 0, stream>>>(
          flag, nc, a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(), b.stride(0), rows,
          cols, dim, out_cols.data_ptr<scalar_t>(), out_cols.stride(0),
          col_weight.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// Within-sample and cross-sample weights of the estimator:
// loss = w_xx Σ k(x, x') + w_yy Σ k(y, y') − w_xy Σ k(x, y).
struct Weights {
  double xx, yy, xy;
};

Weights estimator_weights(int64_t n, int64_t m, bool unbiased) {
  const double nn = unbiased ? double(n) * double(n - 1) : double(n) * double(n);
  const double mm = unbiased ? double(m) * double(m - 1) : double(m) * double(m);
  return {1.0 / nn, 1.0 / mm, 2.0 / (double(n) * double(m))};
}

at::Tensor mmd_forward_cuda(const at::Tensor& x, const at::Tensor& y, int64_t kernel,
                            at::ArrayRef<double> bandwidths, int64_t degree, double c,
                            bool unbiased, int64_t tile_rows) {
  check_mmd_args(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows, at::kCUDA);
  const CudaOpScope scope(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Problem p = prepare(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows, false);
  const int64_t n = x.size(0), m = y.size(0);
  const Weights w = estimator_weights(n, m, unbiased);
  const auto sum_options = p.x.options().dtype(at::kDouble);
  const at::Tensor sums_xx = at::empty({n}, sum_options);
  const at::Tensor sums_xy = at::empty({n}, sum_options);
  const at::Tensor sums_yy = at::empty({m}, sum_options);
  for (int64_t start = 0; start < n; start += p.tile_rows) {
    const int64_t rows = std::min(p.tile_rows, n - start);
    const at::Tensor a = p.x.narrow(0, start, rows);
    const at::Tensor a_norm = narrow_or_empty(p.x_norm, start, rows);
    block_sums(p, a, a_norm, p.x, p.x_norm, true, start, sums_xx.narrow(0, start, rows), stream);
    block_sums(p, a, a_norm, p.y, p.y_norm, false, start, sums_xy.narrow(0, start, rows), stream);
  }
  for (int64_t start = 0; start < m; start += p.tile_rows) {
    const int64_t rows = std::min(p.tile_rows, m - start);
    block_sums(p, p.y.narrow(0, start, rows), narrow_or_empty(p.y_norm, start, rows), p.y, p.y_norm,
               true, start, sums_yy.narrow(0, start, rows), stream);
  }
  // In double: the loss is a small difference of three large means.
  return (sums_xx.sum() * w.xx + sums_yy.sum() * w.yy - sums_xy.sum() * w.xy).to(p.x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> mmd_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& y, int64_t kernel,
                                                     at::ArrayRef<double> bandwidths,
                                                     int64_t degree, double c, bool unbiased,
                                                     int64_t tile_rows) {
  check_mmd_args(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows, at::kCUDA);
  CHECK_DEVICE_TYPE(grad, at::kCUDA);
  CHECK_SAME_DEVICE(grad, x);
  TORCH_CHECK(grad.numel() == 1, "grad must have one element, got ", grad.numel());
  const CudaOpScope scope(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Problem p = prepare(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows, true);
  const int64_t n = x.size(0), m = y.size(0);
  const Weights w = estimator_weights(n, m, unbiased);
  // Σ k(x, x') has each x_i in both arguments: twice the row side's gradient.
  const at::Tensor g = grad.to(p.x.scalar_type()).reshape({});
  const at::Tensor g_xx = g * (2.0 * w.xx);
  const at::Tensor g_yy = g * (2.0 * w.yy);
  const at::Tensor g_xy = g * (-w.xy);
  const at::Tensor one = at::ones({}, g.options());
  const bool laplacian = p.kernel == MmdKernel::kLaplacian;
  const at::Tensor none;

  at::Tensor grad_x = at::empty(p.x.sizes(), p.x.options());
  at::Tensor grad_y = at::empty(p.y.sizes(), p.y.options());
  // The column side of the cross term, Σ_i ∂k(x_i, y_j)/∂y_j, accumulated over x tiles:
  //   distance kernels: Σ_i C_ij (y_j − x_i) = y_j Σ_i C_ij − (Cᵀ x)_j;  polynomial: (Cᵀ x)_j.
  at::Tensor cross_y = at::zeros(p.y.sizes(), p.y.options());
  at::Tensor cross_colsum = p.distance_based() ? at::zeros({m}, p.y.options()) : at::Tensor();
  for (int64_t start = 0; start < n; start += p.tile_rows) {
    const int64_t rows = std::min(p.tile_rows, n - start);
    const at::Tensor a = p.x.narrow(0, start, rows);
    const at::Tensor a_norm = narrow_or_empty(p.x_norm, start, rows);
    at::Tensor out = grad_x.narrow(0, start, rows);
    // The block buffers are reused: each block is consumed before the next is formed.
    const CoefBlock xx = block_coef(p, a, a_norm, p.x, p.x_norm, true, start, stream);
    out.copy_(row_side_grad(p, xx.coef, a, p.x)).mul_(g_xx);
    if (laplacian) near_pairs_grad(xx, a, p.x, out, g_xx, none, none, stream);
    const CoefBlock xy = block_coef(p, a, a_norm, p.y, p.y_norm, false, start, stream);
    out.add_(row_side_grad(p, xy.coef, a, p.y).mul_(g_xy));
    if (laplacian) near_pairs_grad(xy, a, p.y, out, g_xy, cross_y, one, stream);
    if (p.distance_based()) {
      cross_y.addmm_(xy.coef.t(), a, 1, -1);
      cross_colsum.add_(xy.coef.sum(0));
    } else {
      cross_y.addmm_(xy.coef.t(), a);
    }
  }
  if (p.distance_based()) cross_y.addcmul_(p.y, cross_colsum.unsqueeze(1));
  for (int64_t start = 0; start < m; start += p.tile_rows) {
    const int64_t rows = std::min(p.tile_rows, m - start);
    const at::Tensor a = p.y.narrow(0, start, rows);
    const at::Tensor a_norm = narrow_or_empty(p.y_norm, start, rows);
    at::Tensor out = grad_y.narrow(0, start, rows);
    const CoefBlock yy = block_coef(p, a, a_norm, p.y, p.y_norm, true, start, stream);
    out.copy_(row_side_grad(p, yy.coef, a, p.y)).mul_(g_yy);
    if (laplacian) near_pairs_grad(yy, a, p.y, out, g_yy, none, none, stream);
  }
  grad_y.add_(cross_y.mul_(g_xy));
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("mmd_forward", &fastkd::cuda::mmd_forward_cuda);
  m.impl("mmd_backward", &fastkd::cuda::mmd_backward_cuda);
}
