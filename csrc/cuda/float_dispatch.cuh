// The input dtypes of the CUDA kernels that read float32, bfloat16 or float16
// and accumulate in float32 (float64 is refused before dispatch).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fastkd {
namespace cuda {

// Calls f(scalar_t{}) for the element type of `dtype`; `op` names the caller
// in the error for any other dtype. Use as
//   dispatch_float_dtype(x.scalar_type(), "fastkd::x", [&](auto tag) { using scalar_t = decltype(tag); ... });
template <class F>
void dispatch_float_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: break;
  }
  TORCH_CHECK(false, op, " on CUDA: unsupported dtype ", dtype);
}

}  // namespace cuda
}  // namespace fastkd
