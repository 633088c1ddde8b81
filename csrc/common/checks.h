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

inline void check_divergence_kind(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind < kNumDivergenceKinds, "kind must be in [0, ",
              kNumDivergenceKinds, "), got ", kind);
}

// The scalar options of every divergence op (divergence, top-k, mixture) for
// a kind already checked: 1 / T, the kind's coefficient and the gradient scale.
inline void check_divergence_options(int64_t kind, double inv_temperature, double coef,
                                     double grad_scale) {
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
}

// The row mask of the top-k and mixture ops: bool [rows] on the student's
// device, or none. Returns a contiguous copy (undefined without a mask).
inline at::Tensor checked_row_mask(const at::Tensor& student, const std::optional<at::Tensor>& row_mask) {
  if (!row_mask.has_value()) return at::Tensor();
  TORCH_CHECK(row_mask->scalar_type() == at::kBool, "row_mask must be bool");
  TORCH_CHECK(row_mask->dim() == 1 && row_mask->size(0) == student.size(0), "row_mask must be [rows]");
  CHECK_SAME_DEVICE(student, *row_mask);
  return row_mask->contiguous();
}

// student and teacher: `dims`-D tensors of one floating dtype on one device of type `device`
// (what every feature op asks of its pair before its own shape rules).
inline void check_student_teacher(const at::Tensor& student, const at::Tensor& teacher, int64_t dims,
                                  c10::DeviceType device) {
  CHECK_DEVICE_TYPE(student, device);
  CHECK_DEVICE_TYPE(teacher, device);
  CHECK_SAME_DEVICE(student, teacher);
  CHECK_DIM(student, dims);
  CHECK_DIM(teacher, dims);
  TORCH_CHECK(at::isFloatingType(student.scalar_type()),
              "student must be a floating-point tensor, got ", student.scalar_type());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "student and teacher must have the same dtype, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
}

// A student / teacher pair of feature batches [N, D_s], [N, D_t] on `device`
// (the relational ops: RKD distance and angle, PKT, SP, CC).
inline void check_feature_pair_args(const at::Tensor& student, const at::Tensor& teacher,
                                    c10::DeviceType device) {
  check_student_teacher(student, teacher, 2, device);
  TORCH_CHECK(student.size(0) == teacher.size(0),
              "student and teacher must have the same number of samples N, got ", student.size(0),
              " and ", teacher.size(0));
  TORCH_CHECK(student.size(0) >= 1, "student must hold at least one sample");
  TORCH_CHECK(student.size(1) >= 1 && teacher.size(1) >= 1,
              "student and teacher must have at least one feature per sample");
}

// The float32 accumulation of the GPU kernels: float64 input is refused there.
inline void check_not_float64_on_cuda(const at::Tensor& x, const char* ops, const char* what) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, ops, " on CUDA: ", what,
              " must be float32, bfloat16 or float16 (the GPU kernels accumulate in float32), got float64");
}

// float32 for every floating input but float64, which keeps float64.
inline at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

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
  check_divergence_kind(kind);
  check_divergence_options(kind, inv_temperature, coef, grad_scale);
  check_hard_label_args(student, labels, hard_grad_scale);
}

}  // namespace fastkd
