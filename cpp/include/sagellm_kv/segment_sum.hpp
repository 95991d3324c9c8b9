// Segment sums: the bulk part of the transfer payload checksum ("segsum64" on the wire).
//
// A payload is cut into segments of `kSegmentBytes` bytes; the sum of a full segment is the sum,
// modulo 2^64, of its 512 little-endian 64-bit words. A trailing partial segment has no sum (the
// wire checksum hashes its raw bytes instead). The wire checksum is a short hash over the vector
// of sums, the tail and the length (python/sagellm_kv_cache/transfer/wire.py); the sums are the
// part that touches every byte, so they are what a gather or scatter computes in the same pass
// as its copy (PagedKVPool::gather_summed / scatter_summed): each byte is read once.
//
// Thread safety: the free functions here are pure; they are safe from any thread as long as no
// other thread writes the bytes they read or the sums they write.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace sagellm::kv {

/// Bytes per checksum segment.
inline constexpr std::size_t kSegmentBytes = 4096;

/// Number of full segments (= sums) of a payload of `nbytes`.
[[nodiscard]] constexpr std::size_t segment_count(std::size_t nbytes) noexcept { return nbytes / kSegmentBytes; }

/// Writes the sum of every full segment of `data` into `sums`, which must hold exactly
/// `segment_count(data.size())` entries and share no memory with `data` (Error(kInvalidArgument),
/// naming both sizes for the first, before anything is written).
void segment_sums(std::span<const std::byte> data, std::span<std::uint64_t> sums);

}  // namespace sagellm::kv
