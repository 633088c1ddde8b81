#include "allocation.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>

namespace fastkd {
namespace cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kPage = size_t(4) << 10;
constexpr size_t kAlignment = 64;

size_t cache_limit_bytes() {
  const char* env = std::getenv("FASTKD_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(2048) << 20;
  return static_cast<size_t>(std::stoull(env)) << 20;
}

class OutputCache {
 public:
  // Never destroyed: tensors alive at exit still return their buffers here.
  static OutputCache& instance() {
    static auto* cache = new OutputCache(cache_limit_bytes());
    return *cache;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* block = it->second;
    free_.erase(it);
    held_ -= bytes;
    return block;
  }

  void give(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= limit_) {
        free_.emplace(bytes, block);
        held_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  size_t release_all() {
    std::multimap<size_t, void*> blocks;
    size_t released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      released = held_;
      held_ = 0;
    }
    for (auto& entry : blocks) std::free(entry.second);
    return released;
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

  bool enabled() const { return limit_ > 0; }

 private:
  explicit OutputCache(size_t limit) : limit_(limit) {}

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size → free block of exactly that size
  size_t held_ = 0;
  const size_t limit_;
};

}  // namespace

at::Tensor empty_for_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  size_t numel = 1;
  for (const int64_t size : sizes) numel *= static_cast<size_t>(size);
  const size_t nbytes = numel * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  OutputCache& cache = OutputCache::instance();
  if (nbytes < kMinCachedBytes || !cache.enabled()) return at::empty(sizes, options);
  const size_t rounded = (nbytes + kPage - 1) / kPage * kPage;
  void* block = cache.take(rounded);
  if (block == nullptr) {
    block = std::aligned_alloc(kAlignment, rounded);
    if (block == nullptr) throw std::bad_alloc();
  }
  return at::from_blob(
      block, sizes, [rounded](void* data) { OutputCache::instance().give(data, rounded); },
      options);
}

at::Tensor mm_into_cached(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = empty_for_output({a.size(0), b.size(1)}, a.options());
  at::mm_out(out, a, b);
  return out;
}

size_t release_cached_outputs() { return OutputCache::instance().release_all(); }

size_t cached_output_bytes() { return OutputCache::instance().held(); }

}  // namespace cpu
}  // namespace fastkd
