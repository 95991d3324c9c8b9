// Device memory allocators behind one interface, and the registry that maps a device string
// ("cpu", "cuda:1") to an allocator.
//
// Contract: a request names the device, the kind of memory, the size and the alignment; the result
// is an `Allocation` that owns the memory and frees it through the allocator that made it. Adding a
// backend (ROCm, Ascend) is one new folder under src/device/ plus one `register_backend` call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sagellm::kv {

/// Where memory lives and who can touch it.
enum class MemoryKind : std::uint8_t {
  kHost = 0,        ///< pageable host memory
  kPinnedHost = 1,  ///< page-locked host memory a device can DMA from/to
  kDevice = 2,      ///< memory on the accelerator
};

/// A parsed device string: backend type plus ordinal ("cuda:1" -> {"cuda", 1}; "cpu" -> {"cpu", 0}).
struct DeviceId {
  std::string type;
  int index = 0;

  /// Canonical string form, e.g. "cpu" or "cuda:1".
  [[nodiscard]] std::string str() const;
  /// Parses "type" or "type:N" (N decimal, no sign, spaces or leading zeros, within int; torch's
  /// grammar). Throws Error(kUnknownDevice) naming the string when it is malformed.
  [[nodiscard]] static DeviceId parse(std::string_view text);

  bool operator==(const DeviceId&) const = default;
};

/// What to allocate.
struct AllocationRequest {
  std::size_t size = 0;            ///< bytes; must be > 0
  std::size_t alignment = 64;      ///< power of two
  MemoryKind kind = MemoryKind::kHost;
  bool zero_fill = false;          ///< memory reads as zeros on return
  bool huge_pages = false;         ///< host only: advise transparent huge pages
  bool lock = false;               ///< host only: mlock the range (best effort is an error here)
};

class DeviceAllocator;

/// Owning handle to one allocation; frees it through its allocator on destruction. Move-only.
class Allocation {
 public:
  Allocation() = default;
  Allocation(void* data, std::size_t size, MemoryKind kind, std::shared_ptr<DeviceAllocator> owner);
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;
  Allocation(Allocation&& other) noexcept;
  Allocation& operator=(Allocation&& other) noexcept;
  ~Allocation();

  [[nodiscard]] void* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] MemoryKind kind() const noexcept { return kind_; }
  [[nodiscard]] DeviceAllocator* allocator() const noexcept { return owner_.get(); }
  explicit operator bool() const noexcept { return data_ != nullptr; }

 private:
  void reset() noexcept;

  void* data_ = nullptr;
  std::size_t size_ = 0;
  MemoryKind kind_ = MemoryKind::kHost;
  std::shared_ptr<DeviceAllocator> owner_;
};

/// Direction of a copy for `DeviceAllocator::copy`.
enum class CopyKind : std::uint8_t { kHostToHost, kHostToDevice, kDeviceToHost, kDeviceToDevice };

/// One backend's allocator for one device. Implementations are thread-safe.
class DeviceAllocator : public std::enable_shared_from_this<DeviceAllocator> {
 public:
  virtual ~DeviceAllocator() = default;

  /// The device this allocator serves.
  [[nodiscard]] virtual const DeviceId& device() const noexcept = 0;

  /// Allocates per `request`. Throws Error(kInvalidArgument) on a zero size or a bad alignment,
  /// Error(kMemoryExhausted) when the memory is not there, Error(kBackendUnavailable) when the
  /// backend cannot run on this machine, Error(kNotImplemented) for a kind it does not offer.
  [[nodiscard]] Allocation allocate(const AllocationRequest& request);

  /// Copies `bytes` between two ranges this allocator can reach. Synchronous.
  virtual void copy(void* dst, const void* src, std::size_t bytes, CopyKind kind) = 0;

  /// Copies `rows` rows of `row_bytes` each, from `src` (rows `src_pitch` bytes apart) to `dst`
  /// (rows `dst_pitch` bytes apart). Synchronous. The default loops over `copy`; backends with a
  /// strided copy engine override it (one call instead of one per row).
  virtual void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
                       std::size_t row_bytes, std::size_t rows, CopyKind kind);

  /// Sets `bytes` at `dst` to zero. Synchronous.
  virtual void zero(void* dst, std::size_t bytes, MemoryKind kind) = 0;

 protected:
  friend class Allocation;
  virtual void* do_allocate(const AllocationRequest& request) = 0;
  virtual void do_deallocate(void* data, std::size_t size, MemoryKind kind) noexcept = 0;
};

/// Makes an allocator for one device of a backend; throws Error(kBackendUnavailable) when the
/// device cannot be used here. Called without any registry lock held, so it may take its time
/// (load a library) and may call allocator_for for another device; it may run on several threads
/// at once for the same device, and a result may be dropped in favour of another thread's.
using BackendFactory = std::function<std::shared_ptr<DeviceAllocator>(const DeviceId&)>;

/// Registers a backend under a device type name ("cpu", "cuda"). Thread-safe. Replaces an earlier
/// registration of the same name and forgets the allocators its factory made; a call of the old
/// factory still running in allocator_for is not cached.
void register_backend(const std::string& type, BackendFactory factory);

/// Names of the registered backends, sorted.
[[nodiscard]] std::vector<std::string> registered_backends();

/// The allocator for a device string. One allocator per device, shared. Throws
/// Error(kUnknownDevice) naming the string and the known backends when no backend matches, or the
/// backend's own error when the device is unusable (e.g. "cuda:0" on a machine without CUDA); a
/// factory that throws leaves nothing cached, so a later call tries again. Thread-safe: the
/// registry lock is held only to look up and to insert, never across a factory call, so a slow
/// factory blocks no lookup of another device; concurrent first calls for one device may each run
/// the factory, and all of them return the one allocator that was cached first. A factory that
/// asks for its own device gets Error(kInvalidArgument) instead of endless recursion.
[[nodiscard]] std::shared_ptr<DeviceAllocator> allocator_for(std::string_view device);

}  // namespace sagellm::kv
