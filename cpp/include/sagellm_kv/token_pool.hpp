// Token-budgeted pool of block ids: the accounting behind the seed API's `KVPool`.
//
// The seed pool admits an allocation of `num_tokens` tokens when it fits the budget `max_tokens`,
// and gives it ceil(num_tokens / block_size) block ids. Partly filled last blocks round up, so
// token admission alone could hold more blocks than S = ceil(max_tokens / block_size). Two modes:
//
// * bounded (the default): every id is below S, the size of a paged KV tensor sized for the
//   budget (the sageLLM engine's paged attention allocates exactly `num_blocks` = S blocks and
//   indexes it with these ids). An allocation is admitted when its tokens fit the budget AND its
//   blocks fit the free ids: `available_tokens()` = min(tokens left, free ids * block_size), and
//   `can_admit(n)` is exactly n <= available_tokens(), so a caller that checks first is never
//   refused. With full blocks this is the token budget alone.
// * overcommit: admission by the token budget alone (the original package's, whose block ids had
//   no storage behind them). The id space is then cut into segments of S ids: segment k hands out
//   ids [k * S, (k + 1) * S). Segment 0 always exists; more are added when an allocation does not
//   fit in the free ids, up to ceil(max_tokens / S) segments (which covers the worst case: every
//   allocation one token), and trailing segments that become empty are dropped again. Ids can
//   reach S * ceil(max_tokens / S) - 1, so they index nothing sized by S.
//
// Ids come out as from `BlockAllocator`: a fresh segment in ascending order, then last freed first.
//
// Why a mutex, and plain free stacks instead of the lock-free `BlockAllocator`: an allocation
// changes several words at once (the token count, the blocks in use and their peak, the segment
// list) and must be all-or-nothing across segments. A lock-free version would reserve tokens first
// and roll them back when the ids fall short, and a rollback that re-adds what another thread may
// have consumed is not a rollback (STYLE.md). So one short critical section (no allocation on the
// common path, no callbacks) guards everything, and from Python it is uncontended (the binding
// calls it with the GIL held). Under that lock the allocator's atomics buy nothing and cost the
// most: composed of one `BlockAllocator` per segment, freeing a 32-block allocation spent 56% of
// the pool's time in the per-id compare-and-swap of its reference counts. Here each segment is a
// stack of free ids plus one state byte per id, which gives the same checks (an id out of range,
// free, or listed twice is refused before anything changes) in one pass without atomics.
//
// Split with the binding (cpp/bindings/bind_seed_pool.cpp): this class is the policy (budget,
// rounding, id space) and knows nothing of handles; the binding owns the Python side of an
// allocation (the KVHandle object, the live-handle table keyed by the handle's UUID) so that the
// seed's `alloc` and `free` are one call into C++ each.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv {

/// Outcome of `TokenPool::allocate`. On kBudgetExceeded `available` is the budget that was left
/// (what the seed's `on_budget_exceeded` callback reports); nothing was taken unless `ok()`.
struct [[nodiscard]] TokenGrant {
  ErrorCode code = ErrorCode::kOk;
  std::uint64_t available = 0;

  [[nodiscard]] bool ok() const noexcept { return code == ErrorCode::kOk; }
};

/// A consistent snapshot of a `TokenPool`'s counters (taken under its lock).
struct TokenPoolStats {
  std::uint64_t max_tokens = 0;
  std::uint64_t allocated_tokens = 0;
  std::uint64_t allocations = 0;        ///< live allocations
  std::uint64_t blocks_in_use = 0;      ///< ids the live allocations hold
  std::uint64_t blocks_peak = 0;        ///< most ids in use at once since construction or reset_peak()
  std::uint64_t block_id_capacity = 0;  ///< ids of the segments that exist now
  std::uint64_t available_tokens = 0;   ///< what `available_tokens()` returned at that instant
};

class TokenPool {
 public:
  /// A pool of `max_tokens` tokens in blocks of `block_size` tokens, every id free; bounded ids
  /// (below S) unless `overcommit` (see above). Throws Error(kInvalidArgument) naming the value
  /// when either is 0, or when the id space (S ids bounded, S * ceil(max_tokens / S) with
  /// overcommit) exceeds the int32 range of block ids.
  TokenPool(std::uint64_t max_tokens, std::uint32_t block_size, bool overcommit = false);
  ~TokenPool();
  TokenPool(const TokenPool&) = delete;
  TokenPool& operator=(const TokenPool&) = delete;

  /// Reserves `num_tokens` tokens of the budget and `blocks_for(num_tokens)` ids, written to
  /// `out` (lowest segments first). Refusals take nothing: kInvalidArgument when `num_tokens` is
  /// 0 or `out.size() != blocks_for(num_tokens)`; kBudgetExceeded (with `available`, i.e.
  /// `available_tokens()`) when `num_tokens` exceeds `available_tokens()`; kMemoryExhausted when a
  /// new segment cannot be had. Whatever `can_admit` admitted a moment before (and nothing was
  /// taken since) is granted. Thread-safe.
  TokenGrant allocate(std::uint64_t num_tokens, std::span<BlockId> out) noexcept;

  /// Returns an allocation: `num_tokens` tokens and its ids (as `allocate` handed them out, in
  /// any order). Everything is checked before anything changes: kInvalidArgument when the count
  /// of ids is not blocks_for(num_tokens) or more tokens than are allocated are returned,
  /// kInvalidBlock for an id outside the id space, kDoubleFree for an id that is not allocated
  /// or appears twice (`index`/`id` name it). A refusal changes nothing. Thread-safe.
  BatchStatus release(std::uint64_t num_tokens, std::span<const BlockId> ids) noexcept;

  /// Drops every allocation (their ids become free, the id space shrinks to segment 0); the
  /// peak stays until reset_peak(). Throws std::bad_alloc (nothing changed) when segment 0 cannot
  /// be rebuilt. Thread-safe.
  void reset();

  /// Restarts the peak from the blocks in use now. Thread-safe.
  void reset_peak() noexcept;

  /// Whether an allocation of `num_tokens` tokens would be granted now: num_tokens <=
  /// available_tokens() (a snapshot). Thread-safe.
  [[nodiscard]] bool can_admit(std::uint64_t num_tokens) const noexcept;
  /// The largest allocation that would be granted now: the tokens left, and when ids are bounded
  /// also at most the free ids times block_size (a snapshot). Thread-safe.
  [[nodiscard]] std::uint64_t available_tokens() const noexcept;
  /// Tokens allocated now (a snapshot). Thread-safe.
  [[nodiscard]] std::uint64_t allocated_tokens() const noexcept;
  /// All counters at one instant. Thread-safe.
  [[nodiscard]] TokenPoolStats stats() const noexcept;

  /// Ids an allocation of `num_tokens` tokens holds: ceil(num_tokens / block_size).
  [[nodiscard]] std::uint64_t blocks_for(std::uint64_t num_tokens) const noexcept {
    return num_tokens / block_size_ + (num_tokens % block_size_ != 0 ? 1 : 0);
  }
  [[nodiscard]] std::uint64_t max_tokens() const noexcept { return max_tokens_; }
  [[nodiscard]] std::uint32_t block_size() const noexcept { return block_size_; }
  /// Ids per segment, S = ceil(max_tokens / block_size).
  [[nodiscard]] std::uint32_t segment_blocks() const noexcept { return segment_blocks_; }
  /// Most segments the id space can grow to: ceil(max_tokens / S) with overcommit, else 1.
  [[nodiscard]] std::uint32_t max_segments() const noexcept { return max_segments_; }
  /// Upper bound (exclusive) of any id the pool can hand out: S * max_segments().
  [[nodiscard]] std::uint32_t max_block_ids() const noexcept { return segment_blocks_ * max_segments_; }

 private:
  // Takes `out.size()` ids from the segments in order, adding segments as needed. All or nothing.
  // Needs mutex_.
  ErrorCode take_spread(std::span<BlockId> out) noexcept;
  // Adds segment segments() (its ids all free); false when the memory cannot be had. Needs mutex_.
  bool grow() noexcept;
  // Drops trailing segments whose ids are all free (segment 0 stays). Needs mutex_.
  void shrink() noexcept;
  // available_tokens() without the lock. Needs mutex_.
  [[nodiscard]] std::uint64_t available_locked() const noexcept;

  std::uint64_t max_tokens_;
  std::uint32_t block_size_;
  std::uint32_t segment_blocks_;
  std::uint32_t max_segments_;

  mutable std::mutex mutex_;  // guards everything below
  // Per segment, its free ids; the next one handed out is at the back. Each has capacity S, so
  // pushing a freed id never reallocates.
  std::vector<std::vector<BlockId>> free_;
  // Per id of the existing segments: kFree, kHeld, or kReleasing while a release checks its batch.
  std::vector<std::uint8_t> state_;
  std::uint64_t allocated_tokens_ = 0;
  std::uint64_t allocations_ = 0;
  std::uint64_t blocks_in_use_ = 0;
  std::uint64_t blocks_peak_ = 0;
};

}  // namespace sagellm::kv
