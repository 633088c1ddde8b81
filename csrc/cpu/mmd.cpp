// CPU implementation of fastkd::mmd_forward / fastkd::mmd_backward (docs/spec.md §3):
// the squared MMD between samples x (N, D) and y (M, D) without the (N, N),
// (M, M) or (N, M) kernel matrices. Each op walks the rows of x (for the
// x–x and x–y terms) and then of y (for the y–y term) in tiles of
// `tile_rows` rows; one tile's kernel block (tile_rows × N or M), and a few
// temporaries of that size, are the only large allocations. The backward
// saves nothing: it recomputes each block from x and y. The work is ATen
// (at::mm / addmm for the dot products, elementwise exp), no SIMD of our own.
//
// For the distance kernels the samples are first shifted by a common centre,
// chosen so that every subtraction is exact (csrc/common/mmd_centre.h): the
// differences a − b, hence distances and gradients, are unchanged, but the
// rounding of ‖a‖² + ‖b‖² − 2 a·b, which scales with the norms, no longer
// grows with a common offset. The polynomial kernel is not
// translation-invariant and is computed on the samples as they are.
//
// Squared distances come from the norms, ‖a‖² + ‖b‖² − 2 a·b, clamped at 0.
// A point's distance to itself (the diagonal of a within-sample block) is set
// to exactly 0, as the reference's difference-based cdist gives it, so that
// k(a, a) is exact and the laplacian's derivative there is 0. The laplacian's
// derivative at any exact zero distance is defined as 0 (cdist's convention).
//
// The gaussian kernel, the common case, takes a faster path: the block's dot
// products from one GEMM, then one SIMD pass (csrc/cpu/mmd_kernel.cpp) that
// forms the distances and every bandwidth's exponential and either sums the
// block (forward, in double) or writes its gradient coefficients in place
// (backward). The other kernels use the ATen formulation below.
//
// bfloat16 / float16 inputs are upcast once and everything accumulates in
// float32; float64 inputs stay float64.
//
// The result does not depend on the number of threads: every reduction runs
// over chunks fixed by the shapes and combines them in a fixed order, and
// the elementwise ATen work (whose vectorised body and scalar tail may round
// exp or a fused multiply-add differently) runs over fixed row chunks too,
// each chunk single-threaded inside at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/mmd_op.h"
#include "thread_invariant_mm.h"
#include "capability.h"
#include "mmd_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

// Elements per chunk of the fixed-chunk loops below.
constexpr int64_t kChunkElements = 1 << 14;

// fn(r0, r1) over rows [0, rows) in chunks of a row count fixed by `cols`
// alone, the chunks spread over the threads. ATen ops inside fn run
// single-threaded (at::parallel_for marks its body a parallel region), so
// every element is computed the same way whatever the number of threads.
template <class F>
void for_row_chunks(int64_t rows, int64_t cols, const F& fn) {
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(cols, 1));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c * chunk, std::min(rows, (c + 1) * chunk));
  });
}

// Per-row sums of a contiguous 2-D tensor (of its squares when `squares`),
// each row in order in double; returned in t's dtype.
at::Tensor row_sums(const at::Tensor& t, bool squares = false) {
  const at::Tensor c = t.contiguous();
  const int64_t rows = c.size(0), cols = c.size(1);
  at::Tensor out = at::empty({rows}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "mmd_row_sums", [&] {
    const scalar_t* src = c.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for_row_chunks(rows, cols, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        double total = 0.0;
        const scalar_t* row = src + i * cols;
        for (int64_t j = 0; j < cols; ++j) total += squares ? double(row[j]) * double(row[j]) : double(row[j]);
        dst[i] = static_cast<scalar_t>(total);
      }
    });
  });
  return out;
}

// Σ of a 2-D tensor in double: per-row totals (row_sums' order), then the rows in order.
double ordered_sum(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const int64_t rows = c.size(0), cols = c.size(1);
  std::vector<double> totals(rows, 0.0);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "mmd_ordered_sum", [&] {
    const scalar_t* src = c.data_ptr<scalar_t>();
    for_row_chunks(rows, cols, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        double total = 0.0;
        for (int64_t j = 0; j < cols; ++j) total += double(src[i * cols + j]);
        totals[i] = total;
      }
    });
  });
  double total = 0.0;
  for (double v : totals) total += v;
  return total;
}

// Per-column sums of a contiguous (rows, cols) tensor, each column summed
// down the rows in order in double; in double.
at::Tensor column_sums(const at::Tensor& a) {
  const at::Tensor c = a.contiguous();
  const int64_t cols = c.size(1);
  at::Tensor out = at::zeros({cols}, c.options().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mmd_column_sums", [&] {
    // column chunks of a fixed width, each a task: the rows are walked in order
    constexpr int64_t kWidth = 64;
    const int64_t chunks = (cols + kWidth - 1) / kWidth;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      const scalar_t* src = c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < c.size(0); ++i) {
        for (int64_t j = begin * kWidth; j < std::min(cols, end * kWidth); ++j) {
          dst[j] += double(src[i * cols + j]);
        }
      }
    });
  });
  return out;
}

struct MmdParams {
  MmdKernel kernel;
  std::vector<double> bandwidths;
  int64_t degree;
  double c;
  bool unbiased;
  int64_t tile_rows;

  bool distance_based() const { return kernel != MmdKernel::kPolynomial; }
};

// The samples in the accumulation dtype and their squared row norms.
struct Samples {
  at::Tensor x, y, x_norm, y_norm;
};

Samples prepare(const at::Tensor& x, const at::Tensor& y, const MmdParams& p) {
  const auto acc = accumulation_type(x);
  Samples s{x.to(acc).contiguous(), y.to(acc).contiguous(), {}, {}};
  if (p.distance_based()) {
    std::tie(s.x, s.y) = mmd::exactly_centred(s.x, s.y);
    s.x_norm = row_sums(s.x, /*squares=*/true);
    s.y_norm = row_sums(s.y, /*squares=*/true);
  }
  return s;
}

// One block of the kernel between rows [start, start + a_tile.size(0)) of a
// sample and every row of b. `within`: b is that same sample (its diagonal
// is offset by `start`). Returns the kernel values K and, if `want_coef`,
// the gradient coefficients C with
//   d k(a_i, b_j) / d a_i = C_ij (a_i − b_j)   (distance kernels),
//   d k(a_i, b_j) / d a_i = C_ij b_j           (polynomial),
// C's within-sample diagonal set to 0 where its contribution is 0 (distance
// kernels: a_i − a_i = 0) or excluded (unbiased).
struct Block {
  at::Tensor k, coef;
  // Laplacian only: the (row, column) indices of the near pairs, whose
  // distance was recomputed from the difference (see refine_near_pairs);
  // their entries of `coef` are 0 and their gradient is near_pairs_grad's.
  at::Tensor near_rows, near_cols;
};

// Pairs per chunk when near pairs are handled from their differences
// (chunk × D temporaries).
int64_t near_chunk(int64_t d) { return std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(d, 1)); }

// The laplacian takes the square root of the squared distance, which turns
// the norm form's absolute rounding error eps·(‖a‖² + ‖b‖²) into an error of
// order sqrt(eps)·‖a‖ at small distances. Entries with
// sq < (eps / target)² · (‖a‖² + ‖b‖²) (target 1e-6 in float32, 1e-13 in
// float64: d below ~0.1·‖a‖, resp. ~0.002·‖a‖) are recomputed as ‖a − b‖²
// from the differences, which keeps the distance's error below about target
// times the norms. Returns their (row, column) indices.
std::pair<at::Tensor, at::Tensor> refine_near_pairs(at::Tensor& sq, const at::Tensor& a_tile,
                                                    const at::Tensor& a_norm_tile,
                                                    const at::Tensor& b, const at::Tensor& b_norm) {
  const bool dbl = sq.scalar_type() == at::kDouble;
  // machine epsilon / the distance error (relative to the norms) to stay under
  const double ratio = dbl ? 2.220446049250313e-16 / 1e-13 : 1.1920928955078125e-07 / 1e-6;
  const double factor = ratio * ratio;
  const at::Tensor near = sq < (a_norm_tile.unsqueeze(1) + b_norm.unsqueeze(0)).mul_(factor);
  const at::Tensor idx = near.nonzero();  // (P, 2)
  at::Tensor rows = idx.select(1, 0).contiguous();
  at::Tensor cols = idx.select(1, 1).contiguous();
  const int64_t pairs = rows.size(0);
  const int64_t chunk = near_chunk(a_tile.size(1));
  at::Tensor flat = sq.view({-1});
  // single-threaded ATen: the same result whatever the number of threads
  const c10::ParallelGuard serial(true);
  for (int64_t start = 0; start < pairs; start += chunk) {
    const int64_t len = std::min(chunk, pairs - start);
    const at::Tensor r = rows.narrow(0, start, len), c = cols.narrow(0, start, len);
    const at::Tensor exact = (a_tile.index_select(0, r) - b.index_select(0, c)).square_().sum(1);
    flat.index_put_({r * sq.size(1) + c}, exact);
  }
  return {rows, cols};
}

// The gaussian block through mmd_kernel.cpp: dots = a_tile bᵀ (one GEMM),
// then gaussian_block_sum (want_sum) or gaussian_block_coef, which turns dots
// into the coefficients C in place. Returns the sum (0 when !want_sum).
double gaussian_block(at::Tensor& dots, const at::Tensor& a_norm_tile, const at::Tensor& b_norm,
                      bool within, int64_t start, const MmdParams& p, bool want_sum) {
  double sum = 0.0;
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "mmd_gaussian_block", [&] {
    std::vector<scalar_t> exponents, slopes;
    for (double s : p.bandwidths) {
      exponents.push_back(static_cast<scalar_t>(mmd::finite_in(-0.5 / (s * s), dots.scalar_type())));
      slopes.push_back(static_cast<scalar_t>(mmd::finite_in(-1.0 / (s * s), dots.scalar_type())));
    }
    const GaussianBlockArgs<scalar_t> args{
        dots.data_ptr<scalar_t>(), dots.stride(0), a_norm_tile.data_ptr<scalar_t>(),
        b_norm.data_ptr<scalar_t>(), dots.size(0), dots.size(1), within ? start : -1,
        exponents.data(), slopes.data(), static_cast<int64_t>(exponents.size()), p.unbiased};
    using Args = GaussianBlockArgs<scalar_t>;
    if (want_sum) {
      using Sum = double (*)(const Args&);
      sum = pick_variant<Sum>(&AVX512::gaussian_block_sum, &AVX2::gaussian_block_sum,
                              &DEFAULT::gaussian_block_sum)(args);
    } else {
      run_kernel_variant<Args>(args, &AVX512::gaussian_block_coef, &AVX2::gaussian_block_coef,
                               &DEFAULT::gaussian_block_coef);
    }
  });
  return sum;
}

Block kernel_block(const at::Tensor& a_tile, const at::Tensor& a_norm_tile, const at::Tensor& b,
                   const at::Tensor& b_norm, bool within, int64_t start, const MmdParams& p,
                   bool want_k, bool want_coef) {
  Block out;
  if (p.kernel == MmdKernel::kGaussian && want_coef && !want_k) {
    out.coef = at::mm(a_tile, b.t());
    gaussian_block(out.coef, a_norm_tile, b_norm, within, start, p, /*want_sum=*/false);
    return out;
  }
  const int64_t cols = b.size(0);
  if (!p.distance_based()) {
    // u = a·b / c + 1; k = u^degree; dk/da = degree / c · u^(degree − 1) · b.
    at::Tensor u = at::mm(a_tile, b.t());
    if (want_coef) out.coef = at::empty_like(u);
    if (want_k) out.k = at::empty_like(u);
    for_row_chunks(u.size(0), cols, [&](int64_t r0, int64_t r1) {
      at::Tensor uc = u.narrow(0, r0, r1 - r0).mul_(1.0 / p.c).add_(1.0);
      if (want_coef) {
        at::Tensor coef = out.coef.narrow(0, r0, r1 - r0);
        if (p.degree == 1) {
          coef.fill_(1.0 / p.c);
        } else {
          at::pow_out(coef, uc, static_cast<double>(p.degree - 1))
              .mul_(static_cast<double>(p.degree) / p.c);
        }
      }
      if (want_k) {
        at::Tensor k = out.k.narrow(0, r0, r1 - r0);
        if (p.degree == 1) {
          k.copy_(uc);
        } else {
          at::pow_out(k, uc, static_cast<double>(p.degree));
        }
      }
    });
    if (want_coef && within && p.unbiased) at::diagonal(out.coef, start).zero_();
    if (want_k && within && p.unbiased) at::diagonal(out.k, start).zero_();
    return out;
  }
  // sq = ‖a‖² + ‖b‖² − 2 a·b, clamped at 0 (NaN stays NaN), exact 0 on the diagonal.
  at::Tensor sq = at::addmm(b_norm.unsqueeze(0), a_tile, b.t(), /*beta=*/1, /*alpha=*/-2);
  sq.add_(a_norm_tile.unsqueeze(1)).clamp_min_(0);
  if (within) at::diagonal(sq, start).zero_();
  const bool laplacian = p.kernel == MmdKernel::kLaplacian;
  if (laplacian) {
    std::tie(out.near_rows, out.near_cols) = refine_near_pairs(sq, a_tile, a_norm_tile, b, b_norm);
  }
  if (want_k) out.k = at::zeros_like(sq);
  if (want_coef) out.coef = at::zeros_like(sq);
  const auto type = sq.scalar_type();
  for_row_chunks(sq.size(0), cols, [&](int64_t r0, int64_t r1) {
    at::Tensor arg = sq.narrow(0, r0, r1 - r0);  // sq (gaussian) or d (laplacian)
    at::Tensor k = want_k ? out.k.narrow(0, r0, r1 - r0) : at::Tensor();
    at::Tensor coef = want_coef ? out.coef.narrow(0, r0, r1 - r0) : at::Tensor();
    at::Tensor inv_dist;
    if (laplacian) {
      arg.sqrt_();
      // 1/d, and 0 where d == 0 (the derivative of ‖a − b‖ taken as 0 there).
      if (want_coef) inv_dist = at::where(arg > 0, arg.reciprocal(), at::zeros({}, arg.options()));
    }
    at::Tensor term = at::empty_like(arg);
    for (double s : p.bandwidths) {
      // gaussian: k_σ = exp(−sq / (2σ²)), dk_σ/da = −k_σ / σ² · (a − b);
      // laplacian: k_σ = exp(−d / σ), dk_σ/da = −k_σ / (σ d) · (a − b).
      const double exponent = mmd::finite_in(laplacian ? -1.0 / s : -0.5 / (s * s), type);
      const double slope = mmd::finite_in(laplacian ? -1.0 / s : -1.0 / (s * s), type);
      at::mul_out(term, arg, exponent).exp_();
      if (want_k) k.add_(term);
      if (want_coef) coef.add_(term, slope);
    }
    if (want_coef && laplacian) coef.mul_(inv_dist);
  });
  if (want_coef) {
    if (laplacian) {
      out.coef.view({-1}).index_fill_(0, out.near_rows * out.coef.size(1) + out.near_cols, 0.0);
    }
    if (within) at::diagonal(out.coef, start).zero_();
  }
  if (want_k && within && p.unbiased) at::diagonal(out.k, start).zero_();
  return out;
}

// Σ_j d k(a_i, b_j) / d a_i for the rows i of a block: C-weighted.
at::Tensor row_side_grad(const at::Tensor& coef, const at::Tensor& a_tile, const at::Tensor& b,
                         const MmdParams& p) {
  if (!p.distance_based()) return thread_invariant_mm(coef, b);
  // Σ_j C_ij (a_i − b_j) = a_i Σ_j C_ij − (C b)_i
  at::Tensor out = thread_invariant_mm(coef, b);
  const at::Tensor coef_sum = row_sums(coef).unsqueeze(1);
  for_row_chunks(out.size(0), out.size(1), [&](int64_t r0, int64_t r1) {
    out.narrow(0, r0, r1 - r0).neg_().addcmul_(a_tile.narrow(0, r0, r1 - r0),
                                                coef_sum.narrow(0, r0, r1 - r0));
  });
  return out;
}

// The laplacian's near pairs (Block::near_rows / near_cols), from their
// differences: C_ij (a_i − b_j) with C_ij = Σ_σ −exp(−d/σ) / (σ d) (0 at d = 0)
// is bounded by Σ 1/σ, while the matrix form a_i Σ_j C_ij − (C b)_i would
// cancel two terms of size |C_ij|·‖a‖. Adds row_weight · C_ij (a_i − b_j) to
// row_out[i] and, if col_out is defined, col_weight · C_ij (b_j − a_i) to col_out[j].
void near_pairs_grad(const Block& blk, const at::Tensor& a_tile, const at::Tensor& b,
                     const MmdParams& p, at::Tensor& row_out, const at::Tensor& row_weight,
                     at::Tensor& col_out, const at::Tensor& col_weight) {
  const int64_t pairs = blk.near_rows.size(0);
  const int64_t chunk = near_chunk(a_tile.size(1));
  // single-threaded ATen: the same result whatever the number of threads
  const c10::ParallelGuard serial(true);
  for (int64_t start = 0; start < pairs; start += chunk) {
    const int64_t len = std::min(chunk, pairs - start);
    const at::Tensor r = blk.near_rows.narrow(0, start, len), c = blk.near_cols.narrow(0, start, len);
    at::Tensor diff = a_tile.index_select(0, r) - b.index_select(0, c);
    const at::Tensor dist = diff.square().sum(1).sqrt_();
    at::Tensor coef = at::zeros_like(dist);
    for (double s : p.bandwidths) {
      const double e = mmd::finite_in(-1.0 / s, dist.scalar_type());
      coef.add_(at::mul(dist, e).exp_(), e);
    }
    coef = at::where(dist > 0, coef / dist, at::zeros({}, dist.options()));
    diff.mul_(coef.unsqueeze(1));
    row_out.index_add_(0, r, diff * row_weight);
    if (col_out.defined()) col_out.index_add_(0, c, diff * (-col_weight));
  }
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

MmdParams make_params(int64_t kernel, at::ArrayRef<double> bandwidths, int64_t degree, double c,
                      bool unbiased, int64_t tile_rows) {
  return {static_cast<MmdKernel>(kernel), bandwidths.vec(), degree, c, unbiased, tile_rows};
}

at::Tensor narrow_or_empty(const at::Tensor& t, int64_t start, int64_t rows) {
  return t.defined() ? t.narrow(0, start, rows) : t;
}

at::Tensor mmd_forward_cpu(const at::Tensor& x, const at::Tensor& y, int64_t kernel,
                           at::ArrayRef<double> bandwidths, int64_t degree, double c,
                           bool unbiased, int64_t tile_rows) {
  check_mmd_args(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows, at::kCPU);
  const MmdParams p = make_params(kernel, bandwidths, degree, c, unbiased, tile_rows);
  const Samples s = prepare(x, y, p);
  const int64_t n = x.size(0), m = y.size(0);
  const Weights w = estimator_weights(n, m, unbiased);
  if (p.kernel == MmdKernel::kGaussian) {
    // Block sums in double, combined in double: the loss is a small
    // difference of three large means.
    double sum_xx = 0.0, sum_xy = 0.0, sum_yy = 0.0;
    for (int64_t start = 0; start < n; start += tile_rows) {
      const int64_t rows = std::min(tile_rows, n - start);
      const at::Tensor a = s.x.narrow(0, start, rows);
      const at::Tensor a_norm = s.x_norm.narrow(0, start, rows);
      at::Tensor dots_xx = at::mm(a, s.x.t());
      sum_xx += gaussian_block(dots_xx, a_norm, s.x_norm, true, start, p, true);
      at::Tensor dots_xy = at::mm(a, s.y.t());
      sum_xy += gaussian_block(dots_xy, a_norm, s.y_norm, false, start, p, true);
    }
    for (int64_t start = 0; start < m; start += tile_rows) {
      const int64_t rows = std::min(tile_rows, m - start);
      at::Tensor dots_yy = at::mm(s.y.narrow(0, start, rows), s.y.t());
      sum_yy += gaussian_block(dots_yy, s.y_norm.narrow(0, start, rows), s.y_norm, true, start, p, true);
    }
    return at::scalar_tensor(w.xx * sum_xx + w.yy * sum_yy - w.xy * sum_xy, s.x.options());
  }
  // Block sums in double, in a fixed order (ordered_sum), combined in double.
  double sum_xx = 0.0, sum_xy = 0.0, sum_yy = 0.0;
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    const at::Tensor a = s.x.narrow(0, start, rows);
    const at::Tensor a_norm = narrow_or_empty(s.x_norm, start, rows);
    sum_xx += ordered_sum(kernel_block(a, a_norm, s.x, s.x_norm, true, start, p, true, false).k);
    sum_xy += ordered_sum(kernel_block(a, a_norm, s.y, s.y_norm, false, start, p, true, false).k);
  }
  for (int64_t start = 0; start < m; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, m - start);
    const at::Tensor a = s.y.narrow(0, start, rows);
    const at::Tensor a_norm = narrow_or_empty(s.y_norm, start, rows);
    sum_yy += ordered_sum(kernel_block(a, a_norm, s.y, s.y_norm, true, start, p, true, false).k);
  }
  return at::scalar_tensor(w.xx * sum_xx + w.yy * sum_yy - w.xy * sum_xy, s.x.options());
}

std::tuple<at::Tensor, at::Tensor> mmd_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                    const at::Tensor& y, int64_t kernel,
                                                    at::ArrayRef<double> bandwidths,
                                                    int64_t degree, double c, bool unbiased,
                                                    int64_t tile_rows) {
  check_mmd_args(x, y, kernel, bandwidths, degree, c, unbiased, tile_rows, at::kCPU);
  CHECK_DEVICE_TYPE(grad, at::kCPU);
  TORCH_CHECK(grad.numel() == 1, "grad must have one element, got ", grad.numel());
  const MmdParams p = make_params(kernel, bandwidths, degree, c, unbiased, tile_rows);
  const Samples s = prepare(x, y, p);
  const int64_t n = x.size(0), m = y.size(0);
  const Weights w = estimator_weights(n, m, unbiased);
  // Σ k(x, x') is symmetric in its two arguments: each x_i appears in both,
  // so its gradient is twice the row side's.
  const at::Tensor g = grad.to(s.x.scalar_type()).reshape({});
  const at::Tensor g_xx = g * (2.0 * w.xx);
  const at::Tensor g_yy = g * (2.0 * w.yy);
  const at::Tensor g_xy = g * (-w.xy);

  at::Tensor grad_x = at::empty(s.x.sizes(), s.x.options());
  at::Tensor grad_y = at::empty(s.y.sizes(), s.y.options());
  // The column side of the cross term, Σ_i d k(x_i, y_j) / d y_j, accumulated over x tiles:
  //   distance kernels: Σ_i C_ij (y_j − x_i) = y_j Σ_i C_ij − (Cᵀ x)_j;  polynomial: (Cᵀ x)_j.
  at::Tensor cross_y = at::zeros(s.y.sizes(), s.y.options());
  at::Tensor cross_colsum = p.distance_based() ? at::zeros({m}, s.y.options().dtype(at::kDouble)) : at::Tensor();
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    const at::Tensor a = s.x.narrow(0, start, rows);
    const at::Tensor a_norm = narrow_or_empty(s.x_norm, start, rows);
    at::Tensor out = grad_x.narrow(0, start, rows);
    const Block xx = kernel_block(a, a_norm, s.x, s.x_norm, true, start, p, false, true);
    out.copy_(row_side_grad(xx.coef, a, s.x, p)).mul_(g_xx);
    const Block xy = kernel_block(a, a_norm, s.y, s.y_norm, false, start, p, false, true);
    out.add_(row_side_grad(xy.coef, a, s.y, p).mul_(g_xy));
    if (p.kernel == MmdKernel::kLaplacian) {
      at::Tensor none;
      near_pairs_grad(xx, a, s.x, p, out, g_xx, none, g_xx);
      near_pairs_grad(xy, a, s.y, p, out, g_xy, cross_y, at::ones({}, g.options()));
    }
    if (p.distance_based()) {
      cross_y.sub_(thread_invariant_mm(xy.coef.t(), a));
      cross_colsum.add_(column_sums(xy.coef));
    } else {
      cross_y.add_(thread_invariant_mm(xy.coef.t(), a));
    }
  }
  if (p.distance_based()) {
    const at::Tensor colsum = cross_colsum.to(s.y.scalar_type()).unsqueeze(1);
    for_row_chunks(m, s.y.size(1), [&](int64_t r0, int64_t r1) {
      cross_y.narrow(0, r0, r1 - r0).addcmul_(s.y.narrow(0, r0, r1 - r0), colsum.narrow(0, r0, r1 - r0));
    });
  }
  for (int64_t start = 0; start < m; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, m - start);
    const at::Tensor a = s.y.narrow(0, start, rows);
    const at::Tensor a_norm = narrow_or_empty(s.y_norm, start, rows);
    at::Tensor out = grad_y.narrow(0, start, rows);
    const Block yy = kernel_block(a, a_norm, s.y, s.y_norm, true, start, p, false, true);
    out.copy_(row_side_grad(yy.coef, a, s.y, p)).mul_(g_yy);
    if (p.kernel == MmdKernel::kLaplacian) {
      at::Tensor none;
      near_pairs_grad(yy, a, s.y, p, out, g_yy, none, g_yy);
    }
  }
  grad_y.add_(cross_y.mul_(g_xy));
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("mmd_forward", &fastkd::cpu::mmd_forward_cpu);
  m.impl("mmd_backward", &fastkd::cpu::mmd_backward_cpu);
}
