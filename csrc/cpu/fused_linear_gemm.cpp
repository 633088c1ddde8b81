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
//   out: [M, N], a: [M, K], b: [K, N]; one floating dtype, any strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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

void tiled_addmm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  const int64_t m = out.size(0), n = out.size(1);
  const int64_t row_tiles = ceil_div(m, kTileRows), col_tiles = ceil_div(n, kTileCols);
  run_single_threaded_tasks(row_tiles * col_tiles, [&](int64_t tile) {
    const int64_t r0 = (tile / col_tiles) * kTileRows, c0 = (tile % col_tiles) * kTileCols;
    const int64_t rows = std::min(kTileRows, m - r0), cols = std::min(kTileCols, n - c0);
    at::Tensor out_tile = out.narrow(0, r0, rows).narrow(1, c0, cols);
    out_tile.addmm_(a.narrow(0, r0, rows), b.narrow(1, c0, cols), beta, 1.0);
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
  TORCH_CHECK(a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type(),
              "a and b must have out's dtype ", out.scalar_type(), ", got ", a.scalar_type(), " and ",
              b.scalar_type());
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
