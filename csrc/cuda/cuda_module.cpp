// The fastkd._C_cuda module: importing it loads the CUDA kernels (their
// TORCH_LIBRARY_IMPL(fastkd, CUDA, m) blocks live in csrc/cuda/*.cu). Import
// fastkd._C first: it defines the op schemas.
#include <pybind11/pybind11.h>

#ifndef FASTKD_CUDA_ARCHS
#define FASTKD_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C_cuda, module) {
  module.doc() = "fastkd CUDA kernels (registers the CUDA implementations of fastkd:: ops)";
  module.def("build_info", [] {
    py::dict info;
    info["cuda_archs"] = FASTKD_CUDA_ARCHS;
    return info;
  });
}
