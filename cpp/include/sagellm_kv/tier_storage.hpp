// Building blocks of the tiered KV store (device pool -> host slab -> disk slots; the policy lives
// in the Python layer, python/sagellm_kv_cache/tiers.py):
//   * `HostSlab`: fixed-size slots of host memory, page-locked through the device's allocator when
//     the device tier is an accelerator (so copies to and from it can use DMA), plain page-aligned
//     host memory for a CPU device. Slot starts are 4096-byte aligned, so a slot can be the buffer
//     of an O_DIRECT read or write.
//   * `block_checksum`: the 64-bit checksum stored with every disk slot, so a torn or stale slot is
//     never served.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "sagellm_kv/device.hpp"

namespace sagellm::kv {

/// Alignment of a HostSlab's slots (and of O_DIRECT buffers, offsets and sizes).
inline constexpr std::size_t kSlotAlignment = 4096;

/// 64-bit checksum of `bytes`: XXH3-64 when the core was built with libxxhash, else a 4-lane
/// multiply-rotate hash of 8-byte words (both several GB/s; neither is cryptographic: they catch
/// torn and stale writes, not an adversary). Thread-safe (pure function).
[[nodiscard]] std::uint64_t block_checksum(std::span<const std::byte> bytes) noexcept;

/// Name of the algorithm `block_checksum` uses in this build ("xxh3_64" or "mulrot64"); a disk tier
/// records it and refuses files written with another.
[[nodiscard]] std::string_view block_checksum_algorithm() noexcept;

/// `num_slots` slots of `slot_bytes` each (stride rounded up to kSlotAlignment) in one allocation.
///
/// Thread safety: the memory is shared; the slab does no synchronisation of its own (callers own
/// disjoint slots). All members are const after construction and safe from any thread.
class HostSlab {
 public:
  /// Allocates the slab for a device tier on `device`: pinned host memory through that device's
  /// allocator when `device` is not "cpu" (throws that backend's error when it is unusable), plain
  /// host memory otherwise. Throws Error(kInvalidArgument) for zero sizes or a slab above 2^48 bytes.
  HostSlab(std::uint32_t num_slots, std::size_t slot_bytes, std::string_view device = "cpu", bool zero_fill = false);

  [[nodiscard]] std::uint32_t num_slots() const noexcept { return num_slots_; }
  [[nodiscard]] std::size_t slot_bytes() const noexcept { return slot_bytes_; }
  [[nodiscard]] std::size_t slot_stride() const noexcept { return stride_; }
  [[nodiscard]] bool pinned() const noexcept { return memory_.kind() == MemoryKind::kPinnedHost; }
  /// First slot (kSlotAlignment-aligned whatever alignment the backend gives).
  [[nodiscard]] std::byte* data() const noexcept { return base_; }
  /// Bytes of the slots: num_slots() * slot_stride().
  [[nodiscard]] std::size_t size() const noexcept { return stride_ * num_slots_; }

  /// Start of slot `i`. Throws Error(kInvalidBlock) naming `i` when it is out of range.
  [[nodiscard]] std::byte* slot(std::uint32_t i) const;

 private:
  std::uint32_t num_slots_;
  std::size_t slot_bytes_;
  std::size_t stride_;
  Allocation memory_;
  std::byte* base_ = nullptr;
};

}  // namespace sagellm::kv
