// a [M, K] @ b [K, N] on CPU with a result that does not depend on the thread count.
//
// MKL's sgemm can split the inner dimension K across threads when the output
// is small next to K: on an AMD EPYC, [203, 203] @ [203, 24] at 4 threads
// rounds differently from 1 thread. The losses whose backward ends in such a
// product ((dG + dGᵀ) X for the Gram-based relations, RKD's D X, MMD's C Y)
// promise the same bits at any thread count (tests/test_pairwise.py,
// tests/test_mmd.py), so the output rows are cut into blocks whose size
// depends on M alone and each block is one single-threaded GEMM
// (run_single_threaded_tasks): every entry is summed the same way whatever
// the thread count.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "single_threaded_tasks.h"

namespace fastkd {
namespace cpu {

inline at::Tensor thread_invariant_mm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = a.size(0);
  at::Tensor out = at::empty({m, b.size(1)}, a.options());
  if (m == 0) return out;
  // up to 256 rows a block (each GEMM near the full-size rate), and two
  // blocks rather than one from 2 rows on, for two threads to share
  constexpr int64_t kMaxBlockRows = 256;
  const int64_t block_rows = std::min(kMaxBlockRows, (m + 1) / 2);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  run_single_threaded_tasks(blocks, [&](int64_t block) {
    const int64_t r0 = block * block_rows, rows = std::min(block_rows, m - r0);
    at::Tensor out_rows = out.narrow(0, r0, rows);
    at::mm_out(out_rows, a.narrow(0, r0, rows), b);
  });
  return out;
}

}  // namespace cpu
}  // namespace fastkd
