// Host memory backend ("cpu"): aligned allocations, optional transparent huge pages and mlock.
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

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
    if (lock && ::mlock(data, rounded) != 0) {
      const int err = errno;
      std::free(data);
      throw Error(ErrorCode::kMemoryExhausted,
                  "mlock of " + std::to_string(rounded) + " bytes failed on " + id_.str() + ": " +
                      std::strerror(err) + " (raise RLIMIT_MEMLOCK or drop lock_memory)");
    }
    return data;
  }

  void do_deallocate(void* data, std::size_t size, MemoryKind kind) noexcept override {
    // munlock is harmless on an unlocked range; we do not track which ranges were locked.
    if (kind == MemoryKind::kPinnedHost) (void)::munlock(data, size);
    std::free(data);
  }

 private:
  DeviceId id_;
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
