// CPU implementation of fastkd::info_nce_forward / fastkd::info_nce_backward
// (docs/spec.md §4), Inf-CL style: the (N, M) similarity matrix is never stored. Each
// op walks q in tiles of `tile_rows` rows; a tile's logits
// q_tile kᵀ · inv_temperature (tile_rows × M) are the only large temporary.
// The forward keeps one log-sum-exp per row; the backward recomputes each
// tile's logits from it. The work is ATen matmuls (at::mm / addmm_), which
// are already blocked and vectorised; no SIMD code of our own.
//
// bfloat16 / float16 inputs are upcast tile by tile (k once) and everything
// accumulates in float32; float64 inputs stay float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../common/info_nce_op.h"

namespace fastkd {
namespace cpu {
namespace {

// logits of rows [start, start + rows) of q against every key, in the
// accumulation dtype: (rows, M).
at::Tensor tile_logits(const at::Tensor& q_tile, const at::Tensor& k_acc, double inv_temperature) {
  return at::mm(q_tile, k_acc.t()).mul_(inv_temperature);
}

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
  const at::Tensor k_acc = k.to(acc);
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    const at::Tensor q_tile = q.narrow(0, start, rows).to(acc);
    const at::Tensor logits = tile_logits(q_tile, k_acc, inv_temperature);
    const at::Tensor lse = at::logsumexp(logits, {1});
    const at::Tensor positive =
        logits.gather(1, labels.narrow(0, start, rows).unsqueeze(1)).squeeze(1);
    row_lse.narrow(0, start, rows).copy_(lse);
    at::Tensor loss_out = row_loss.narrow(0, start, rows);
    at::sub_out(loss_out, lse, positive);
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
  const at::Tensor lse_acc = row_lse.to(acc);
  // d row_loss_i / d logits_ij = P_ij − [j = y_i]; d logits / d (q kᵀ) = inv_temperature.
  const at::Tensor row_scale = grad_row_loss.to(acc).mul(inv_temperature);
  for (int64_t start = 0; start < n; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, n - start);
    const at::Tensor q_tile = q.narrow(0, start, rows).to(acc);
    at::Tensor g = tile_logits(q_tile, k_acc, inv_temperature);  // becomes G in place
    g.sub_(lse_acc.narrow(0, start, rows).unsqueeze(1)).exp_();
    g.scatter_add_(1, labels.narrow(0, start, rows).unsqueeze(1),
                   at::full({rows, 1}, -1.0, g.options()));
    g.mul_(row_scale.narrow(0, start, rows).unsqueeze(1));
    grads.add_tile(g, q_tile, k_acc, start);
  }
  return grads.outputs();
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("info_nce_forward", &fastkd::cpu::info_nce_forward_cpu);
  m.impl("info_nce_backward", &fastkd::cpu::info_nce_backward_cpu);
}
