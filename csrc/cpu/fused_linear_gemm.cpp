// CPU implementation of fastkd::fused_linear_addmm_, the matrix products of
// fastkd.fused_linear_divergence: out = beta · out + a @ b with beta 0 or 1,
// bitwise the same for every thread count.
//
// Why not at::addmm: a BLAS gemm given several threads may split the
// reduction dimension K between them (MKL does when the output is small and K
// long, as for the hidden-state gradient, K = V), so the summation order, and
// with it the rounding, follows torch.set_num_threads. Here the output is cut
// into tiles whose sizes depend on the shapes only, and each tile is one gemm
// on one thread (MKL told so through its thread-local setting where MKL is
// present; oneDNN and OpenBLAS run single-threaded inside an active OpenMP
// region), so each output element is reduced in one order. When the output
// has too few tiles to share among threads and K is long, K is cut into fixed
// blocks as well: each block's product goes to its own float32 (float64)
// buffer and the buffers are added in block order, then rounded once.
//
// A float32 out takes bfloat16 / float16 operands as well (the fused head's
// logits and gradients are float32 for reduced-precision inputs): the
// products of two bfloat16 operands are summed in float32 by the brgemm
// micro-kernel (fused_linear_bf16_gemm.h), at the speed of a bfloat16 gemm,
// with no rounding of the result to bfloat16; other operands (float16, or a
// bfloat16 one with a float32 other, or where the micro-kernel is missing)
// are converted to float32 tile by tile (never as a whole).
//
//   out: [M, N], a: [M, K], b: [K, N]; floating dtypes (a and b: out's, or
//   bfloat16 / float16 with a float32 out), any strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "fused_linear_bf16_gemm.h"
#include "single_threaded_tasks.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 128;
constexpr int64_t kTileCols = 512;
// Below this many output tiles a K of at least kLongK is split too, so that
// the threads have work: into kKBlocks blocks, which depends on the shapes
// only and is a multiple of the usual thread counts (no thread waits alone on
// a last block: the hidden-state gradient at K = V = 32000 takes 10% less
// time on two threads in 16 blocks than in 7).
constexpr int64_t kMinTiles = 16;
constexpr int64_t kLongK = 8192;
constexpr int64_t kKBlocks = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// How each task multiplies: two bfloat16 operands with the brgemm
// micro-kernel (fused_linear_bf16_gemm.h); operands of out's dtype with
// ATen's addmm; any other pair converted to out's dtype (float16, or a
// bfloat16 one with a float32 other: tile by tile, never as a whole).
enum class Product { Same, Bf16, Converted };

Product product_kind(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type()) return Product::Same;
  if (a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && bf16_brgemm_available()) {
    return Product::Bf16;
  }
  return Product::Converted;
}

// out (+)= a @ b on the calling thread, by `kind` (and, for Bf16, the way
// bf16_out_in_place chose for the whole product)
void sequential_addmm(Product kind, bool bf16_in_place, at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                      double beta) {
  const auto acc = out.scalar_type();
  switch (kind) {
    case Product::Same: out.addmm_(a, b, beta, 1.0); return;
    case Product::Bf16: bf16_addmm(out, a, b, beta, bf16_in_place); return;
    case Product::Converted: out.addmm_(a.to(acc), b.to(acc), beta, 1.0); return;
  }
}

void tiled_addmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b_arg, double beta) {
  const int64_t m = out.size(0), n = out.size(1);
  const Product kind = product_kind(out, a, b_arg);
  const bool bf16 = kind == Product::Bf16;
  const bool in_place = bf16 && bf16_out_in_place(out, b_arg);
  // a bfloat16 product packs its operands' tiles once per task, so its tasks
  // are blocks of 4 × 4 tiles, and b is laid out as it reads b once for all
  const int64_t task_rows = bf16 ? 4 * kTileRows : kTileRows, task_cols = bf16 ? 4 * kTileCols : kTileCols;
  const at::Tensor b = bf16 ? bf16_operand_b(b_arg) : b_arg;
  const int64_t row_tasks = ceil_div(m, task_rows), col_tasks = ceil_div(n, task_cols);
  run_single_threaded_tasks(row_tasks * col_tasks, [&](int64_t task) {
    const int64_t r0 = (task / col_tasks) * task_rows, c0 = (task % col_tasks) * task_cols;
    const int64_t rows = std::min(task_rows, m - r0), cols = std::min(task_cols, n - c0);
    at::Tensor out_block = out.narrow(0, r0, rows).narrow(1, c0, cols);
    sequential_addmm(kind, in_place, out_block, a.narrow(0, r0, rows), b.narrow(1, c0, cols), beta);
  });
}

void k_split_addmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, int64_t blocks) {
  const auto acc = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t k = a.size(1);
  const int64_t block = ceil_div(k, blocks);
  at::Tensor partial = at::empty({blocks, out.size(0), out.size(1)}, out.options().dtype(acc));
  const Product kind = product_kind(partial, a, b);
  const bool in_place = kind == Product::Bf16 && bf16_out_in_place(partial.select(0, 0), b.narrow(0, 0, block));
  run_single_threaded_tasks(blocks, [&](int64_t i) {
    const int64_t k0 = i * block, len = std::min(block, k - k0);
    at::Tensor part = partial.select(0, i);
    if (len <= 0) {
      part.zero_();
      return;
    }
    sequential_addmm(kind, in_place, part, a.narrow(1, k0, len), b.narrow(0, k0, len), 0.0);
  });
  // block order, one element at a time: the same sum for any thread count
  at::Tensor total = beta == 0.0 ? partial.select(0, 0).clone() : out.to(acc).add_(partial.select(0, 0));
  for (int64_t i = 1; i < blocks; ++i) total.add_(partial.select(0, i));
  out.copy_(total);
}

void fused_linear_addmm_cpu(const at::Tensor& out_arg, const at::Tensor& a, const at::Tensor& b, double beta) {
  at::Tensor out = out_arg;
  CHECK_DIM(out, 2);
  CHECK_DIM(a, 2);
  CHECK_DIM(b, 2);
  TORCH_CHECK(a.size(0) == out.size(0) && b.size(1) == out.size(1) && a.size(1) == b.size(0), "a @ b must have ",
              "out's shape ", out.sizes(), ", got ", a.sizes(), " @ ", b.sizes());
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), "out must be floating point, got ", out.scalar_type());
  const auto operand_ok = [&](const at::Tensor& x) {
    return x.scalar_type() == out.scalar_type() || (out.scalar_type() == at::kFloat && is_reduced(x.scalar_type()));
  };
  TORCH_CHECK(operand_ok(a) && operand_ok(b), "a and b must have out's dtype ", out.scalar_type(),
              " (or bfloat16 / float16 with a float32 out), got ", a.scalar_type(), " and ", b.scalar_type());
  CHECK_DEVICE_TYPE(out, at::kCPU);
  CHECK_SAME_DEVICE(out, a);
  CHECK_SAME_DEVICE(out, b);
  TORCH_CHECK(beta == 0.0 || beta == 1.0, "beta must be 0 or 1, got ", beta);
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {
    if (beta == 0.0) out.zero_();
    return;
  }
  const int64_t tiles = ceil_div(out.size(0), kTileRows) * ceil_div(out.size(1), kTileCols);
  if (tiles < kMinTiles && a.size(1) >= kLongK) {
    k_split_addmm(out, a, b, beta, kKBlocks);
  } else {
    tiled_addmm(out, a, b, beta);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("fused_linear_addmm_", &fastkd::cpu::fused_linear_addmm_cpu);
}
