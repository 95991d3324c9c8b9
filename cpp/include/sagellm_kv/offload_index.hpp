// Offload index: the bookkeeping of an offloading tier's chunk slots (vLLM's OffloadingManager side
// of a host KV tier), composed of a BlockAllocator (the slots) and a PrefixCache (the resident ones).
//
// A slot is free, pending (reserved for a store in progress: not readable, never evicted) or
// resident (stored: a node of the trie, named by `slot_digest(slot)`, readable and evictable).
// Resident slots are chained in request order: when a store completes, a slot's parent is the slot
// that preceded it in the `reserve` call that reserved it (or the call's `first_prev`) if that one
// is still resident and still holds the same chunk, else the root. Eviction therefore takes the
// tail of a prefix before its head, in the trie's policy order among leaves (LRU by default), and
// a `pin` (a load in flight) keeps a slot and its ancestors from eviction until `unpin`.
//
// The index knows slots only: mapping an engine's chunk keys to slots is the caller's (the Python
// binding keeps them in dicts, where a key probe costs less than any call into C++).
//
// Slot ownership: a pending slot holds the allocator reference `reserve` took; `commit` hands it
// to the trie (which takes its own and the index drops the reservation's), `abandon` frees it.
//
// Thread safety: every member function may be called from any thread; one mutex serialises them
// (each call holds it for O(slots passed + their chain depth) work, or O(num_slots) for reset and
// check_invariants). Calls into the PrefixCache and BlockAllocator happen under that mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace sagellm::kv {

/// Configuration of an `OffloadIndex`.
struct OffloadIndexOptions {
  std::uint32_t num_slots = 0;                  ///< > 0 and <= BlockAllocator::kMaxBlocks
  EvictionPolicy policy = EvictionPolicy::kLru;  ///< the trie's eviction order among leaves
  double ttl_seconds = 300.0;                   ///< kTtl only

  /// Throws Error(kInvalidArgument) naming the first bad field.
  void validate() const;
};

/// What a slot holds now.
enum class SlotState : std::uint8_t {
  kFree = 0,
  kPending = 1,   ///< reserved by `reserve`, not committed or abandoned yet
  kResident = 2,  ///< committed: a trie node
};

/// Counts of an `OffloadIndex` plus its trie's counters. A consistent snapshot.
struct OffloadIndexStats {
  std::uint32_t num_slots = 0;
  std::uint32_t free_slots = 0;
  std::uint32_t pending_slots = 0;
  std::uint32_t resident_slots = 0;
  std::uint64_t evictions = 0;  ///< resident slots evicted by `reserve` since construction or reset
  /// The trie's counters (lookups count pins, touches and the spare pins of an evicting reserve).
  /// Its `evictions` stays 0: the index takes victims out detached and counts them above.
  PrefixCacheStats trie;
};

/// The offload index (see the file comment).
///
/// Thread safety: every member function may be called from any number of threads at once (one
/// internal mutex); `num_slots()` and `slot_digest()` need none.
class OffloadIndex {
 public:
  /// "No slot": the root as a parent, or a position of `reserve`'s input that needs a new slot.
  static constexpr BlockId kNoSlot = -1;

  /// Creates an index with every slot free. Throws Error(kInvalidArgument) for bad options.
  explicit OffloadIndex(const OffloadIndexOptions& options);
  ~OffloadIndex();
  OffloadIndex(const OffloadIndex&) = delete;
  OffloadIndex& operator=(const OffloadIndex&) = delete;

  /// The trie digest naming `slot`: its 8-byte little-endian number, then a fixed 24-byte tag.
  [[nodiscard]] static BlockHash slot_digest(BlockId slot) noexcept;

  [[nodiscard]] std::uint32_t num_slots() const noexcept { return num_slots_; }

  /// Reserves a slot for each `kNoSlot` entry of `call` (one store call's chunks, in request order;
  /// the other entries are the slots of chunks already pending or resident), writing them, in order,
  /// to `reserved` (exactly that many entries). Each reserved slot remembers the slot before it in
  /// `call` (for the first entry: `first_prev`, which may be kNoSlot) as its parent-to-be.
  /// When fewer slots are free than needed, evicts resident slots in policy order, never one of
  /// `call`'s resident slots nor a pinned one, and appends each evicted slot to `evicted` (their
  /// chunks are gone: the caller forgets their keys). Returns false, changing nothing, when that
  /// cannot free enough. Throws Error(kInvalidArgument) (nothing changed) when `reserved` has the
  /// wrong size, or an entry of `call` or `first_prev` is out of range or names a free slot.
  [[nodiscard]] bool reserve(std::span<const BlockId> call, BlockId first_prev, std::span<BlockId> reserved,
                             std::vector<BlockId>& evicted);

  /// Completes the stores of pending `slots` (any order; a set is fine): they become resident,
  /// chained to their parents-to-be (see the file comment), inserted in reservation order so a
  /// parent completed in the same call goes first. On return `slots` holds them in that order (so
  /// what follows never depends on the order a caller's set iterated in). Throws
  /// Error(kInvalidArgument) (nothing changed, `slots` untouched) when a slot is out of range, not
  /// pending, or repeated. All or nothing: every allocation (the trie's room for all the runs'
  /// inserts) is made before any slot changes, so a std::bad_alloc too leaves every slot pending,
  /// the trie as it was and `slots` untouched.
  void commit(std::span<BlockId> slots);

  /// Abandons the stores of pending `slots` (a failed transfer): they become free, returned in
  /// reservation order (`slots` is reordered so). Same errors as `commit`.
  void abandon(std::span<BlockId> slots);

  /// Pins resident `slots` for a load: each, with its ancestors, cannot be evicted until `unpin`
  /// has released every slot this call listed (in any order, in one call or several: a load may
  /// complete in parts, and until its last slot is released the paths it pinned stay pinned). One
  /// trie match when the slots are a chain from the root in order (a request's prefix), else one per
  /// slot that is no other's ancestor. A slot listed twice is one load of it. Throws
  /// Error(kCacheMiss) naming the position of the first slot that is not resident (nothing changed).
  void pin(std::span<const BlockId> slots);

  /// Releases slots of earlier `pin` calls (any order, each listed slot once however often it
  /// appears); a call's pins go when its last slot is released. All or nothing: Error(kCacheMiss)
  /// for a slot that is not resident, Error(kRefCountUnderflow) naming one with no load in flight.
  void unpin(std::span<const BlockId> slots);

  /// Marks resident `slots` (and their ancestors) recently used; other slots are ignored.
  void touch(std::span<const BlockId> slots);

  /// Frees every slot, pending and pinned ones included, and starts a new trie (counters at zero).
  /// Throws std::bad_alloc (nothing changed) when the new trie or allocator cannot be had.
  void reset();

  /// State of `slot`; Error(kInvalidArgument) when out of range.
  [[nodiscard]] SlotState state(BlockId slot) const;

  /// Parent of resident `slot` (kNoSlot: the root); Error(kInvalidArgument) when not resident.
  [[nodiscard]] BlockId parent(BlockId slot) const;

  [[nodiscard]] OffloadIndexStats stats() const;

  /// Verifies the trie's invariants and that slot states, the allocator and the trie agree; throws
  /// Error(kInternal) naming the first broken one. O(num_slots); for tests.
  void check_invariants() const;

 private:
  struct Impl;

  std::uint32_t num_slots_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sagellm::kv
