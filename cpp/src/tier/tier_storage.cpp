#include "sagellm_kv/tier_storage.hpp"

#include <bit>
#include <cstring>
#include <string>

#include "sagellm_kv/error.hpp"

#if defined(SAGELLM_KV_HAVE_XXHASH)
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif

namespace sagellm::kv {

namespace {

#if !defined(SAGELLM_KV_HAVE_XXHASH)
constexpr std::uint64_t kPrime1 = 0x9E3779B185EBCA87ULL;
constexpr std::uint64_t kPrime2 = 0xC2B2AE3D27D4EB4FULL;

std::uint64_t load64(const std::byte* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

std::uint64_t mix(std::uint64_t h, std::uint64_t w) noexcept {
  return std::rotl((h ^ (w * kPrime2)) * kPrime1, 31);
}

// Four independent lanes keep the multiplier busy; the tail and the length fold in at the end.
std::uint64_t mulrot64(std::span<const std::byte> bytes) noexcept {
  std::uint64_t lane[4] = {kPrime1, kPrime2, kPrime1 ^ kPrime2, ~kPrime1};
  const std::byte* p = bytes.data();
  std::size_t n = bytes.size();
  for (; n >= 32; p += 32, n -= 32) {
    for (int i = 0; i < 4; ++i) lane[i] = mix(lane[i], load64(p + 8 * i));
  }
  std::uint64_t h = std::rotl(lane[0], 1) + std::rotl(lane[1], 7) + std::rotl(lane[2], 12) + std::rotl(lane[3], 18);
  for (; n >= 8; p += 8, n -= 8) h = mix(h, load64(p));
  std::uint64_t tail = 0;
  std::memcpy(&tail, p, n);
  h = mix(h, tail);
  h = mix(h, bytes.size());
  h ^= h >> 33;
  h *= kPrime2;
  h ^= h >> 29;
  return h;
}
#endif

std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

}  // namespace

std::uint64_t block_checksum(std::span<const std::byte> bytes) noexcept {
#if defined(SAGELLM_KV_HAVE_XXHASH)
  return XXH3_64bits(bytes.data(), bytes.size());
#else
  return mulrot64(bytes);
#endif
}

std::string_view block_checksum_algorithm() noexcept {
#if defined(SAGELLM_KV_HAVE_XXHASH)
  return "xxh3_64";
#else
  return "mulrot64";
#endif
}

HostSlab::HostSlab(std::uint32_t num_slots, std::size_t slot_bytes, std::string_view device, bool zero_fill)
    : num_slots_(num_slots), slot_bytes_(slot_bytes), stride_(0) {
  if (num_slots == 0) throw Error(ErrorCode::kInvalidArgument, "HostSlab: num_slots must be > 0, got 0");
  constexpr std::size_t kMaxBytes = std::size_t{1} << 48;
  if (slot_bytes == 0 || slot_bytes > kMaxBytes) {
    throw Error(ErrorCode::kInvalidArgument,
                "HostSlab: slot_bytes must be in [1, 2^48], got " + std::to_string(slot_bytes));
  }
  stride_ = round_up(slot_bytes, kSlotAlignment);
  if (stride_ > kMaxBytes / num_slots) {
    throw Error(ErrorCode::kInvalidArgument, "HostSlab: " + std::to_string(num_slots) + " slots of " +
                                                 std::to_string(stride_) + " bytes exceed 2^48 bytes");
  }
  // The device's own allocator in both cases: it refuses a device that does not exist ("cpu:1").
  const std::shared_ptr<DeviceAllocator> allocator = allocator_for(device);
  const bool host_device = allocator->device().type == "cpu";
  AllocationRequest request;
  // One alignment unit more than the slots need: a backend that does not honour the alignment
  // (pinned memory comes from the CUDA runtime's own allocator) still yields aligned slots.
  request.size = stride_ * num_slots + kSlotAlignment;
  request.alignment = kSlotAlignment;
  request.kind = host_device ? MemoryKind::kHost : MemoryKind::kPinnedHost;
  request.zero_fill = zero_fill;
  memory_ = allocator->allocate(request);
  const auto addr = reinterpret_cast<std::uintptr_t>(memory_.data());
  base_ = static_cast<std::byte*>(memory_.data()) + (kSlotAlignment - addr % kSlotAlignment) % kSlotAlignment;
}

std::byte* HostSlab::slot(std::uint32_t i) const {
  if (i >= num_slots_) {
    throw Error(ErrorCode::kInvalidBlock,
                "HostSlab: slot " + std::to_string(i) + " out of range [0, " + std::to_string(num_slots_) + ")");
  }
  return data() + std::size_t{i} * stride_;
}

}  // namespace sagellm::kv
