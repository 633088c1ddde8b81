#include "allocation.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd {
namespace cpu {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
}

at::Tensor empty_for_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  size_t numel = 1;
  for (const int64_t size : sizes) numel *= static_cast<size_t>(size);
  const size_t nbytes = numel * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes >= kHugePage) {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, rounded) != 0) throw std::bad_alloc();
    // Advice only: failure (THP unsupported) leaves ordinary pages.
    madvise(data, rounded, MADV_HUGEPAGE);
    return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace fastkd
