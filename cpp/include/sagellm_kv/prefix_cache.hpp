// Prefix cache: a trie of chained block digests (see hashing.hpp) mapping each cached block of a
// prompt prefix to the KV block that holds it, so requests sharing a prefix reuse its KV.
//
// Structure. Every node is one full block: its digest, its block id, its parent (the previous
// block of the prefix, or the root), its number of children, its number of users and its
// eviction keys. A hash index maps digest -> node. Because a digest covers its whole prefix,
// longest-prefix matching walks the request's digests in order and stops at the first one that is
// not cached (or whose cached parent is not the previous block).
//
// Block ownership protocol (with an allocator):
//   1. the caller allocates a block                                   ref 1 (the caller's)
//   2. the caller inserts it; the cache increfs the blocks it takes   ref 2 (caller + cache)
//   3. the request ends; the caller frees its own reference           ref 1 (the cache's)
//   4. the node is evicted; the cache decrefs                         ref 0 -> free list
// The cache holds exactly one reference per cached block and takes none on blocks it does not
// cache (positions already cached, or cut off by capacity): the caller frees those as usual.
// With InsertOptions::adopt, step 2 takes over the caller's reference instead of adding one
// (ref stays 1, now the cache's) and step 3 does not happen for the blocks the cache took.
// `match` does not add allocator references: it acquires the matched nodes (users + 1), which
// keeps them, and therefore their blocks, from eviction until `release`. Every successful match
// must be paired with a release of the same digests.
//
// Insert chain rule: the chain must stay connected. The first digest's parent is the root
// (options.parent empty or kRootBlockHash) or a digest that is cached now (else Error(kCacheMiss), nothing
// inserted); each following digest's parent is the one before it. Leading digests that are
// already cached (under the same parent) are reused, not duplicated; after the first digest that
// is not cached, all must be new.
//
// Eviction: only leaves nobody uses are evictable (a parent becomes evictable when its last child
// goes). The order is the policy's: LRU (least recently matched, released or re-inserted first),
// FIFO (oldest insertion first), PRIORITY (lowest priority first, LRU among equals) or TTL (nodes
// inserted at least ttl seconds ago first, oldest first; then LRU). The evictable set is an
// indexed heap: O(log n) per change, no scans.
//
// Capacity (optional, in blocks): when an insert would exceed it, the cache first evicts what is
// needed; when not enough is evictable it caches only the leading blocks that fit (never an error:
// the result says how many were cached) and the caller keeps the rest uncached.
//
// Thread safety: every member function may be called from any thread; one mutex serialises them
// (each call holds it for O(number of digests passed) work, or O(cached nodes) for invalidate and
// clear). Calls into the BlockAllocator happen under that mutex; the allocator is lock-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"

namespace sagellm::kv {

/// Which unreferenced leaf goes first when the prefix cache must make room.
enum class EvictionPolicy : std::uint8_t {
  kLru = 0,       ///< least recently used (matched, released or re-inserted)
  kFifo = 1,      ///< oldest insertion
  kPriority = 2,  ///< lowest priority, then least recently used
  kTtl = 3,       ///< inserted >= ttl ago (oldest first), then least recently used
};

/// Canonical lower-case name: "lru", "fifo", "priority", "ttl".
[[nodiscard]] std::string_view eviction_policy_name(EvictionPolicy policy) noexcept;

/// Parses a policy name (case-sensitive canonical names). Throws Error(kInvalidArgument) naming the
/// value and the known names.
[[nodiscard]] EvictionPolicy parse_eviction_policy(std::string_view name);

/// Configuration of a `PrefixCache`.
struct PrefixCacheOptions {
  std::uint32_t block_size = 16;                 ///< tokens per block; > 0 (token accounting, events)
  std::optional<std::uint32_t> capacity_blocks;  ///< empty: unbounded; else > 0
  EvictionPolicy policy = EvictionPolicy::kLru;
  double ttl_seconds = 300.0;                    ///< kTtl only; must then be finite and > 0
  /// 0 disables events; else at most this many are queued: beyond it the oldest is dropped, and the
  /// next `drain_events` starts with a kCleared event marked `events_lost` (see there).
  std::size_t event_queue_capacity = 0;
  /// Time source for TTL in nanoseconds (monotonic); empty: std::chrono::steady_clock. Tests inject
  /// a fake clock. Called under the cache's mutex: must not call back into the cache.
  std::function<std::int64_t()> clock_ns;

  /// Throws Error(kInvalidArgument) naming the first bad field.
  void validate() const;
};

/// Outcome of `PrefixCache::match`.
struct MatchResult {
  std::uint32_t num_matched = 0;   ///< leading digests found (and acquired)
  std::vector<BlockId> block_ids;  ///< their blocks, in prefix order
};

/// Arguments of `PrefixCache::insert` besides the digests and block ids.
struct InsertOptions {
  std::optional<BlockHash> parent;            ///< digest the first one chains from; empty or kRootBlockHash: the root
  std::span<const std::int32_t> token_ids;    ///< empty, or block_size ids >= 0 per digest (events only)
  std::optional<std::string_view> extra_key;  ///< recorded in the stored event only
  /// The tenant salt the digests were hashed with, recorded in the stored event only (a KV-aware
  /// router keeps tenants' blocks apart by it).
  std::optional<std::string_view> cache_salt;
  std::uint64_t owner = 0;                    ///< handle for `invalidate`; new nodes only
  std::int32_t priority = 0;                  ///< PRIORITY policy key; a reused node keeps the max
  /// Also acquire every position now cached (reused or inserted; users + 1, as `match` does), so
  /// the caller's blocks stay cached while it uses them; release those digests later.
  bool acquire = false;
  /// The cache takes over the caller's allocator reference on each block it caches (positions
  /// [num_redundant, num_cached()) of the result) instead of adding one of its own: those blocks
  /// are no longer the caller's to free. Its reference on every other position stays its own. Saves
  /// an atomic increment now and the caller's decrement later. With `acquire` the adopted blocks
  /// stay cached (so allocated) until the caller releases them; without it they may be evicted and
  /// freed at any time after the call. The caller must hold a reference on each block.
  bool adopt = false;
  /// The caller vouches for its input, so the O(n log n) checks are skipped (debug builds still
  /// assert them): the digests are one hash chain continuing `parent` (a chained digest that is not
  /// cached has no cached descendant, so nothing after the first miss is looked up), none repeats,
  /// and the block ids are distinct, allocated and cache nothing. The arrays are then read in place,
  /// not copied first: they must not change during the call. For callers that hashed the chain and
  /// allocated the blocks themselves (the request manager); a violated promise corrupts the cache.
  bool trusted_chain = false;
};

/// Outcome of `PrefixCache::insert`. Positions [0, num_redundant) were already cached (the caller's
/// blocks there are duplicates the cache did not take); [num_redundant, num_redundant +
/// num_inserted) are now cached with the caller's blocks (one cache reference each); the rest did
/// not fit the capacity and are not cached.
struct InsertResult {
  std::uint32_t num_redundant = 0;
  std::uint32_t num_inserted = 0;

  /// Leading positions now cached.
  [[nodiscard]] std::uint32_t num_cached() const noexcept { return num_redundant + num_inserted; }
};

/// One entry of the event stream a KV-aware router consumes (shaped after vLLM's BlockStored,
/// BlockRemoved and AllBlocksCleared).
struct PrefixCacheEvent {
  enum class Type : std::uint8_t { kStored = 0, kRemoved = 1, kCleared = 2 };

  Type type = Type::kStored;
  std::vector<BlockHash> digests;       ///< stored / removed blocks (empty for kCleared)
  std::optional<BlockHash> parent;      ///< kStored: parent of the first digest; empty: the root
  std::vector<std::int32_t> token_ids;  ///< kStored: block_size ids per digest, when supplied
  std::uint32_t block_size = 0;         ///< kStored
  std::optional<std::string> extra_key; ///< kStored: as passed to insert
  std::optional<std::string> cache_salt; ///< kStored: as passed to insert
  /// kCleared only: not a clear of the cache but the mark that events were dropped before the ones
  /// that follow. A consumer forgets what it was told so far, since it missed changes to it.
  bool events_lost = false;
};

/// Counters since construction plus current sizes. A consistent snapshot.
struct PrefixCacheStats {
  std::uint64_t lookups = 0;         ///< match calls
  std::uint64_t hit_lookups = 0;     ///< match calls that matched at least one block
  std::uint64_t queried_blocks = 0;  ///< digests passed to match
  std::uint64_t hit_blocks = 0;      ///< digests matched
  std::uint64_t queried_tokens = 0;  ///< queried_blocks * block_size
  std::uint64_t hit_tokens = 0;      ///< hit_blocks * block_size
  std::uint64_t inserts = 0;         ///< nodes created
  std::uint64_t evictions = 0;       ///< nodes removed by the policy (capacity or evict())
  std::uint64_t removals = 0;        ///< nodes removed by invalidate() or clear()
  std::uint64_t events_dropped = 0;  ///< events lost to the bounded queue
  std::uint32_t cached_blocks = 0;   ///< nodes now
  std::uint32_t evictable_blocks = 0;///< unreferenced leaves now
  std::uint32_t in_use_blocks = 0;   ///< nodes with at least one user now
};

/// Snapshot of one node, for tests and debugging.
struct PrefixNodeInfo {
  BlockId block_id = -1;
  std::optional<BlockHash> parent;  ///< empty: child of the root
  std::uint32_t num_children = 0;
  std::uint32_t users = 0;
  std::uint64_t owner = 0;
  std::int32_t priority = 0;
};

/// The prefix cache (see the file comment for the protocol).
///
/// Thread safety: every member function may be called from any number of threads at once (one
/// internal mutex); `options()`, `block_size()`, `capacity()`, `policy()` and `allocator()` read
/// immutable configuration without it.
class PrefixCache {
 public:
  /// Creates an empty cache. `allocator` (may be null for a metadata-only cache, where block ids are
  /// opaque numbers) must outlive the cache. Throws Error(kInvalidArgument) for bad options.
  explicit PrefixCache(const PrefixCacheOptions& options, BlockAllocator* allocator = nullptr);

  /// Returns the cache's reference on every cached block to the allocator. Call it only when no
  /// match is outstanding: blocks still in use by a matcher would be freed under it.
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  /// Longest cached prefix of `digests`: acquires each matched node (users + 1; it cannot be evicted
  /// until released), marks it used, and writes its block id to `out`. Returns the number matched.
  /// A miss is a normal outcome (0). Counts one lookup in the stats. Throws Error(kInvalidArgument)
  /// when `out` is shorter than `digests`; then nothing changed.
  [[nodiscard]] std::uint32_t match(std::span<const BlockHash> digests, std::span<BlockId> out);

  /// As above, returning the block ids in a new vector.
  [[nodiscard]] MatchResult match(std::span<const BlockHash> digests);

  /// As `match`, without taking a use: counts the lookup and marks the matched nodes used (LRU), so
  /// the answer is what a match-then-release would give, in one pass. Nothing is protected from
  /// eviction afterwards. For callers that only ask (the seed API's `lookup`).
  [[nodiscard]] std::uint32_t probe(std::span<const BlockHash> digests, std::span<BlockId> out);

  /// Length of the cached prefix of `digests` without acquiring, touching or counting anything;
  /// writes the block ids to the front of `out` when it is not empty (then it must be at least as
  /// long as `digests`, else Error(kInvalidArgument)). The answer may be stale by the time it is
  /// used: only `match` protects blocks from eviction.
  [[nodiscard]] std::uint32_t peek(std::span<const BlockHash> digests, std::span<BlockId> out = {}) const;

  /// Drops one use of each digest (taken by `match`); a digest may appear several times, one use
  /// per appearance. All or nothing: a digest that is not cached, or has no use left, throws
  /// Error(kRefCountUnderflow) naming it and its position, and then nothing changed. Marks the
  /// nodes used (LRU) and makes the unused leaves evictable. Allocates nothing (insert keeps the
  /// room it needs), so a release of what was matched or acquired cannot fail: cleanup code may
  /// call it from a noexcept context.
  void release(std::span<const BlockHash> digests);

  /// Caches the full blocks `digests[i]` -> `block_ids[i]` (see the chain rule and the ownership
  /// protocol in the file comment). New nodes get `options.owner` and `options.priority`; reused
  /// ones are marked used and keep their owner, their priority becoming the larger of the two.
  /// Evicts first when the capacity requires it. Errors, all checked before any change:
  /// kInvalidArgument for lengths that differ (block ids, token ids), a negative token id (events
  /// carry them as unsigned 32-bit ids), a digest repeated in the list, a digest cached under a
  /// different parent, a block id repeated or already cached for another digest, or a use that
  /// would overflow a node's count of 2^32-1 (options.acquire on a
  /// reused node that has that many; match stops short of such a node instead); kCacheMiss when
  /// options.parent is not cached; kInvalidBlock for a block id the allocator does not have
  /// allocated (only positions the cache would take are checked).
  /// Strong exception guarantee: whatever throws (these errors, std::bad_alloc, a throwing
  /// options.clock_ns), the cache and the allocator's counts are as before the call. Everything
  /// that can fail runs before the cache takes its references; what follows cannot fail. The
  /// digests and block ids are copied once, under the lock, and only the copies are read (except
  /// with options.trusted_chain, which reads them in place); the token ids go into the stored
  /// event as a copy, and that copy is what is checked, so a caller changing them during the call
  /// cannot put a negative id into an event.
  [[nodiscard]] InsertResult insert(std::span<const BlockHash> digests, std::span<const BlockId> block_ids,
                                    const InsertOptions& options = {});

  /// Makes room now for the node records, index slots, heap entries, block map entries and scratch
  /// of inserts caching `block_ids` (each an id the allocator has), so that a sequence of inserts
  /// passing, in all, at most `block_ids.size()` digests and caching only those blocks cannot throw
  /// std::bad_alloc (the only allocation they still try, a long batch's reference copy, falls back
  /// to pieces on the stack). For a caller that must apply several inserts
  /// all or nothing (the offload index's commit): reserve first, then insert. Holds only with an
  /// allocator, events disabled (a stored event is an allocation of its own), no capacity and a
  /// clock_ns that does not throw; a `clear()` in between may give the room back. Changes nothing
  /// the cache shows. Throws std::bad_alloc (the room partly made, nothing else changed) or
  /// Error(kInvalidBlock) for an id outside the allocator.
  void reserve_insert(std::span<const BlockId> block_ids);

  /// Evicts up to `n` evictable nodes in policy order (a parent left without children is a
  /// candidate in the same call) and returns how many went. Fewer than `n` (possibly 0) when not
  /// enough are evictable: not an error.
  [[nodiscard]] std::uint32_t evict(std::uint32_t n);

  /// Evicts like `evict(n)` but hands each victim's allocator reference to the caller instead of
  /// returning it: the victims leave the trie (a removed event is queued as for `evict`), their
  /// digests and block ids are appended to `digests` and `block_ids` in eviction order, and each
  /// block stays allocated until the caller frees it. A tiered store uses this to copy a victim's
  /// bytes to a lower tier before its memory can be reused (demotion). Returns how many went.
  /// Without an allocator the ids are the opaque numbers that were cached. Strong guarantee: on
  /// std::bad_alloc (growing the outputs) nothing was evicted.
  [[nodiscard]] std::uint32_t evict_detached(std::uint32_t n, std::vector<BlockHash>& digests,
                                             std::vector<BlockId>& block_ids);

  /// Removes the nodes inserted with `owner`, together with their descendants (whose chains would
  /// be unreachable without them), except every node that is in use or has a descendant in use:
  /// those stay so the holders' chains remain intact. Returns how many were removed. O(cached nodes).
  [[nodiscard]] std::uint32_t invalidate(std::uint64_t owner);

  /// Removes every node that is not in use and has no descendant in use, and returns how many went.
  /// When that empties the cache the event stream records one kCleared event, else one kRemoved.
  /// O(cached nodes).
  std::uint32_t clear();

  /// Takes all queued events, oldest first. When events were dropped since the last drain (a full
  /// queue, or no memory to queue one), the first is a kCleared event with `events_lost` set and
  /// the rest are every event after the last one dropped: a consumer that forgets its view there
  /// and applies them holds only blocks that are cached (missing those it was not told about
  /// again), never a block that left. Thread-safe; a failure (bad_alloc) leaves the queue as it was.
  [[nodiscard]] std::vector<PrefixCacheEvent> drain_events();

  [[nodiscard]] PrefixCacheStats stats() const;

  /// Cached nodes now.
  [[nodiscard]] std::uint32_t size() const;

  [[nodiscard]] bool contains(const BlockHash& digest) const;

  /// Snapshot of the node cached under `digest`, or empty.
  [[nodiscard]] std::optional<PrefixNodeInfo> lookup(const BlockHash& digest) const;

  /// Block ids of every cached node (each holds one allocator reference), in no particular order.
  [[nodiscard]] std::vector<BlockId> cached_block_ids() const;

  /// The distinct non-zero owners of cached nodes (what `invalidate` could still remove), in
  /// ascending order. O(cached nodes).
  [[nodiscard]] std::vector<std::uint64_t> cached_owners() const;

  [[nodiscard]] const PrefixCacheOptions& options() const noexcept { return options_; }
  [[nodiscard]] std::uint32_t block_size() const noexcept { return options_.block_size; }
  [[nodiscard]] std::optional<std::uint32_t> capacity() const noexcept { return options_.capacity_blocks; }
  [[nodiscard]] EvictionPolicy policy() const noexcept { return options_.policy; }
  [[nodiscard]] BlockAllocator* allocator() const noexcept { return allocator_; }

  /// Bytes of one node record, digest included (the hash index and eviction heap add to this; see
  /// metadata_bytes()).
  [[nodiscard]] static std::size_t node_bytes() noexcept;

  /// Bytes of every metadata structure the cache holds now (node records, hash index, eviction
  /// heaps, block -> node map), capacity included: divide by size() for the cost per node.
  [[nodiscard]] std::size_t metadata_bytes() const;

  /// Verifies the internal invariants (index, parent/child counts, heap membership, block map) and
  /// throws Error(kInternal) naming the first broken one. O(cached nodes); for tests.
  void check_invariants() const;

 private:
  struct Impl;

  PrefixCacheOptions options_;
  BlockAllocator* allocator_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sagellm::kv
