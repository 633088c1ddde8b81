// Shared by the CPU and CUDA implementations of fastkd::hidden_state_forward
// (csrc/cpu/hidden_state.cpp, csrc/cuda/hidden_state.cu): the loss kinds, the
// cosine guard and the argument checks.
//
// Per kept row i of h = student [N, D] and g = teacher [N, D]:
//   kMse:    ℓ_i = (1/D) Σ_d (h_id − g_id)²
//            dℓ_i/dh = 2 (h − g) / D,  dℓ_i/dg = −dℓ_i/dh
//   kCosine: ℓ_i = 1 − h·g / √((h·h + ε)(g·g + ε)),  ε = kCosineEps
//            (nn.CosineEmbeddingLoss's guard: ε added to each squared norm,
//            the square root of their product; not nn.CosineSimilarity's
//            max(‖h‖·‖g‖, eps))
//            with c = h·g / √(…) and r = 1 / √(…):
//            dℓ_i/dh = c h / (h·h + ε) − r g,  dℓ_i/dg = c g / (g·g + ε) − r h
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "checks.h"

namespace fastkd {
namespace hidden_state {

// The `kind` argument (fastkd._enums.HiddenStateKind).
enum class HiddenStateKind : int64_t { kMse = 0, kCosine = 1 };

// nn.CosineEmbeddingLoss's EPSILON, added to both squared norms.
constexpr double kCosineEps = 1e-12;

// student, teacher [N, D] (D >= 1) of one floating dtype on `device`, unit
// stride along D unless N = 0 (any row stride); row_mask [N] bool or none;
// kind 0 or 1; grad_scale finite.
inline void check_args(const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& row_mask, int64_t kind, double grad_scale,
                       c10::DeviceType device) {
  check_student_teacher(student, teacher, 2, device);
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student ", student.sizes(), " and teacher ",
              teacher.sizes(), " must have the same shape");
  TORCH_CHECK(student.size(1) >= 1, "student must have at least one feature per row, got ",
              student.sizes());
  // an empty batch has nothing to read (and a strided empty view stays strided
  // when made contiguous)
  if (student.size(0) > 0) {
    CHECK_UNIT_LAST_STRIDE(student);
    CHECK_UNIT_LAST_STRIDE(teacher);
  }
  if (row_mask.has_value()) {
    const at::Tensor& m = *row_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "row_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == student.size(0), "row_mask must have shape [N] = [",
                student.size(0), "], got ", m.sizes());
    CHECK_SAME_DEVICE(student, m);
  }
  TORCH_CHECK(kind == static_cast<int64_t>(HiddenStateKind::kMse) ||
                  kind == static_cast<int64_t>(HiddenStateKind::kCosine),
              "kind must be 0 (mse) or 1 (cosine), got ", kind);
  TORCH_CHECK(std::isfinite(grad_scale), "grad_scale must be finite, got ", grad_scale);
}

}  // namespace hidden_state
}  // namespace fastkd
