// CPU implementation of the InfoNCE ops (docs/spec.md §4), in two modes.
//
// The logits come straight from the GEMM against k · inv_temperature (an
// (M, D) copy), not from scaling its products, so the row kernels subtract
// the row maximum from exactly the value it was taken from.
//
// Recompute (fastkd::info_nce_forward / info_nce_backward), Inf-CL style: the
// (N, M) similarity matrix is never stored. Each op walks q in tiles of
// `tile_rows` rows; a tile's logits q_tile (k / τ)ᵀ (tile_rows × M, one
// at::mm) are the only large temporary. The forward keeps one log-sum-exp per
// row; the backward recomputes each tile's logits (a fourth GEMM), turns
// them in place into the logits' gradient and accumulates dq = G k and
// dk += Gᵀ q_tile (two more GEMMs).
//
// Keep (fastkd::info_nce_softmax_forward / info_nce_softmax_backward): the
// forward computes all the logits in one GEMM and turns them in place into
// the softmax P (N × M in the accumulation dtype), which the backward reads
// in its two GEMMs (csrc/common/info_nce_op.h): three GEMMs in all, at the
// price of P's memory between forward and backward.
//
// The GEMMs are ATen's (already blocked and vectorised); the passes between
// them are the row kernels of csrc/cpu/info_nce_kernel.cpp, one pass through
// memory each, compiled per SIMD capability.
//
// bfloat16 / float16 inputs are upcast (k once, q tile by tile) and
// everything accumulates in float32; float64 inputs stay float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../common/info_nce_op.h"
#include "allocation.h"
#include "capability.h"
#include "info_nce_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

enum class RowsPass { Lse, Softmax, LogitGrad };

// Runs one row kernel on `logits` [rows, M] (contiguous, the accumulation
// dtype) for rows [start, start + rows) of the op's outputs.
template <class T>
void run_rows_pass(RowsPass pass, at::Tensor& logits, const at::Tensor& labels, int64_t start, T* row_loss,
                   T* row_lse, const T* row_scale) {
  const InfoNceRowsArgs<T> args{logits.data_ptr<T>(), logits.stride(0), logits.size(0), logits.size(1),
                                labels.data_ptr<int64_t>() + start,
                                row_loss ? row_loss + start : nullptr,
                                row_lse ? row_lse + start : nullptr,
                                row_scale ? row_scale + start : nullptr};
  switch (pass) {
    case RowsPass::Lse:
      return run_kernel_variant<InfoNceRowsArgs<T>>(args, &AVX512::info_nce_rows_lse, &AVX2::info_nce_rows_lse,
                                                    &DEFAULT::info_nce_rows_lse);
    case RowsPass::Softmax:
      return run_kernel_variant<InfoNceRowsArgs<T>>(args, &AVX512::info_nce_rows_softmax,
                                                    &AVX2::info_nce_rows_softmax, &DEFAULT::info_nce_rows_softmax);
    case RowsPass::LogitGrad:
      return run_kernel_variant<InfoNceRowsArgs<T>>(args, &AVX512::info_nce_rows_logit_grad,
                                                    &AVX2::info_nce_rows_logit_grad,
                                                    &DEFAULT::info_nce_rows_logit_grad);
  }
}

// k · inv_temperature in the accumulation dtype: (M, D), the GEMMs' right factor for the logits.
at::Tensor logit_keys(const at::Tensor& k, at::ScalarType acc, double inv_temperature) {
  return k.to(acc).mul(inv_temperature);
}

// Logits q_tile (k / τ)ᵀ: (rows, M), contiguous, in the accumulation dtype,
// in a buffer from the cache of freed buffers (allocation.h): a tile of the
// recomputing passes is freed before the next one asks for the same size,
// and the kept (N, M) softmax of a training step before the next step's;
// faulting 256 MiB in afresh costs about a fifth of the three GEMMs.
at::Tensor tile_logits(const at::Tensor& q_tile, const at::Tensor& keys) { return mm_into_cached(q_tile, keys.t()); }

std::tuple<at::Tensor, at::Tensor> info_nce_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& labels,
                                                        double inv_temperature,
                                                        int64_t tile_rows) {
  check_info_nce_args(q, k, labels, inv_temperature, tile_rows, at::kCPU);
  const auto acc = accumulation_type(q);
  const int64_t n = q.size(0);
  at::Tensor row_loss = at::empty({n}, q.options().dtype(acc));
  at::Tensor row_lse = at::empty({n}, q.options().dtype(acc));
  if (n == 0) return {row_loss, row_lse};
  const at::Tensor keys = logit_keys(k, acc, inv_temperature);
  const at::Tensor labels_c = labels.contiguous();
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    at::Tensor logits = tile_logits(q.narrow(0, start, rows).to(acc), keys);
    AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_forward_cpu", [&] {
      run_rows_pass<scalar_t>(RowsPass::Lse, logits, labels_c, start, row_loss.data_ptr<scalar_t>(),
                              row_lse.data_ptr<scalar_t>(), nullptr);
    });
  }
  return {row_loss, row_lse};
}

std::tuple<at::Tensor, at::Tensor> info_nce_backward_cpu(
    const at::Tensor& grad_row_loss, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& labels, const at::Tensor& row_lse, double inv_temperature,
    int64_t tile_rows) {
  check_info_nce_args(q, k, labels, inv_temperature, tile_rows, at::kCPU);
  check_info_nce_backward_args(grad_row_loss, q, row_lse, at::kCPU);
  const int64_t n = q.size(0);

  const auto acc = accumulation_type(q);
  InfoNceGrads grads(q, k, acc);
  if (n == 0) return grads.outputs();

  const at::Tensor k_acc = k.to(acc);
  const at::Tensor keys = logit_keys(k, acc, inv_temperature);
  const at::Tensor lse_acc = row_lse.to(acc).contiguous();
  const at::Tensor labels_c = labels.contiguous();
  // d row_loss_i / d logits_ij = P_ij − [j = y_i]; d logits / d (q kᵀ) = inv_temperature.
  const at::Tensor row_scale = grad_row_loss.to(acc).mul(inv_temperature).contiguous();
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    const at::Tensor q_tile = q.narrow(0, start, rows).to(acc);
    at::Tensor g = tile_logits(q_tile, keys);  // becomes G in place
    AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_backward_cpu", [&] {
      run_rows_pass<scalar_t>(RowsPass::LogitGrad, g, labels_c, start, nullptr, lse_acc.data_ptr<scalar_t>(),
                              row_scale.data_ptr<scalar_t>());
    });
    grads.add_tile(g, q_tile, k_acc, start);
  }
  return grads.outputs();
}

std::tuple<at::Tensor, at::Tensor> info_nce_softmax_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& labels,
                                                                double inv_temperature) {
  check_info_nce_args(q, k, labels, inv_temperature, /*tile_rows=*/1, at::kCPU);
  const auto acc = accumulation_type(q);
  const int64_t n = q.size(0);
  at::Tensor row_loss = at::empty({n}, q.options().dtype(acc));
  if (n == 0) return {row_loss, at::empty({0, k.size(0)}, q.options().dtype(acc))};
  at::Tensor row_lse = at::empty({n}, q.options().dtype(acc));
  at::Tensor probabilities = tile_logits(q.to(acc), logit_keys(k, acc, inv_temperature));  // becomes P
  const at::Tensor labels_c = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_softmax_forward_cpu", [&] {
    run_rows_pass<scalar_t>(RowsPass::Softmax, probabilities, labels_c, 0, row_loss.data_ptr<scalar_t>(),
                            row_lse.data_ptr<scalar_t>(), nullptr);
  });
  return {row_loss, probabilities};
}

std::tuple<at::Tensor, at::Tensor> info_nce_softmax_backward_cpu(
    const at::Tensor& grad_row_loss, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& labels, const at::Tensor& probabilities, double inv_temperature) {
  check_info_nce_args(q, k, labels, inv_temperature, /*tile_rows=*/1, at::kCPU);
  check_info_nce_softmax_backward_args(grad_row_loss, probabilities, q, k, at::kCPU);
  return info_nce_grads_from_probabilities(grad_row_loss, q, k, labels, probabilities, inv_temperature);
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("info_nce_forward", &fastkd::cpu::info_nce_forward_cpu);
  m.impl("info_nce_backward", &fastkd::cpu::info_nce_backward_cpu);
  m.impl("info_nce_softmax_forward", &fastkd::cpu::info_nce_softmax_forward_cpu);
  m.impl("info_nce_softmax_backward", &fastkd::cpu::info_nce_softmax_backward_cpu);
}
