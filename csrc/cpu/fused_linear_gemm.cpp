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
//
// A float32 out takes bfloat16 / float16 operands as well (the fused head's
// logits and gradients are float32 for reduced-precision inputs): the products
// of two bfloat16 (float16) operands are summed in float32 by
// at::native::cpublas::brgemm, at the speed of a bfloat16 gemm, with no
// rounding of the result to bfloat16; an operand whose dtype differs from the
// other's is converted to float32 tile by tile (never as a whole).
//
//   out: [M, N], a: [M, K], b: [K, N]; floating dtypes (a and b: out's, or
//   bfloat16 / float16 with a float32 out), any strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "single_threaded_tasks.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 128;
constexpr int64_t kTileCols = 512;
// Below this many output tiles a long K is split too, so that the threads
// have work; the split depends on the shapes only.
constexpr int64_t kMinTiles = 16;
constexpr int64_t kKBlock = 4096;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// scratch [cols, rows] = b_tileᵀ @ a_tileᵀ in float32, both operands bfloat16
// (float16): brgemm takes row-major operands, which bᵀ is for the transpose of
// a row-major weight (the logits' b) without a copy, and aᵀ after one copy of
// the small a per call (a_t, [K, M] contiguous).
void reduced_tile_product(at::Tensor& scratch, const at::Tensor& b_tile, const at::Tensor& a_t_tile) {
  const at::Tensor bt = b_tile.t().contiguous();
  const int64_t m = bt.size(0), n = a_t_tile.size(1), k = bt.size(1);
  if (bt.scalar_type() == at::kBFloat16) {
    at::native::cpublas::brgemm(m, n, k, bt.stride(0), a_t_tile.stride(0), scratch.stride(0), false,
                                bt.const_data_ptr<at::BFloat16>(), a_t_tile.const_data_ptr<at::BFloat16>(),
                                scratch.data_ptr<float>(), false);
  } else {
    at::native::cpublas::brgemm(m, n, k, bt.stride(0), a_t_tile.stride(0), scratch.stride(0), false,
                                bt.const_data_ptr<at::Half>(), a_t_tile.const_data_ptr<at::Half>(),
                                scratch.data_ptr<float>(), false);
  }
  at::native::cpublas::brgemm_release(false);
}

void tiled_addmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  const int64_t m = out.size(0), n = out.size(1);
  const int64_t row_tiles = ceil_div(m, kTileRows), col_tiles = ceil_div(n, kTileCols);
  const auto acc = out.scalar_type();
  const bool same = a.scalar_type() == acc && b.scalar_type() == acc;
  const bool reduced = !same && a.scalar_type() == b.scalar_type() && is_reduced(a.scalar_type());
  const at::Tensor a_t = reduced ? a.t().contiguous() : at::Tensor();
  run_single_threaded_tasks(row_tiles * col_tiles, [&](int64_t tile) {
    const int64_t r0 = (tile / col_tiles) * kTileRows, c0 = (tile % col_tiles) * kTileCols;
    const int64_t rows = std::min(kTileRows, m - r0), cols = std::min(kTileCols, n - c0);
    at::Tensor out_tile = out.narrow(0, r0, rows).narrow(1, c0, cols);
    const at::Tensor a_tile = a.narrow(0, r0, rows), b_tile = b.narrow(1, c0, cols);
    if (same) {
      out_tile.addmm_(a_tile, b_tile, beta, 1.0);
    } else if (reduced) {
      at::Tensor scratch = at::empty({cols, rows}, out.options());
      reduced_tile_product(scratch, b_tile, a_t.narrow(1, r0, rows));
      if (beta == 0.0) {
        out_tile.copy_(scratch.t());
      } else {
        out_tile.add_(scratch.t());
      }
    } else {
      out_tile.addmm_(a_tile.to(acc), b_tile.to(acc), beta, 1.0);
    }
  });
}

void k_split_addmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, int64_t blocks) {
  const auto acc = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t k = a.size(1);
  const int64_t block = ceil_div(k, blocks);
  at::Tensor partial = at::empty({blocks, out.size(0), out.size(1)}, out.options().dtype(acc));
  run_single_threaded_tasks(blocks, [&](int64_t i) {
    const int64_t k0 = i * block, len = std::min(block, k - k0);
    at::Tensor part = partial.select(0, i);
    if (len <= 0) {
      part.zero_();
      return;
    }
    at::mm_out(part, a.narrow(1, k0, len).to(acc), b.narrow(0, k0, len).to(acc));
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
  const int64_t k_blocks = std::min(kMinTiles, a.size(1) / kKBlock);
  if (tiles < kMinTiles && k_blocks >= 2) {
    k_split_addmm(out, a, b, beta, k_blocks);
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
