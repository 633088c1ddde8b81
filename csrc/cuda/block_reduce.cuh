// Block-wide reductions shared by the CUDA kernels: a cub::BlockReduce whose
// result every thread of the block receives, and the component-wise sums the
// kernels reduce with it (float, double and their 2- and 3-vectors).
#pragma once

#include <cub/block/block_reduce.cuh>

namespace fastkd {
namespace cuda {

// a + b for any type with operator+ (float, double, int64_t ...).
struct SumOp {
  template <class T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

// Component-wise sums of CUDA's vector types.
struct SumOp2 {
  __device__ __forceinline__ float2 operator()(const float2& a, const float2& b) const {
    return make_float2(a.x + b.x, a.y + b.y);
  }
  __device__ __forceinline__ double2 operator()(const double2& a, const double2& b) const {
    return make_double2(a.x + b.x, a.y + b.y);
  }
};

struct SumOp3 {
  __device__ __forceinline__ float3 operator()(const float3& a, const float3& b) const {
    return make_float3(a.x + b.x, a.y + b.y, a.z + b.z);
  }
};

// Reduces `value` over the block and returns the total to every thread.
// `temp` and `result` are free again when this returns (second barrier).
// Every thread of the block must call it (it contains __syncthreads).
template <int BLOCK, class T, class Op>
__device__ __forceinline__ T block_all_reduce(T value, Op op,
                                              typename cub::BlockReduce<T, BLOCK>::TempStorage& temp,
                                              T& result) {
  const T total = cub::BlockReduce<T, BLOCK>(temp).Reduce(value, op);
  if (threadIdx.x == 0) result = total;
  __syncthreads();
  const T broadcast = result;
  __syncthreads();
  return broadcast;
}

}  // namespace cuda
}  // namespace fastkd
