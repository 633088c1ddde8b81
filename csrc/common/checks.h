// Argument checks at the C++ boundary, shared by the CPU and CUDA ops. The
// Python layer validates first (with ValueError); these TORCH_CHECKs keep the
// ops safe when called directly through torch.ops.fastkd.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#define CHECK_DEVICE_TYPE(x, kind)                                                 \
  TORCH_CHECK((x).device().type() == (kind), #x " must be on ", (kind), ", got ", \
              (x).device())
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device")
#define CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must be ", (n), "-D, got ", (x).dim(), "-D")
#define CHECK_UNIT_LAST_STRIDE(x) \
  TORCH_CHECK((x).size(-1) <= 1 || (x).stride(-1) == 1, #x " must have unit stride in its last dim")

namespace fastkd {

// The hard-label arguments of the divergence ops (divergence_forward,
// topk_divergence_forward, mixture_divergence_forward): labels [N] int64 on
// the student's device, or none and then hard_grad_scale == 0.
inline void check_hard_label_args(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                                  double hard_grad_scale) {
  TORCH_CHECK(std::isfinite(hard_grad_scale), "hard_grad_scale must be finite");
  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    TORCH_CHECK(y.scalar_type() == at::kLong, "labels must be int64, got ", y.scalar_type());
    TORCH_CHECK(y.dim() == 1, "labels must be 1-D, got ", y.dim(), "-D");
    TORCH_CHECK(y.size(0) == student.size(0), "labels must have one entry per row");
    CHECK_SAME_DEVICE(student, y);
  } else {
    TORCH_CHECK(hard_grad_scale == 0.0, "hard_grad_scale must be 0 without labels");
  }
}

// Host-side range check of the kept rows' labels (CPU ops: the kernels index
// the row with them; the CUDA ops leave it to the Python layer, which checks
// before any launch, and guard in the kernel instead). labels: [rows]
// contiguous or nullptr; row_mask: [rows] contiguous or nullptr (all kept).
inline void check_kept_label_range(const int64_t* labels, const bool* row_mask, int64_t rows,
                                   int64_t vocab) {
  if (labels == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) {
    if (row_mask != nullptr && !row_mask[i]) continue;
    TORCH_CHECK(labels[i] >= 0 && labels[i] < vocab, "labels of kept rows must lie in [0, ", vocab,
                "), got ", labels[i], " at row ", i);
  }
}

// Number of divergence kinds (fastkd::divergence::Kind).
constexpr int64_t kNumDivergenceKinds = 6;

inline void check_divergence_args(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& row_mask, int64_t kind,
                                  double inv_temperature, double coef, double grad_scale,
                                  const std::optional<at::Tensor>& labels = std::nullopt,
                                  double hard_grad_scale = 0.0) {
  CHECK_DIM(student, 2);
  CHECK_DIM(teacher, 2);
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student ", student.sizes(),
              " and teacher ", teacher.sizes(), " must have the same shape");
  TORCH_CHECK(student.size(1) > 0, "student must have at least one column (vocabulary entry)");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "student and teacher must have the same dtype");
  CHECK_SAME_DEVICE(student, teacher);
  CHECK_UNIT_LAST_STRIDE(student);
  CHECK_UNIT_LAST_STRIDE(teacher);
  // Any row stride, 0 (an expanded row) included: the logits are only read
  // and the gradients go to fresh contiguous tensors.
  if (row_mask.has_value()) {
    const at::Tensor& m = *row_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "row_mask must be bool");
    CHECK_DIM(m, 1);
    TORCH_CHECK(m.size(0) == student.size(0), "row_mask must have one entry per row");
    CHECK_SAME_DEVICE(student, m);
  }
  TORCH_CHECK(kind >= 0 && kind < kNumDivergenceKinds, "kind must be in [0, ",
              kNumDivergenceKinds, "), got ", kind);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
  // JSD (2) takes β in (0, 1); the skew divergences (3, 4) α in (0, 1]. The
  // endpoints that equal another divergence are mapped to it by the caller.
  if (kind == 2) {
    TORCH_CHECK(coef > 0 && coef < 1, "coef (beta) must be in (0, 1) for JSD, got ", coef);
  } else if (kind == 3 || kind == 4) {
    TORCH_CHECK(coef > 0 && coef <= 1, "coef (alpha) must be in (0, 1] for skew divergences, got ", coef);
  }
  TORCH_CHECK(std::isfinite(grad_scale), "grad_scale must be finite");
  check_hard_label_args(student, labels, hard_grad_scale);
}

}  // namespace fastkd
