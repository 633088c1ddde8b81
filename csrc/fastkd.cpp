// The fastkd:: operator schemas, in one place, and the fastkd._C module.
// Importing fastkd._C registers the schemas and the CPU kernels (their
// TORCH_LIBRARY_IMPL blocks live in csrc/cpu/*.cpp, linked into this module).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/allocation.h"
#include "cpu/capability.h"

#ifndef FASTKD_BUILD_CXX_FLAGS
#define FASTKD_BUILD_CXX_FLAGS ""
#endif

TORCH_LIBRARY(fastkd, m) {
  // Softmax-divergence family (SPEC §1), one fused row pass.
  //   student, teacher: [N, V] logits, unit stride along V, same dtype.
  //   row_mask: [N] bool (false → row excluded: loss 0, gradient 0).
  //   kind: fastkd::divergence::Kind; coef: β (JSD) or α (skew), interior.
  // Returns (row_loss [N] fp32 (fp64 for fp64 input),
  //          student_grad [N, V] or [0, 0], teacher_grad [N, V] or [0, 0]);
  // gradients are grad_scale · d(row loss)/d(logits), in the input dtype.
  m.def(
      "divergence_forward(Tensor student, Tensor teacher, Tensor? row_mask, int kind, "
      "float inv_temperature, float coef, float grad_scale, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, module) {
  module.doc() = "fastkd CPU kernels (registers the fastkd:: operators on import)";
  module.def("build_info", [] {
    py::dict info;
    info["compiler"] = __VERSION__;
    info["cxx_flags"] = FASTKD_BUILD_CXX_FLAGS;
    info["simd_variants"] = py::make_tuple("default", "avx2", "avx512");
    return info;
  });
  module.def("cpu_capability", [] {
    return fastkd::cpu::capability_name(fastkd::cpu::active_capability());
  }, "SIMD variant the CPU kernels run (FASTKD_CPU_CAPABILITY may lower it).");
  module.def("empty_cache", &fastkd::cpu::release_cached_outputs,
             "Free the cached CPU output buffers; returns the bytes released.");
  module.def("cached_bytes", &fastkd::cpu::cached_output_bytes,
             "Bytes held in free cached CPU output buffers.");
  module.def("supported_cpu_capability", [] {
    return fastkd::cpu::capability_name(fastkd::cpu::supported_capability());
  }, "Best SIMD variant this CPU supports.");
}
