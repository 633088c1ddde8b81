// A bfloat16 matrix product summed in float32, on the calling thread, by
// oneDNN's brgemm micro-kernel (AVX512-BF16 dot products where the CPU has
// them): the speed of a bfloat16 gemm with the exact products of the operands
// summed in float32 and never rounded to bfloat16. fastkd::fused_linear_addmm_
// runs it per output tile or K block on one thread each, which keeps its
// result independent of the thread count.
#pragma once

#include <ATen/ATen.h>

namespace fastkd {
namespace cpu {

// Whether bf16_addmm runs here: the brgemm micro-kernel exists for this CPU
// and build, and a small product checked against a float32 one agrees (tried
// once per process).
bool bf16_brgemm_available();

// Which of its two ways bf16_addmm should multiply whole_out = whole_a @
// whole_b: true to write out's tiles in place (out row-major and larger
// than b), false through a transposed scratch (fused_linear_bf16_gemm.cpp
// says why). A caller that cuts a product into tiles chooses once, from the
// whole product.
bool bf16_out_in_place(const at::Tensor& whole_out, const at::Tensor& whole_b);

// b [K, N] laid out as bf16_addmm reads it without a copy, whichever its way:
// b itself when bᵀ is row-major (a weight's transpose), else b's transpose made
// row-major, once for a caller that cuts one product into many calls.
at::Tensor bf16_operand_b(const at::Tensor& b);

// out = beta · out + a @ b, beta 0 or 1, sequential.
//   out: [M, N] float32, any strides (row-major for out_in_place);
//   a: [M, K], b: [K, N] bfloat16, any strides.
// Each [128, 512] tile of out (counted from out's first row and column) is
// summed over K in blocks of 512 in float32, so every element's summation
// order depends on the shapes only.
// Requires bf16_brgemm_available().
void bf16_addmm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, bool out_in_place);

}  // namespace cpu
}  // namespace fastkd
