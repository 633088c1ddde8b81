// Output allocation for the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastkd {
namespace cpu {

// at::empty, except that outputs of at least 2 MiB are placed in 2 MiB-aligned
// memory advised for transparent huge pages (madvise(MADV_HUGEPAGE)), as
// PyTorch's own allocator does under THP_MEM_ALLOC_ENABLE=1. A fresh output is
// paid for in page faults on first touch: with 4 KiB pages that costs more
// than computing a whole divergence (a 250 MiB gradient: ~60 ms of faults
// against ~40 ms of work on the development machine); huge pages cut the
// number of faults 512-fold. Where THP is disabled the advice is ignored.
at::Tensor empty_for_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace fastkd
