// The scope of one op call of the CUDA ops that multiply float32 matrices
// with cuBLAS (InfoNCE, MMD, RKD, PKT / SP / CC): the inputs' device made
// current, and IEEE float32 GEMMs whatever the caller set with
// torch.backends.cuda.matmul.allow_tf32 or torch.set_float32_matmul_precision.
// TF32 keeps 10 mantissa bits: the Gram, distance and logit terms would be
// off by ~1e-3 of the operands' norms. Both guards restore the previous state
// when the scope ends (the TF32 override is per thread).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

namespace fastkd {
namespace cuda {

struct CudaOpScope {
  explicit CudaOpScope(const at::Tensor& input) : device_guard(input.device()) {}

  c10::cuda::CUDAGuard device_guard;
  at::NoTF32Guard ieee_float32_matmuls;
};

}  // namespace cuda
}  // namespace fastkd
