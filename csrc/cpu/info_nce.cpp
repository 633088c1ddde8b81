// CPU implementation of fastkd::info_nce_forward / fastkd::info_nce_backward
// (SPEC §4), Inf-CL style: the (N, M) similarity matrix is never stored. Each
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

#include "../common/checks.h"

namespace fastkd {
namespace cpu {
namespace {

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_info_nce_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& labels,
                         double inv_temperature, int64_t tile_rows) {
  CHECK_DEVICE_TYPE(q, at::kCPU);
  CHECK_DEVICE_TYPE(k, at::kCPU);
  CHECK_DEVICE_TYPE(labels, at::kCPU);
  CHECK_DIM(q, 2);
  CHECK_DIM(k, 2);
  CHECK_DIM(labels, 1);
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q must be a floating-point tensor, got ",
              q.scalar_type());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(q.size(1) == k.size(1), "q and k must have the same feature dim D, got ", q.size(1),
              " and ", k.size(1));
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.size(0) == q.size(0), "labels must have one entry per row of q (",
              q.size(0), "), got ", labels.size(0));
  if (labels.numel() > 0) {
    const int64_t lo = labels.min().item<int64_t>();
    const int64_t hi = labels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < k.size(0), "labels must lie in [0, M) = [0, ", k.size(0),
                "), got values in [", lo, ", ", hi, "]");
  }
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(tile_rows >= 1, "tile_rows must be >= 1, got ", tile_rows);
}

// logits of rows [start, start + rows) of q against every key, in the
// accumulation dtype: (rows, M).
at::Tensor tile_logits(const at::Tensor& q_tile, const at::Tensor& k_acc, double inv_temperature) {
  return at::mm(q_tile, k_acc.t()).mul_(inv_temperature);
}

std::tuple<at::Tensor, at::Tensor> info_nce_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& labels,
                                                        double inv_temperature,
                                                        int64_t tile_rows) {
  check_info_nce_args(q, k, labels, inv_temperature, tile_rows);
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
  check_info_nce_args(q, k, labels, inv_temperature, tile_rows);
  CHECK_DEVICE_TYPE(grad_row_loss, at::kCPU);
  CHECK_DEVICE_TYPE(row_lse, at::kCPU);
  CHECK_DIM(grad_row_loss, 1);
  CHECK_DIM(row_lse, 1);
  const int64_t n = q.size(0);
  TORCH_CHECK(grad_row_loss.size(0) == n, "grad_row_loss must have one entry per row of q (", n,
              "), got ", grad_row_loss.size(0));
  TORCH_CHECK(row_lse.size(0) == n, "row_lse must have one entry per row of q (", n, "), got ",
              row_lse.size(0));
  TORCH_CHECK(at::isFloatingType(grad_row_loss.scalar_type()) &&
                  at::isFloatingType(row_lse.scalar_type()),
              "grad_row_loss and row_lse must be floating-point tensors");

  const auto acc = accumulation_type(q);
  const bool upcast = acc != q.scalar_type();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k_acc = at::zeros(k.sizes(), k.options().dtype(acc));
  if (n == 0) return {grad_q, upcast ? grad_k_acc.to(k.scalar_type()) : grad_k_acc};

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
    if (upcast) {
      grad_q.narrow(0, start, rows).copy_(at::mm(g, k_acc));
    } else {
      at::Tensor out = grad_q.narrow(0, start, rows);
      at::mm_out(out, g, k_acc);
    }
    grad_k_acc.addmm_(g.t(), q_tile);
  }
  return {grad_q, upcast ? grad_k_acc.to(k.scalar_type()) : grad_k_acc};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("info_nce_forward", &fastkd::cpu::info_nce_forward_cpu);
  m.impl("info_nce_backward", &fastkd::cpu::info_nce_backward_cpu);
}
