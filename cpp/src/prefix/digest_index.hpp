// Private: the digest -> node index of the prefix cache.
//
// Open addressing with linear probing over 8-byte slots {tag, node}; no allocation per entry (an
// std::unordered_map would allocate one per cached block), deletion by backward shift (no
// tombstones). The slot's home is the top bits of a keyed mix of the digest's first 8 bytes: the
// digests are already uniform, and the per-index random key keeps a client from grinding prompts
// whose digests pile into one probe run. The tag is the top 32 bits of the same mix, so the home of
// any stored slot is `tag >> (32 - bits)`: growing and deleting never read the node records.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "sagellm_kv/hashing.hpp"

namespace sagellm::kv::detail {

class DigestIndex {
 public:
  static constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();

  explicit DigestIndex(std::uint64_t key) : key_(key) { rehash(kMinBits); }

  [[nodiscard]] std::uint32_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t memory_bytes() const noexcept { return slots_.capacity() * sizeof(Slot); }

  /// Node stored under `digest`, or kNone. `digest_of(node)` returns the node's digest.
  template <class DigestOf>
  [[nodiscard]] std::uint32_t find(const BlockHash& digest, const DigestOf& digest_of) const noexcept {
    const std::uint32_t tag = tag_of(digest);
    for (std::uint32_t i = home(tag);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.node == kNone) return kNone;
      if (s.tag == tag && digest_of(s.node) == digest) return s.node;
    }
  }

  /// Starts loading the slot where a lookup of `digest` begins (a hint; no effect on results).
  void prefetch(const BlockHash& digest) const noexcept { __builtin_prefetch(&slots_[home(tag_of(digest))]); }

  /// Node in the slot where a lookup of `digest` begins, whatever digest it holds (kNone: empty),
  /// so a caller can prefetch the likely node; `find` gives the answer.
  [[nodiscard]] std::uint32_t home_node(const BlockHash& digest) const noexcept {
    return slots_[home(tag_of(digest))].node;
  }

  /// Adds `digest` -> `node`; the digest must not be present.
  void insert(const BlockHash& digest, std::uint32_t node) {
    if (std::uint64_t{size_ + 1} * 2 > slots_.size()) rehash(bits_ + 1);
    place({tag_of(digest), node});
    ++size_;
  }

  /// Grows the table now so that inserts up to `n` entries in all do not rehash (or allocate).
  void reserve(std::uint32_t n) {
    std::uint32_t bits = bits_;
    while (std::uint64_t{n} * 2 > (std::uint64_t{1} << bits)) ++bits;
    if (bits != bits_) rehash(bits);
  }

  /// Removes `digest`, which must be present as `node`. Returns false, changing nothing, when it is
  /// not (a broken invariant: the probe stops at the run's end instead of looping).
  bool erase(const BlockHash& digest, std::uint32_t node) noexcept {
    std::uint32_t i = home(tag_of(digest));
    while (slots_[i].node != node) {
      if (slots_[i].node == kNone) {
        assert(!"DigestIndex::erase of an entry that is not there");
        return false;
      }
      i = (i + 1) & mask_;
    }
    // Backward shift: pull every later entry of the run whose home is not in (i, j] into the hole,
    // so no lookup ever stops early at an empty slot.
    std::uint32_t hole = i;
    for (std::uint32_t j = (i + 1) & mask_; slots_[j].node != kNone; j = (j + 1) & mask_) {
      const std::uint32_t h = home(slots_[j].tag);
      const bool stays = ((j - h) & mask_) < ((j - hole) & mask_);
      if (!stays) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = Slot{};
    --size_;
    return true;
  }

  /// Removes everything and returns to the minimal table when it can get one: without memory for
  /// it, the emptied table stays (as good, only larger). Cannot fail, so a caller that already
  /// removed the nodes (PrefixCache::clear) never stops half way.
  void clear() noexcept {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    size_ = 0;
    try {
      rehash(kMinBits);
    } catch (const std::bad_alloc&) {
    }
  }

 private:
  struct Slot {
    std::uint32_t tag = 0;
    std::uint32_t node = kNone;
  };
  static constexpr std::uint32_t kMinBits = 4;

  [[nodiscard]] std::uint32_t tag_of(const BlockHash& digest) const noexcept {
    std::uint64_t x = 0;
    std::memcpy(&x, digest.bytes.data(), sizeof x);
    // splitmix64's finaliser over the keyed prefix: a bijection whose top bits depend on every
    // input bit, so the unknown key scrambles which slot a digest lands in.
    x ^= key_;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    return static_cast<std::uint32_t>(x >> 32);
  }
  [[nodiscard]] std::uint32_t home(std::uint32_t tag) const noexcept { return tag >> (32 - bits_); }

  void place(Slot s) noexcept {
    std::uint32_t i = home(s.tag);
    while (slots_[i].node != kNone) i = (i + 1) & mask_;
    slots_[i] = s;
  }

  // Strong guarantee: the new table is allocated before anything changes, so a bad_alloc leaves
  // the index as it was (an insert's prepare phase relies on that).
  void rehash(std::uint32_t bits) {
    std::vector<Slot> old(std::size_t{1} << bits, Slot{});
    old.swap(slots_);
    bits_ = bits;
    mask_ = static_cast<std::uint32_t>(slots_.size() - 1);
    for (const Slot& s : old) {
      if (s.node != kNone) place(s);
    }
  }

  std::uint64_t key_;
  std::vector<Slot> slots_;
  std::uint32_t bits_ = 0;
  std::uint32_t mask_ = 0;
  std::uint32_t size_ = 0;
};

}  // namespace sagellm::kv::detail
