// Host memory backend ("cpu"): aligned allocations, optional transparent huge pages and mlock.
#include <sys/mman.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>

#include "device/backends.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv::detail {
namespace {

constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;

class CpuAllocator final : public DeviceAllocator {
 public:
  explicit CpuAllocator(DeviceId id) : id_(std::move(id)) {}

  const DeviceId& device() const noexcept override { return id_; }

  void copy(void* dst, const void* src, std::size_t bytes, CopyKind /*kind*/) override {
    if (bytes != 0) std::memcpy(dst, src, bytes);
  }

  void zero(void* dst, std::size_t bytes, MemoryKind /*kind*/) override {
    if (bytes != 0) std::memset(dst, 0, bytes);
  }

 protected:
  void* do_allocate(const AllocationRequest& request) override {
    // On the CPU the "device" is host memory; pinned host means locked host memory.
    const bool lock = request.lock || request.kind == MemoryKind::kPinnedHost;
    std::size_t alignment = std::max<std::size_t>(request.alignment, alignof(std::max_align_t));
    if (request.huge_pages) alignment = std::max(alignment, kHugePageBytes);
    // A locked range owns whole pages: unlocking it on free then never unlocks a neighbour's page.
    if (lock) alignment = std::max(alignment, page_bytes());
    if (request.size > std::numeric_limits<std::size_t>::max() - (alignment - 1)) {  // rounding would wrap
      throw Error(ErrorCode::kMemoryExhausted, "cannot allocate " + std::to_string(request.size) +
                                                   " bytes of host memory on " + id_.str());
    }
    // aligned_alloc wants a size that is a multiple of the alignment.
    const std::size_t rounded = (request.size + alignment - 1) / alignment * alignment;
    void* data = std::aligned_alloc(alignment, rounded);
    if (data == nullptr) {
      throw Error(ErrorCode::kMemoryExhausted, "cannot allocate " + std::to_string(request.size) +
                                                   " bytes of host memory on " + id_.str());
    }
    if (request.huge_pages) {
      // Advice only: a kernel without THP keeps working with normal pages.
      (void)::madvise(data, rounded, MADV_HUGEPAGE);
    }
    if (request.zero_fill) std::memset(data, 0, request.size);
    if (lock) {
      if (::mlock(data, rounded) != 0) {
        const int err = errno;
        std::free(data);
        throw Error(ErrorCode::kMemoryExhausted,
                    "mlock of " + std::to_string(rounded) + " bytes failed on " + id_.str() + ": " +
                        std::strerror(err) + " (raise RLIMIT_MEMLOCK or drop lock_memory)");
      }
      try {
        const std::lock_guard guard(locked_mutex_);
        locked_.emplace(data, rounded);
      } catch (...) {
        (void)::munlock(data, rounded);
        std::free(data);
        throw;
      }
    }
    return data;
  }

  void do_deallocate(void* data, std::size_t /*size*/, MemoryKind /*kind*/) noexcept override {
    // Unlocks exactly what do_allocate locked, whatever the kind (lock = true on pageable memory
    // too): freed memory left locked would stay locked under the heap's next user.
    {
      const std::lock_guard guard(locked_mutex_);
      if (const auto it = locked_.find(data); it != locked_.end()) {
        (void)::munlock(data, it->second);
        locked_.erase(it);
      }
    }
    std::free(data);
  }

 private:
  static std::size_t page_bytes() noexcept {
    const long page = ::sysconf(_SC_PAGESIZE);
    return page > 0 ? static_cast<std::size_t>(page) : std::size_t{4096};
  }

  DeviceId id_;
  std::mutex locked_mutex_;                          // guards locked_ (allocations are a cold path)
  std::unordered_map<void*, std::size_t> locked_;  // locked allocations -> the bytes mlock took
};

}  // namespace

std::shared_ptr<DeviceAllocator> make_cpu_allocator(const DeviceId& id) {
  if (id.index != 0) {
    throw Error(ErrorCode::kUnknownDevice,
                "device '" + id.str() + "' does not exist: the cpu backend has one device, 'cpu'");
  }
  return std::make_shared<CpuAllocator>(id);
}

}  // namespace sagellm::kv::detail
