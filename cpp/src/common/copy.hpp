// Private: bulk host copies for gather/scatter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace sagellm::kv::detail {

/// Copies `bytes` from `src` to `dst` (no overlap). Large aligned copies use non-temporal stores, so
/// the destination is not read into the cache first (it is written once and consumed elsewhere:
/// by the network, or by a later kernel); everything else is a plain memcpy. Call `stream_fence()`
/// after a series of copies before another thread reads the destination.
void stream_copy(void* dst, const void* src, std::size_t bytes) noexcept;

/// Copies `bytes` from `src` to `dst` (no overlap; `dst == nullptr`: no copy, sums only) and adds
/// each byte to the segment sum it belongs to (see sagellm_kv/segment_sum.hpp): the bytes are the
/// payload's positions [offset, offset + bytes); `sums[j]` covers positions [j * kSegmentBytes,
/// (j + 1) * kSegmentBytes). Bytes at positions from `sums.size() * kSegmentBytes` on are copied
/// but not summed. Each source byte is loaded once, for both. `stream`: non-temporal stores (then
/// call `stream_fence()` as for stream_copy). Uses AVX-512 or AVX2 where the CPU has them.
void copy_sum(std::byte* dst, const std::byte* src, std::size_t bytes, std::size_t offset,
              std::span<std::uint64_t> sums, bool stream) noexcept;

/// Instruction sets of copy_sum's inner loop.
enum class CopyIsa : std::uint8_t { kPortable, kAvx2, kAvx512 };
/// True when this CPU (and build) can run `isa`.
[[nodiscard]] bool cpu_supports(CopyIsa isa) noexcept;
/// The fastest of them here (what copy_sum uses).
[[nodiscard]] CopyIsa best_copy_isa() noexcept;
/// copy_sum on a given instruction set (tests: every path gives the same bytes and sums); one this
/// CPU lacks falls back to the portable loop.
void copy_sum(std::byte* dst, const std::byte* src, std::size_t bytes, std::size_t offset,
              std::span<std::uint64_t> sums, bool stream, CopyIsa isa) noexcept;

/// Orders preceding non-temporal stores before later stores (sfence on x86; no-op elsewhere).
void stream_fence() noexcept;

/// True when the byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte (compared as
/// addresses: unrelated pointers have no order in C++, their integers do).
[[nodiscard]] inline bool overlaps(const void* a, std::size_t a_bytes, const void* b, std::size_t b_bytes) noexcept {
  const auto x = reinterpret_cast<std::uintptr_t>(a);
  const auto y = reinterpret_cast<std::uintptr_t>(b);
  return a_bytes != 0 && b_bytes != 0 && x < y + b_bytes && y < x + a_bytes;
}

}  // namespace sagellm::kv::detail
