// Lock-free allocator of fixed-size block ids with per-block reference counts.
//
// The allocator hands out 32-bit block ids in [0, num_blocks) and knows nothing about the memory
// behind them (the paged pool maps ids to addresses). Free ids live on a Treiber stack of indices;
// a separate counter of available blocks makes batch allocation all-or-nothing: a batch first
// reserves its count, then pops exactly that many.
//
// ABA defence: the 64-bit stack head packs the top index in its low bit_width(num_blocks) bits and
// a version tag, bumped on every successful update, in the remaining 64 - bit_width(num_blocks)
// bits (at least 33; 47 for a 65,536-block pool). A CAS from a stale head can only succeed after
// exactly a multiple of 2^(tag bits) updates with the same index on top while the stale thread
// was stalled between its load and its CAS: at 10^8 updates a second that is more than 85 s for
// the largest pool and 16 days for a 65,536-block pool.
//
// Metadata: 8 bytes per block (a 32-bit next index and a 32-bit reference count).
//
// Batch contract (free, incref):
//   * Ids are read exactly once, into a private copy, before anything is checked; a caller that
//     changes its array during the call cannot make the allocator act on ids it did not check.
//   * Everything that can be checked is checked before any count changes: range, and for free
//     that every distinct id has at least as many references as it appears in the batch (a
//     snapshot). A refusal then changes nothing.
//   * No count is ever lowered below zero (each decrement is a CAS from c > 0), and no count is
//     ever raised on a block that may have reached zero (no blind rollback): a block on the free
//     list always has count 0, so it is never handed out twice.
//   * The one race the snapshot cannot see: a free of a reference the caller does not hold (a
//     double free) racing the legitimate last free of the same block by its holder. Then the block
//     is freed once (by the holder), the offending id is skipped, every other id of the batch is
//     applied, and the call returns kDoubleFree with `partial` set. Restoring the other ids instead
//     would re-add references that their other holders may already have dropped to zero.
//   * A double free that another holder's reference hides (A and B share x, A frees x twice) is
//     indistinguishable from a legitimate free by counts alone; it drops B's reference.
//
// Thread safety: every member function may be called from any number of threads at once.
// allocate and allocate_one are lock-free and take no memory; so are free and incref of at most
// kStackBatch ids, while longer batches first copy their ids to heap scratch (whose allocator may
// take a lock). set_limit takes a mutex (a cold path) so that concurrent limit changes apply their
// deltas in order.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>

#include "sagellm_kv/error.hpp"

namespace sagellm::kv {

using BlockId = std::int32_t;

/// Result of a batch operation that may be refused. `ok()` when `code == ErrorCode::kOk`; on a
/// refusal `index` names the offending position in the input (or -1) and `id` the id read there,
/// and nothing was changed unless `partial` is set (see the batch contract in the file comment).
struct [[nodiscard]] BatchStatus {
  ErrorCode code = ErrorCode::kOk;
  std::int64_t index = -1;
  BlockId id = -1;
  bool partial = false;  ///< kDoubleFree raced a concurrent free: every other id was applied

  [[nodiscard]] bool ok() const noexcept { return code == ErrorCode::kOk; }
};

class BlockAllocator {
 public:
  /// Largest supported pool; one id value is reserved as the empty-stack marker.
  static constexpr std::uint32_t kMaxBlocks = 0x7FFFFFFFu;
  /// `free` and `incref` of at most this many ids use no heap memory (their private copy of the
  /// ids stays on the stack), so they cannot return kMemoryExhausted.
  static constexpr std::size_t kStackBatch = 256;

  /// Creates an allocator with every block free. Throws Error(kInvalidArgument) when
  /// `num_blocks` is 0 or above kMaxBlocks.
  explicit BlockAllocator(std::uint32_t num_blocks);
  ~BlockAllocator();
  BlockAllocator(const BlockAllocator&) = delete;
  BlockAllocator& operator=(const BlockAllocator&) = delete;

  /// Takes `out.size()` free blocks, each with reference count 1, writing their ids to `out`.
  /// All or nothing: returns kPoolFull (and takes nothing) when fewer are available, including
  /// blocks held back by `set_limit`. An empty `out` succeeds.
  BatchStatus allocate(std::span<BlockId> out) noexcept;

  /// Single-block convenience; returns -1 when none is available.
  [[nodiscard]] BlockId allocate_one() noexcept;

  /// Drops one reference from each id; a block whose count reaches 0 returns to the free list.
  /// An id may appear several times (one reference per appearance). Checked first, then applied
  /// (see the batch contract): an id out of range gives kInvalidBlock, an id appearing more often
  /// than it has references gives kDoubleFree, and then no count changed. Only a double free racing
  /// the last legitimate free of the same block returns kDoubleFree with `partial` set.
  /// kMemoryExhausted (nothing changed) when a batch above kStackBatch ids cannot get scratch
  /// memory; a holder freeing its own references can then free it in pieces of kStackBatch.
  BatchStatus free(std::span<const BlockId> ids) noexcept;

  /// Adds one reference to each id (sharing); the caller must hold a reference to each. All or
  /// nothing: an id out of range, free, or at the maximum count gives kInvalidBlock, and every
  /// reference this call added is dropped again (dropping a reference the call itself added is
  /// always safe; it frees the block when its other holders let go meanwhile).
  BatchStatus incref(std::span<const BlockId> ids) noexcept;

  /// Current reference count of `id` (0 when free). Throws Error(kInvalidBlock) when out of range.
  [[nodiscard]] std::uint32_t ref_count(BlockId id) const;

  /// True when `id` is in range and currently allocated.
  [[nodiscard]] bool is_allocated(BlockId id) const noexcept;

  [[nodiscard]] std::uint32_t num_blocks() const noexcept { return num_blocks_; }

  /// Blocks that `allocate` can hand out now (free and within the limit). A snapshot.
  [[nodiscard]] std::uint32_t num_available() const noexcept;

  /// Blocks currently allocated. A snapshot, at most num_blocks(); while a set_limit runs
  /// concurrently it may be off by that call's change of the limit (within [0, num_blocks]).
  [[nodiscard]] std::uint32_t num_allocated() const noexcept;

  /// Caps how many blocks may be allocated at once (a budget below num_blocks). Lowering it below
  /// the number in use is allowed: allocation is refused until enough are freed. Throws
  /// Error(kInvalidArgument) when `limit` exceeds num_blocks. Safe from any thread: an internal
  /// mutex orders concurrent calls, so the available count never exceeds what the stack holds.
  void set_limit(std::uint32_t limit);
  [[nodiscard]] std::uint32_t limit() const noexcept { return limit_.load(std::memory_order_relaxed); }

  /// Bytes of allocator metadata per block.
  [[nodiscard]] static constexpr std::size_t metadata_bytes_per_block() noexcept { return 8; }

 private:
  // Head of the free stack: low `index_bits_` bits the top index (nil_ == num_blocks when empty),
  // the bits above a version tag bumped on every successful update (see the file comment).
  [[nodiscard]] std::uint32_t head_index(std::uint64_t head) const noexcept {
    return static_cast<std::uint32_t>(head & index_mask_);
  }
  [[nodiscard]] std::uint64_t next_head(std::uint64_t old, std::uint32_t index) const noexcept {
    return (((old >> index_bits_) + 1) << index_bits_) | index;
  }

  void push_chain(std::uint32_t first, std::uint32_t last, std::uint32_t count) noexcept;
  void pop_chain(std::span<BlockId> out) noexcept;
  [[nodiscard]] std::int64_t first_overdrawn(std::span<const BlockId> ids) const noexcept;
  BatchStatus apply_free(std::span<const BlockId> ids) noexcept;

  std::uint32_t num_blocks_;
  std::uint32_t nil_;          // == num_blocks_: marks the end of a chain and the empty stack
  std::uint32_t index_bits_;   // bit_width(num_blocks_)
  std::uint64_t index_mask_;
  std::mutex limit_mutex_;     // orders set_limit calls
  alignas(64) std::atomic<std::uint64_t> head_;
  // Blocks that may still be reserved: free blocks minus those withheld by the limit. Signed: a
  // lowered limit may push it below zero.
  alignas(64) std::atomic<std::int64_t> available_;
  std::atomic<std::uint32_t> limit_;
  // A block's link and count share one 8-byte slot, so touching a block costs one cache line.
  struct Slot {
    std::atomic<std::uint32_t> next;  // next free id while on the stack
    std::atomic<std::uint32_t> refs;  // 0 while free
  };
  std::unique_ptr<Slot[]> slots_;
};

}  // namespace sagellm::kv
