// Chained block hashing: the keys of the prefix cache.
//
// A prompt is cut into full blocks of `block_size` tokens (a trailing partial block is never
// hashed: its KV is not shareable yet). Block i's digest covers its parent's digest, so equal
// digests mean equal whole prefixes, not just equal blocks:
//
//   digest(i) = H(digest(i-1) || key section || token ids of block i),   digest(-1) = root
//
// The root is 32 zero bytes (`kRootBlockHash`), the same for every algorithm, so a chain can be
// reproduced from this description alone.
//
// SHA-256 (the default) hashes a block in one of two ways:
//
// * Plain step, for a block with neither salt nor extra key in play (the common case): the block's
//   token ids, as little-endian int32 and zero-padded to whole 64-byte pieces, are compressed with
//   SHA-256's compression function (FIPS 180-4, no padding, no length) onto the chain state of
//   the parent (the parent digest read as eight big-endian words), and the resulting state, written
//   big-endian, is the digest. The root's state is not its 32 zero bytes but
//   SHA-256("sagellm-kv sha256 chain v2" || block_size as u32), so chains of different block sizes
//   never meet (zero padding alone could make them). A prompt's digests are thus the running states
//   of one Merkle-Damgard pass over its tokens: one compression per 16 tokens, against two plus
//   finalisation for a full message; equal digests mean equal prefixes unless the compression
//   function has a collision, or a chain reaches SHA-256's own initial state (a preimage), which is
//   what separates these digests from the full-message ones below.
// * Full message, for a block with a salt or an extra key: SHA-256 of the message below.
//
// XXH3-128 always hashes the full message. Message of one block, byte for byte (all integers
// little-endian):
//
//   parent digest   32 bytes (an xxh3_128 parent too: its 16 bytes plus 16 zero bytes)
//   salt length     u32, then the salt bytes       (only in a block whose parent is the root,
//                                                   otherwise length 0 and no bytes)
//   extra length    u32, then the extra bytes      (in every block)
//   token count     u32 (= block_size)
//   token ids       block_size x int32
//
// Every variable field is length-prefixed, so no two different (salt, extra, tokens) triples
// produce the same message. Token ids are serialised as int32 whatever their input width: int64
// input is converted, and a value outside the int32 range is refused. Builds whose OpenSSL lacks
// the low-level SHA-256 API (OPENSSL_NO_DEPRECATED_3_0) hash every block as a full message (other
// digests, same properties).
//
// Salt versus extra (the `BlockHashKey`): the salt is a per-tenant secret mixed into the first
// block only (as vLLM's cache_salt); because everything chains from block 0, tenants with
// different salts never share a single block. The extra key (LoRA adapter id, multimodal input
// hash) is mixed into every block, so a block computed under one adapter never matches another's.
//
// Algorithms: SHA-256 through OpenSSL (default; collision-resistant, required when tenants do not
// trust each other) and XXH3-128 from libxxhash (about 10x faster, but an attacker can construct
// collisions: for a single trusted tenant only). An xxh3_128 digest fills the first 16 bytes of
// `BlockHash` in XXH128 canonical (big-endian) order; the rest are zero.
//
// Thread safety: every free function here is thread-safe; a `BlockHasher` object is not (use one
// per thread, or the free `hash_blocks`, which keeps one per thread).
#pragma once

#include <array>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sagellm::kv {

/// Bytes in a block digest (the size of a SHA-256 digest).
inline constexpr std::size_t kBlockHashBytes = 32;

/// One block's digest. A plain 32-byte value: arrays of them are laid out like an (n, 32) uint8
/// array, which is how the Python binding passes them without copies.
struct BlockHash {
  std::array<std::uint8_t, kBlockHashBytes> bytes{};

  /// Lower-case hex of all 32 bytes, for messages and logs.
  [[nodiscard]] std::string hex() const;

  /// Equality in two 16-byte compares (SSE2; four 8-byte ones elsewhere), no memcmp call: the
  /// prefix cache's hottest comparison.
  friend bool operator==(const BlockHash& a, const BlockHash& b) noexcept {
#if defined(__SSE2__)
    const auto* pa = reinterpret_cast<const __m128i*>(a.bytes.data());
    const auto* pb = reinterpret_cast<const __m128i*>(b.bytes.data());
    const __m128i lo = _mm_cmpeq_epi8(_mm_loadu_si128(pa), _mm_loadu_si128(pb));
    const __m128i hi = _mm_cmpeq_epi8(_mm_loadu_si128(pa + 1), _mm_loadu_si128(pb + 1));
    return _mm_movemask_epi8(_mm_and_si128(lo, hi)) == 0xFFFF;
#else
    std::uint64_t x[4];
    std::uint64_t y[4];
    std::memcpy(x, a.bytes.data(), sizeof x);
    std::memcpy(y, b.bytes.data(), sizeof y);
    return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
#endif
  }
  /// Lexicographic byte order.
  auto operator<=>(const BlockHash&) const = default;
};
static_assert(sizeof(BlockHash) == kBlockHashBytes && alignof(BlockHash) == 1);

/// The parent of every chain's first block: 32 zero bytes.
inline constexpr BlockHash kRootBlockHash{};

/// Hash function of the chain.
enum class HashAlgorithm : std::uint8_t {
  kSha256 = 0,   ///< OpenSSL SHA-256; collision-resistant; the default
  kXxh3_128 = 1, ///< libxxhash XXH3-128; fast, not collision-resistant: trusted single tenant only
};

/// Canonical name: "sha256" or "xxh3_128".
[[nodiscard]] std::string_view hash_algorithm_name(HashAlgorithm algorithm) noexcept;

/// Parses an algorithm name ("sha256"; "xxh3_128", also "xxh128"). Throws Error(kInvalidArgument)
/// naming the value and the known names. Does not check availability in this build.
[[nodiscard]] HashAlgorithm parse_hash_algorithm(std::string_view name);

/// True when this build can compute `algorithm` (xxh3_128 needs libxxhash at build time).
[[nodiscard]] bool hash_algorithm_available(HashAlgorithm algorithm) noexcept;

/// Names of the algorithms this build can compute, default first.
[[nodiscard]] std::vector<std::string> available_hash_algorithms();

/// What, besides the tokens, distinguishes one chain from another (see the file comment). Both are
/// views that must outlive the call they are passed to; an empty view means "none".
struct BlockHashKey {
  std::string_view salt;   ///< per-tenant salt; mixed into the block whose parent is the root only
  std::string_view extra;  ///< LoRA / multimodal key; mixed into every block
};

/// Number of full blocks in `num_tokens` tokens (0 when block_size is 0).
[[nodiscard]] constexpr std::size_t num_full_blocks(std::size_t num_tokens, std::uint32_t block_size) noexcept {
  return block_size == 0 ? 0 : num_tokens / block_size;
}

/// Computes block digests with one reusable hashing context, so hashing a prompt costs no
/// allocation and no digest lookup per block.
///
/// Thread safety: one hasher must not be used by two threads at once; use one per thread (the free
/// `hash_blocks` functions below keep one per thread for you).
class BlockHasher {
 public:
  /// Throws Error(kInvalidArgument) naming the available algorithms when `algorithm` is not
  /// available in this build, Error(kBackendUnavailable) when OpenSSL cannot provide SHA-256.
  explicit BlockHasher(HashAlgorithm algorithm = HashAlgorithm::kSha256);
  ~BlockHasher();
  BlockHasher(BlockHasher&&) noexcept;
  BlockHasher& operator=(BlockHasher&&) noexcept;
  BlockHasher(const BlockHasher&) = delete;
  BlockHasher& operator=(const BlockHasher&) = delete;

  [[nodiscard]] HashAlgorithm algorithm() const noexcept;

  /// Writes the digests of the num_full_blocks(tokens.size(), block_size) full blocks of `tokens`
  /// to the front of `out` and returns their number. `parent` is the digest the first block chains
  /// from (kRootBlockHash for a prompt's start; then `key.salt` applies to that first block).
  /// Throws Error(kInvalidArgument) when block_size is 0, `out` is too short, or a salt / extra key
  /// is longer than 2^32-1 bytes; then nothing was written.
  [[nodiscard]] std::size_t hash_blocks(std::span<const std::int32_t> tokens, std::uint32_t block_size,
                                                      const BlockHash& parent, const BlockHashKey& key, std::span<BlockHash> out);

  /// As above for int64 token ids. Throws Error(kInvalidArgument) naming the first value outside
  /// the int32 range and its position (only full blocks are checked); then nothing was written.
  [[nodiscard]] std::size_t hash_blocks(std::span<const std::int64_t> tokens, std::uint32_t block_size,
                                        const BlockHash& parent, const BlockHashKey& key, std::span<BlockHash> out);

  /// Convenience: returns the digests as a new vector.
  [[nodiscard]] std::vector<BlockHash> hash_blocks(std::span<const std::int32_t> tokens, std::uint32_t block_size,
                                                   const BlockHash& parent = kRootBlockHash,
                                                   const BlockHashKey& key = {});

  /// Incremental form of hash_blocks, for a caller that produces the tokens block by block (the
  /// bindings hash each block while reading the next one from a Python list): `start_chain` takes
  /// what hash_blocks takes besides the tokens, then each `next_block` writes the digest of the
  /// chain's next block of block_size tokens. The digests equal hash_blocks' over the concatenated
  /// blocks. `key`'s views must outlive the chain; starting a chain ends the previous one, and so
  /// does any other call on this hasher. start_chain throws as hash_blocks does for a zero
  /// block_size or an oversized key (then no chain is started); next_block without a started
  /// chain throws Error(kInvalidArgument).
  void start_chain(std::uint32_t block_size, const BlockHash& parent, const BlockHashKey& key);
  void next_block(const std::int32_t* tokens, BlockHash& out);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// This thread's hasher for `algorithm`, created on first use: the one the free `hash_blocks`
/// below use, so a chain started on it (start_chain) ends with any of those calls on this thread.
/// Throws as BlockHasher's constructor does.
[[nodiscard]] BlockHasher& thread_block_hasher(HashAlgorithm algorithm);

/// `BlockHasher::hash_blocks` through a hasher kept per thread and algorithm (created on first use).
/// Thread-safe: every thread uses its own hasher.
[[nodiscard]] std::size_t hash_blocks(HashAlgorithm algorithm, std::span<const std::int32_t> tokens,
                                      std::uint32_t block_size, const BlockHash& parent, const BlockHashKey& key,
                                      std::span<BlockHash> out);

/// int64 variant of the above; same range check.
[[nodiscard]] std::size_t hash_blocks(HashAlgorithm algorithm, std::span<const std::int64_t> tokens,
                                      std::uint32_t block_size, const BlockHash& parent, const BlockHashKey& key,
                                      std::span<BlockHash> out);

/// Plain (unchained, unkeyed) SHA-256 of each `chunk_bytes`-byte chunk of `data`, in order, written
/// to `out[0..n)` with n = data.size() / chunk_bytes; returns n. This is how the original Python
/// package keyed a block (SHA-256 of its token ids as 4-byte big-endian integers; the caller lays
/// them out). Throws Error(kInvalidArgument) when chunk_bytes is 0, data.size() is not a multiple
/// of it, or `out` is too short; then nothing was written. Thread-safe (no shared state).
[[nodiscard]] std::size_t sha256_chunks(std::span<const std::uint8_t> data, std::size_t chunk_bytes,
                                        std::span<BlockHash> out);

/// Chains independent 32-byte keys into prefix digests: out[0] = keys[0] and out[i] = the SHA-256
/// compression function, from SHA-256's initial state, of the 64-byte block out[i-1] || keys[i]
/// (one compression, no padding: a fixed-length input needs none, and it costs half of
/// SHA-256(out[i-1] || keys[i])), so equal keys at equal positions give equal digests only under
/// equal prefixes. Builds without OpenSSL's low-level SHA-256 API use SHA-256(out[i-1] || keys[i]). `out` may alias `keys` exactly. Throws Error(kInvalidArgument) when `out`
/// is shorter than `keys` (nothing written). Thread-safe (no shared state).
void sha256_chain(std::span<const BlockHash> keys, std::span<BlockHash> out);

}  // namespace sagellm::kv
