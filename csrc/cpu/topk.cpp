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
#include "../common/topk_op.h"
#include "allocation.h"
#include "divergence_dispatch.h"
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
  const TopKCall call = prepare_topk(student, teacher_index, teacher_value, row_mask, kind,
                                     inv_temperature, coef, grad_scale, student_grad, labels,
                                     hard_grad_scale, at::kCPU, &empty_for_output);
  const TopKDivergenceArgs& a = call.args;
  check_teacher_index(call.index, a.vocab);
  return run_divergence_kernel(call, &AVX512::topk_divergence_kernel, &AVX2::topk_divergence_kernel,
                               &DEFAULT::topk_divergence_kernel);
}

}  // namespace
}  // namespace cpu
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("topk_divergence_forward", &fastkd::cpu::topk_divergence_forward_cpu);
}
