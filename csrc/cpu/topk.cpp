// CPU implementation of fastkd::topk_divergence_forward: checks the tensors
// (including the teacher ids: in range and distinct per row, since a bad id
// would be an out-of-bounds write), allocates the outputs, and hands raw
// pointers to the SIMD variant chosen for this CPU. With labels, the kept
// rows' labels are checked to lie in [0, vocab) first (the kernel indexes the
// row with them).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/divergence_op.h"
#include "../common/topk_args.h"
#include "allocation.h"
#include "capability.h"
#include "topk_kernel.h"

namespace fastkd {
namespace cpu {
namespace {

// Every id in [0, vocab) and no id twice in a row; O(rows · k) with one
// vocabulary-sized marker row, reset after each row.
void check_teacher_index(const at::Tensor& index, int64_t vocab) {
  const int64_t rows = index.size(0), k = index.size(1);
  const int64_t* ids = index.data_ptr<int64_t>();
  std::vector<int64_t> last_row_seen(vocab, -1);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = ids[i * k + j];
      TORCH_CHECK(id >= 0 && id < vocab, "teacher_index: id ", id, " in row ", i,
                  " is outside [0, ", vocab, ")");
      TORCH_CHECK(last_row_seen[id] != i, "teacher_index: id ", id, " appears twice in row ", i);
      last_row_seen[id] = i;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_divergence_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher_index, const at::Tensor& teacher_value,
    const std::optional<at::Tensor>& row_mask, int64_t kind, double inv_temperature, double coef,
    double grad_scale, bool student_grad, const std::optional<at::Tensor>& labels,
    double hard_grad_scale) {
  CHECK_DEVICE_TYPE(student, at::kCPU);
  CHECK_DIM(student, 2);
  CHECK_DIM(teacher_index, 2);
  CHECK_DIM(teacher_value, 2);
  CHECK_SAME_DEVICE(student, teacher_index);
  CHECK_SAME_DEVICE(student, teacher_value);
  CHECK_UNIT_LAST_STRIDE(student);
  const int64_t rows = student.size(0), vocab = student.size(1);
  TORCH_CHECK(vocab > 0, "student must have at least one column (vocabulary entry)");
  // Any row stride (0 for an expanded row): the student is only read.
  TORCH_CHECK(teacher_index.scalar_type() == at::kLong, "teacher_index must be int64");
  TORCH_CHECK(teacher_index.sizes() == teacher_value.sizes(), "teacher_index ",
              teacher_index.sizes(), " and teacher_value ", teacher_value.sizes(),
              " must have the same shape");
  TORCH_CHECK(teacher_index.size(0) == rows, "teacher_index must have one row per student row");
  const int64_t k = teacher_index.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "k (teacher ids per row) must be in [1, ", vocab, "], got ", k);
  const DType dtype = divergence_dtype(student.scalar_type());
  const at::ScalarType accumulate = dtype == DType::Float64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(teacher_value.scalar_type() == accumulate, "teacher_value must be ", accumulate,
              " for ", student.scalar_type(), " student logits, got ", teacher_value.scalar_type());
  TORCH_CHECK(kind == 0 || (kind >= 2 && kind <= 5),
              "kind must be KL (0), JSD (2), skew KL (3), skew reverse KL (4) or TVD (5) for a top-k "
              "teacher (reverse KL is infinite off the teacher's ids), got ", kind);
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "inv_temperature must be finite and > 0, got ", inv_temperature);
  if (kind == 2) {
    TORCH_CHECK(coef > 0 && coef < 1, "coef (beta) must be in (0, 1) for JSD, got ", coef);
  } else if (kind == 3 || kind == 4) {
    TORCH_CHECK(coef > 0 && coef <= 1, "coef (alpha) must be in (0, 1] for skew divergences, got ", coef);
  }
  TORCH_CHECK(std::isfinite(grad_scale), "grad_scale must be finite");
  check_hard_label_args(student, labels, hard_grad_scale);
  at::Tensor mask;
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->scalar_type() == at::kBool, "row_mask must be bool");
    TORCH_CHECK(row_mask->dim() == 1 && row_mask->size(0) == rows, "row_mask must be [rows]");
    CHECK_SAME_DEVICE(student, *row_mask);
    mask = row_mask->contiguous();
  }

  const at::Tensor index = teacher_index.contiguous();
  const at::Tensor value = teacher_value.contiguous();
  check_teacher_index(index, vocab);
  const at::Tensor label_ids = labels.has_value() ? labels->contiguous() : at::Tensor();

  at::Tensor row_loss = at::empty({rows}, student.options().dtype(accumulate));
  at::Tensor grad = empty_for_output(
      at::IntArrayRef{student_grad ? rows : 0, student_grad ? vocab : 0}, student.options());
  at::Tensor row_ce = at::empty({labels.has_value() ? rows : 0}, student.options().dtype(accumulate));
  if (rows == 0) return {row_loss, grad, row_ce};

  TopKDivergenceArgs a;
  a.student = student.data_ptr();
  a.student_row_stride = student.stride(0);
  a.index = index.data_ptr<int64_t>();
  a.value = value.data_ptr();
  a.row_mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.row_loss = row_loss.data_ptr();
  a.student_grad = student_grad ? grad.data_ptr() : nullptr;
  a.rows = rows;
  a.vocab = vocab;
  a.k = k;
  a.dtype = dtype;
  a.kind = static_cast<int>(kind);
  a.inv_temperature = inv_temperature;
  a.coef = coef;
  a.grad_scale = grad_scale;
  a.labels = label_ids.defined() ? label_ids.data_ptr<int64_t>() : nullptr;
  a.row_ce = label_ids.defined() ? row_ce.data_ptr() : nullptr;
  a.hard_grad_scale = hard_grad_scale;
  // every kept row's label must be a class id: the kernel indexes the row with it
  check_kept_label_range(a.labels, a.row_mask, rows, vocab);
  switch (active_capability()) {
    case Capability::AVX512: AVX512::topk_divergence_kernel(a); break;
    case Capability::AVX2: AVX2::topk_divergence_kernel(a); break;
    case Capability::Default: DEFAULT::topk_divergence_kernel(a); break;
  }
  return {row_loss, grad, row_ce};
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("topk_divergence_forward", &fastkd::cpu::topk_divergence_forward_cpu);
}
