// Shared by the CPU and CUDA implementations of fastkd::info_nce_forward /
// info_nce_backward and of fastkd::info_nce_softmax_forward / _backward
// (csrc/cpu/info_nce.cpp, csrc/cuda/info_nce.cu): the argument checks, the
// recomputing backward's tile-by-tile gradient accumulation and the backward
// from kept probabilities.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "checks.h"

namespace fastkd {

// q [N, D], k [M, D] and labels [N] int64 on `device`. The labels' range,
// [0, M), is checked on the host by the CPU ops only, whose row kernels index
// each row of a tile with them unchecked; reading a GPU tensor's values would
// synchronise the device with the host, so the CUDA kernels guard instead (a
// query with a label outside gets a NaN row loss and gradient row,
// docs/spec.md §6; the Python layer checks on the host when
// FASTKD_CHECK_DEVICE_VALUES=1).
inline void check_info_nce_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& labels,
                                double inv_temperature, int64_t tile_rows, c10::DeviceType device) {
  CHECK_DEVICE_TYPE(q, device);
  CHECK_DEVICE_TYPE(k, device);
  CHECK_DEVICE_TYPE(labels, device);
  CHECK_SAME_DEVICE(q, k);
  CHECK_SAME_DEVICE(q, labels);
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
  if (device == c10::DeviceType::CPU && labels.numel() > 0) {
    const int64_t lo = labels.min().item<int64_t>();
    const int64_t hi = labels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < k.size(0), "labels must lie in [0, M) = [0, ", k.size(0),
                "), got values in [", lo, ", ", hi, "]");
  }
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(tile_rows >= 1, "tile_rows must be >= 1, got ", tile_rows);
}

// The backward's extra inputs: grad_row_loss [N] and row_lse [N], floating
// point, on q's device.
inline void check_info_nce_backward_args(const at::Tensor& grad_row_loss, const at::Tensor& q,
                                         const at::Tensor& row_lse, c10::DeviceType device) {
  CHECK_DEVICE_TYPE(grad_row_loss, device);
  CHECK_DEVICE_TYPE(row_lse, device);
  CHECK_SAME_DEVICE(q, grad_row_loss);
  CHECK_SAME_DEVICE(q, row_lse);
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
}

// The backward's gradients, accumulated tile by tile of q's rows: dq [N, D]
// in q's dtype, dk [M, D] in the accumulation dtype `acc` until outputs().
struct InfoNceGrads {
  at::Tensor grad_q, grad_k_acc;
  bool upcast;

  InfoNceGrads(const at::Tensor& q, const at::Tensor& k, at::ScalarType acc)
      : grad_q(at::empty(q.sizes(), q.options())),
        grad_k_acc(at::zeros(k.sizes(), k.options().dtype(acc))),
        upcast(acc != q.scalar_type()) {}

  // One tile's share: g [rows, M] = ∂loss/∂(q kᵀ) of q's rows [start, start
  // + rows), q_tile [rows, D] and k_acc [M, D] in the accumulation dtype.
  void add_tile(const at::Tensor& g, const at::Tensor& q_tile, const at::Tensor& k_acc, int64_t start) {
    const int64_t rows = g.size(0);
    if (upcast) {
      grad_q.narrow(0, start, rows).copy_(at::mm(g, k_acc));
    } else {
      at::Tensor out = grad_q.narrow(0, start, rows);
      at::mm_out(out, g, k_acc);
    }
    grad_k_acc.addmm_(g.t(), q_tile);
  }

  // (dq, dk), dk in k's dtype.
  std::tuple<at::Tensor, at::Tensor> outputs() const {
    return {grad_q, upcast ? grad_k_acc.to(grad_q.scalar_type()) : grad_k_acc};
  }
};

// The extra inputs of info_nce_softmax_backward: grad_row_loss [N], floating
// point, and the probabilities kept by info_nce_softmax_forward, [N, M] in
// the accumulation dtype of q; both on q's device.
inline void check_info_nce_softmax_backward_args(const at::Tensor& grad_row_loss,
                                                 const at::Tensor& probabilities, const at::Tensor& q,
                                                 const at::Tensor& k, c10::DeviceType device) {
  CHECK_DEVICE_TYPE(grad_row_loss, device);
  CHECK_DEVICE_TYPE(probabilities, device);
  CHECK_SAME_DEVICE(q, grad_row_loss);
  CHECK_SAME_DEVICE(q, probabilities);
  CHECK_DIM(grad_row_loss, 1);
  CHECK_DIM(probabilities, 2);
  TORCH_CHECK(grad_row_loss.size(0) == q.size(0), "grad_row_loss must have one entry per row of q (",
              q.size(0), "), got ", grad_row_loss.size(0));
  TORCH_CHECK(at::isFloatingType(grad_row_loss.scalar_type()),
              "grad_row_loss must be a floating-point tensor");
  TORCH_CHECK(probabilities.size(0) == q.size(0) && probabilities.size(1) == k.size(0),
              "probabilities must be (N, M) = (", q.size(0), ", ", k.size(0), "), got ",
              probabilities.sizes());
  TORCH_CHECK(probabilities.scalar_type() == accumulation_type(q), "probabilities must be ",
              accumulation_type(q), " for ", q.scalar_type(), " q, got ", probabilities.scalar_type());
}

// (dq, dk) in q's / k's dtype from the kept probabilities P [N, M] (the
// accumulation dtype): with s_i = grad_row_loss_i · inv_temperature and Y the
// one-hot labels, ∂loss/∂(q kᵀ) = G = diag(s) (P − Y), so
//   dq = G k  = s ⊙ (P k − k_y)            (one GEMM)
//   dk = Gᵀ q = Pᵀ (s ⊙ q) − Yᵀ (s ⊙ q)    (one GEMM and a scatter-add).
// G itself is never formed: P is read by the two GEMMs and left as it is
// (a second backward through the same graph finds it unchanged), and the
// backward needs no (N, M) temporary. The scatter-add of Yᵀ is index_put_
// with accumulate, deterministic on CPU and CUDA alike.
//
// The labels' range is not read on the host (on a GPU that would be a
// synchronisation): the index ops take the labels clamped into [0, M), so
// that nothing is read or written out of bounds, and a query whose label lies
// outside gets s_i = NaN, i.e. a NaN row of G: its dq row and every dk entry
// are NaN, as in the recomputing backward.
inline std::tuple<at::Tensor, at::Tensor> info_nce_grads_from_probabilities(
    const at::Tensor& grad_row_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& labels,
    const at::Tensor& probabilities, double inv_temperature) {
  const auto acc = probabilities.scalar_type();
  const int64_t m = k.size(0);
  const at::Tensor out_of_range = labels.lt(0).logical_or(labels.ge(m));
  const at::Tensor row_scale = grad_row_loss.to(acc)
                                   .mul(inv_temperature)
                                   .masked_fill(out_of_range, std::numeric_limits<double>::quiet_NaN())
                                   .unsqueeze(1);  // [N, 1]
  const at::Tensor k_acc = k.to(acc);
  at::Tensor grad_q = at::mm(probabilities, k_acc);
  // without keys every label is out of range and there is nothing to index
  const at::Tensor index = m > 0 ? labels.clamp(0, m - 1) : at::Tensor();
  if (m > 0) grad_q.sub_(k_acc.index_select(0, index));
  grad_q.mul_(row_scale);
  const at::Tensor scaled_q = q.to(acc).mul(row_scale);
  at::Tensor grad_k = at::mm(probabilities.t(), scaled_q);
  if (m > 0) grad_k.index_put_({index}, scaled_q.neg(), /*accumulate=*/true);
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type())};
}

}  // namespace fastkd
