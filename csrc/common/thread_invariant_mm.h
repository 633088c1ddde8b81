// a [M, K] @ b [K, N] with a result that does not depend on the thread count.
//
// MKL's sgemm can split the inner dimension K across threads when the output
// is small next to K: on an AMD EPYC, [203, 203] @ [203, 24] at 4 threads
// rounds differently from 1 thread. The losses whose backward ends in such a
// product ((dG + dGᵀ) X for the Gram-based relations, RKD's D X) promise the
// same bits at any thread count (tests/test_pairwise.py), so on CPU the output
// rows are cut into blocks whose size depends on M alone, and the blocks are
// shared among threads by at::parallel_for. Each block's GEMM then
// runs inside an active parallel region (at least two blocks whenever M ≥ 2),
// where MKL computes it single-threaded: every entry is summed the same way
// whatever the thread count. Other devices: at::mm.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastkd {

inline at::Tensor thread_invariant_mm(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_cpu()) return at::mm(a, b);
  const int64_t m = a.size(0);
  // one row cannot be split into blocks: take the product transposed, whose
  // rows are b's columns
  if (m == 1 && b.size(1) > 1) return thread_invariant_mm(b.t(), a.t()).t().contiguous();
  at::Tensor out = at::empty({m, b.size(1)}, a.options());
  if (m == 0) return out;
  // blocks of up to 256 rows (each single-threaded GEMM near the full-size
  // rate, and many blocks for many threads), at least two whenever m ≥ 2
  constexpr int64_t kMaxBlockRows = 256;
  const int64_t block_rows = std::min(kMaxBlockRows, (m + 1) / 2);
  const int64_t blocks = (m + block_rows - 1) / block_rows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // worker threads start with autograd on: skip it (the inputs may be a
    // student that requires grad; this is inside a kernel)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * block_rows, rows = std::min(block_rows, m - r0);
      at::Tensor out_rows = out.narrow(0, r0, rows);
      at::mm_out(out_rows, a.narrow(0, r0, rows), b);
    }
  });
  return out;
}

}  // namespace fastkd
