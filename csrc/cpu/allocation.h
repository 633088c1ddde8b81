// Output allocation for the CPU kernels: a small cache of freed output
// buffers, the CPU counterpart of the CUDA caching allocator. The n × n
// scratch matrices of the pairwise losses (Gram and distance matrices of
// SP, CC, PKT, RKD distance) come from it too: freed when the op returns,
// they are there for the next step's call.
//
// Why: a freshly allocated output is paid for in page faults on first touch.
// On the development machine a 250 MiB gradient costs ~60 ms of faults,
// more than the ~40 ms of the whole fused divergence that fills it, and
// PyTorch's CPU allocator returns large blocks to the OS on free. In a
// training loop the gradient of step k is freed (zero_grad / set_to_none)
// before step k+1 asks for one of the same size, so keeping it makes every
// step after the first fault-free.
//
// Policy: outputs of at least 1 MiB; exact (4 KiB-rounded) size match; at most
// FASTKD_CPU_CACHE_MB MiB held (default 2048; 0 disables the cache). Freed
// buffers beyond the limit go back to the OS. fastkd.empty_cache() releases
// everything held.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fastkd {
namespace cpu {

// at::empty, from the cache where a buffer of the same size is free.
at::Tensor empty_for_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// a [M, K] @ b [K, N] into a buffer from empty_for_output: for the large
// scratch products (Gram, distance and logits matrices) that a training loop
// frees and asks for again at the same size every step.
at::Tensor mm_into_cached(const at::Tensor& a, const at::Tensor& b);

// Frees every cached buffer; returns the bytes released.
size_t release_cached_outputs();

// Bytes held in free cached buffers.
size_t cached_output_bytes();

}  // namespace cpu
}  // namespace fastkd
