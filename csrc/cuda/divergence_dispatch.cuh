// Host-side dispatch of the divergence-family CUDA ops (divergence.cu,
// mixture.cu, topk.cu): from the run-time kind and dtype of their *Args to
// the compile-time KIND and scalar_t of their kernels, and the launch itself.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../common/divergence_args.h"

namespace fastkd {
namespace cuda {

// Calls f.template operator()<KIND>() for the KIND among `Kinds` equal to
// `kind` (fastkd::divergence::Kind); any other kind raises `refusal` kind.
// The ops check the kind first: the refusal guards the launcher itself.
template <int... Kinds, class F>
void dispatch_kind(int kind, const char* refusal, F&& f) {
  const bool launched = ((kind == Kinds ? (f.template operator()<Kinds>(), true) : false) || ...);
  TORCH_CHECK(launched, refusal, kind);
}

// Calls f.template operator()<scalar_t>() for the float32 / bfloat16 /
// float16 inputs of the kernels that accumulate in float32; float64, refused
// by the ops before any launch, raises "`op` on CUDA: float64 is not supported".
template <class F>
void dispatch_float32_accumulated(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::Float32: return f.template operator()<float>();
    case DType::BFloat16: return f.template operator()<c10::BFloat16>();
    case DType::Float16: return f.template operator()<c10::Half>();
    case DType::Float64: break;
  }
  TORCH_CHECK(false, op, " on CUDA: float64 is not supported");
}

// Launches `launch` on the prepared call's arguments on the current stream
// (nothing for zero rows) and returns the op's outputs.
template <class Call, class Args>
auto run_divergence_launch(const Call& call, void (*launch)(const Args&, cudaStream_t)) {
  if (call.args.rows > 0) launch(call.args, c10::cuda::getCurrentCUDAStream());
  return call.outputs();
}

}  // namespace cuda
}  // namespace fastkd
