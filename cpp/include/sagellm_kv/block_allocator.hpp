// Lock-free allocator of fixed-size block ids with per-block reference counts.
//
// The allocator hands out 32-bit block ids in [0, num_blocks) and knows nothing about the memory
// behind them (the paged pool maps ids to addresses). Free ids live on a Treiber stack of indices
// whose head carries a 32-bit version tag against ABA; a separate counter of available blocks makes
// batch allocation all-or-nothing: a batch first reserves its count, then pops exactly that many.
//
// Metadata: 8 bytes per block (a 32-bit next index and a 32-bit reference count).
//
// Thread safety: every member function may be called from any number of threads at once.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "sagellm_kv/error.hpp"

namespace sagellm::kv {

using BlockId = std::int32_t;

/// Result of a batch operation that may be refused. `ok()` when `code == ErrorCode::kOk`; on a
/// refusal `index` names the offending position in the input (or -1) and nothing was changed.
struct [[nodiscard]] BatchStatus {
  ErrorCode code = ErrorCode::kOk;
  std::int64_t index = -1;

  [[nodiscard]] bool ok() const noexcept { return code == ErrorCode::kOk; }
};

class BlockAllocator {
 public:
  /// Largest supported pool; one id value is reserved as the empty-stack marker.
  static constexpr std::uint32_t kMaxBlocks = 0x7FFFFFFFu;

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
  /// An id may appear several times (one reference per appearance). All or nothing: an id out of
  /// range gives kInvalidBlock, one with no reference left gives kDoubleFree; then no count changed.
  BatchStatus free(std::span<const BlockId> ids) noexcept;

  /// Adds one reference to each id (sharing). All or nothing: every id must be allocated
  /// (kInvalidBlock when out of range or free).
  BatchStatus incref(std::span<const BlockId> ids) noexcept;

  /// Current reference count of `id` (0 when free). Throws Error(kInvalidBlock) when out of range.
  [[nodiscard]] std::uint32_t ref_count(BlockId id) const;

  /// True when `id` is in range and currently allocated.
  [[nodiscard]] bool is_allocated(BlockId id) const noexcept;

  [[nodiscard]] std::uint32_t num_blocks() const noexcept { return num_blocks_; }

  /// Blocks that `allocate` can hand out now (free and within the limit). A snapshot.
  [[nodiscard]] std::uint32_t num_available() const noexcept;

  /// Blocks currently allocated. A snapshot.
  [[nodiscard]] std::uint32_t num_allocated() const noexcept;

  /// Caps how many blocks may be allocated at once (a budget below num_blocks). Lowering it below
  /// the number in use is allowed: allocation is refused until enough are freed. Throws
  /// Error(kInvalidArgument) when `limit` exceeds num_blocks.
  void set_limit(std::uint32_t limit);
  [[nodiscard]] std::uint32_t limit() const noexcept { return limit_.load(std::memory_order_relaxed); }

  /// Bytes of allocator metadata per block.
  [[nodiscard]] static constexpr std::size_t metadata_bytes_per_block() noexcept { return 8; }

 private:
  static constexpr std::uint32_t kNil = 0xFFFFFFFFu;

  // Head of the free stack: low 32 bits the top index (kNil when empty), high 32 bits a version
  // bumped on every successful update, so a stale head never compares equal (ABA defence).
  static constexpr std::uint64_t pack(std::uint32_t index, std::uint32_t version) noexcept {
    return (static_cast<std::uint64_t>(version) << 32) | index;
  }

  void push_chain(std::uint32_t first, std::uint32_t last, std::uint32_t count) noexcept;
  void pop_chain(std::span<BlockId> out) noexcept;
  void rollback_free(std::span<const BlockId> ids, std::size_t applied) noexcept;

  std::uint32_t num_blocks_;
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
