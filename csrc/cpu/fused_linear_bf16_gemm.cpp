// oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm) behind
// bf16_addmm. The micro-kernel computes C [M, N] (+)= A [M, K] @ B [K, N] with
// A and C row-major and B in VNNI layout, [K/2, N, 2]: the two bfloat16 values
// of rows k and k + 1 of one column side by side, as the dot-product
// instruction reads them. A matrix x [R, K] with contiguous rows gives B = xᵀ
// in that layout by a copy alone: its rows read as 32-bit words, transposed
// (vnni_pack). Which operand is packed and which is read in place is chosen
// per product (bf16_addmm_unchecked).
#include "fused_linear_bf16_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace fastkd {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 128;  // rows of out (the micro-kernel's N)
constexpr int64_t kTileCols = 512;  // columns of out (its M)
constexpr int64_t kDepth = 512;     // K per call, even: A block 512 KiB, B block 128 KiB, C 256 KiB (L2)

// Whether x [R, C] is row-major with rows at least C apart (what the
// micro-kernel's A and C take, and what the 32-bit view of vnni_pack needs).
bool dense_rows(const at::Tensor& x) { return x.stride(1) == 1 && x.stride(0) >= x.size(1); }

// x itself when dense_rows(x), a row-major copy otherwise (contiguous() is not
// enough: it keeps any stride of a dimension of size 1).
at::Tensor row_major(const at::Tensor& x) {
  if (dense_rows(x)) return x;
  at::Tensor copy = at::empty(x.sizes(), x.options());
  return copy.copy_(x);
}

// a_rows [R, K] (K even) as VNNI words: int32 [K/2, R], the transpose of
// a_rows's contiguous rows read as 32-bit words.
at::Tensor vnni_pack(const at::Tensor& a_rows) {
  const int64_t r = a_rows.size(0), k = a_rows.size(1);
  if (k == 0) return at::empty({0, r}, a_rows.options().dtype(at::kInt));
  at::Tensor rows = a_rows;
  if (rows.stride(1) != 1 || rows.stride(0) != k || rows.storage_offset() % 2 != 0) {
    rows = at::empty({r, k}, a_rows.options());
    rows.copy_(a_rows);
  }
  return rows.view(at::kInt).t().contiguous();
}

// One call of the micro-kernel: C [m, n] (+)= A [m, k] @ B, B in VNNI words
// [k/2, ldb] (pairs of bfloat16), A with leading dimension lda, C with ldc.
void brgemm_call(int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t lda, const int32_t* b_vnni,
                 int64_t ldb, float* c, int64_t ldc, bool add_c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, reinterpret_cast<const at::BFloat16*>(b_vnni), c,
                              true);
}

// c (+)= x @ yᵀ over K in blocks of kDepth: x [m, K] row-major, y_vnni the
// packed words [K_even/2, n] of y [n, K]; an odd K's last column added as a
// rank-1 update in float32.
void blocked_product(const at::Tensor& c, const at::Tensor& x, const at::Tensor& y_vnni, const at::Tensor& y,
                     bool add) {
  const int64_t m = c.size(0), n = c.size(1), k = x.size(1), k_even = k - k % 2;
  if (k_even == 0 && !add) c.zero_();
  for (int64_t k0 = 0; k0 < k_even; k0 += kDepth) {
    brgemm_call(m, n, std::min(kDepth, k_even - k0), x.const_data_ptr<at::BFloat16>() + k0, x.stride(0),
                y_vnni.const_data_ptr<int32_t>() + k0 / 2 * n, n, c.data_ptr<float>(), c.stride(0), add || k0 > 0);
  }
  if (k != k_even) c.addr_(x.select(1, k - 1).to(at::kFloat), y.select(1, k - 1).to(at::kFloat));
}

// The micro-kernel's C is row-major and its B packed, so the product runs one
// of two ways, whichever moves fewer bytes besides the product itself. Where
// out is no larger than b (the fused head's logits, b the weight's transpose;
// the hidden-state gradient, b the weight), bᵀ is A of outᵀ = bᵀ aᵀ, read in
// place when it is row-major (the weight's own rows), and a's row tiles are
// packed; each tile of outᵀ goes through a float32 scratch into out. Where
// out is the larger (the weight gradient, out the whole [V, H]), each tile of
// out is the micro-kernel's C itself, a's rows its A, and b's column tiles
// are packed once (cheaply when bᵀ is row-major).
void bf16_addmm_unchecked(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta,
                          bool out_in_place) {
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1), k_even = k - k % 2;
  if (out_in_place) {
    const at::Tensor a_rows = row_major(a);
    for (int64_t c0 = 0; c0 < n; c0 += kTileCols) {
      const int64_t cols = std::min(kTileCols, n - c0);
      const at::Tensor b_cols = b.narrow(1, c0, cols).t();  // [cols, K]
      const at::Tensor packed = vnni_pack(b_cols.narrow(1, 0, k_even));
      for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, m - r0);
        blocked_product(out.narrow(0, r0, rows).narrow(1, c0, cols), a_rows.narrow(0, r0, rows), packed, b_cols,
                        beta != 0.0);
      }
    }
  } else {
    const at::Tensor bt = row_major(b.t());  // [N, K]
    for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, m - r0);
      const at::Tensor a_rows = a.narrow(0, r0, rows);
      const at::Tensor packed = vnni_pack(a_rows.narrow(1, 0, k_even));
      for (int64_t c0 = 0; c0 < n; c0 += kTileCols) {
        const int64_t cols = std::min(kTileCols, n - c0);
        at::Tensor scratch = at::empty({cols, rows}, out.options());  // the tile, transposed
        blocked_product(scratch, bt.narrow(0, c0, cols), packed, a_rows, false);
        at::Tensor out_tile = out.narrow(0, r0, rows).narrow(1, c0, cols);
        if (beta == 0.0) {
          out_tile.copy_(scratch.t());
        } else {
          out_tile.add_(scratch.t());
        }
      }
    }
  }
  at::native::cpublas::brgemm_release(true);
}

bool probe_bf16_brgemm() {
  try {
    // sizes off the tile and block sizes, an odd K; small integers over 16,
    // exact in bfloat16, whose products and sums are exact in float32 (and
    // no draw from the global random generator)
    const auto values = [](int64_t r, int64_t c, int64_t period) {
      return at::arange(r * c).remainder(period).sub(period / 2).div(16).view({r, c}).to(at::kBFloat16);
    };
    const at::Tensor a = values(37, 1031, 97), b = values(1031, 45, 89);
    at::Tensor out = at::empty({37, 45}), out_in_place = at::empty({37, 45});
    bf16_addmm_unchecked(out, a, b, 0.0, false);
    bf16_addmm_unchecked(out_in_place, a, b, 0.0, true);
    const at::Tensor want = at::mm(a.to(at::kDouble), b.to(at::kDouble));
    return at::equal(out.to(at::kDouble), want) && at::equal(out_in_place.to(at::kDouble), want);
  } catch (const c10::Error&) {
    return false;
  }
}

}  // namespace

bool bf16_brgemm_available() {
  static const bool available = probe_bf16_brgemm();
  return available;
}

at::Tensor bf16_operand_b(const at::Tensor& b) { return row_major(b.t()).t(); }

bool bf16_out_in_place(const at::Tensor& whole_out, const at::Tensor& whole_b) {
  return dense_rows(whole_out) && whole_out.numel() > whole_b.numel();
}

void bf16_addmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, bool out_in_place) {
  TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(0) == out.size(0) &&
                  b.size(1) == out.size(1) && a.size(1) == b.size(0),
              "bf16_addmm: a @ b must have out's shape ", out.sizes(), ", got ", a.sizes(), " @ ", b.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat && a.scalar_type() == at::kBFloat16 &&
                  b.scalar_type() == at::kBFloat16,
              "bf16_addmm: out must be float32 and a, b bfloat16");
  TORCH_CHECK(beta == 0.0 || beta == 1.0, "bf16_addmm: beta must be 0 or 1, got ", beta);
  TORCH_CHECK(bf16_brgemm_available(), "bf16_addmm: no brgemm micro-kernel for bfloat16 on this CPU");
  TORCH_CHECK(!out_in_place || dense_rows(out), "bf16_addmm: out must be row-major to be written in place");
  if (out.numel() == 0) return;
  bf16_addmm_unchecked(out, a, b, beta, out_in_place);
}

}  // namespace cpu
}  // namespace fastkd
