#include "sagellm_kv/block_allocator.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <cassert>
#include <new>
#include <string>

namespace sagellm::kv {
namespace {

// kInvalidBlock naming the first id outside [0, num_blocks), or ok.
BatchStatus check_range(std::span<const BlockId> ids, std::uint32_t num_blocks) noexcept {
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || static_cast<std::uint32_t>(ids[i]) >= num_blocks) {
      return {ErrorCode::kInvalidBlock, static_cast<std::int64_t>(i), ids[i], false};
    }
  }
  return {};
}

// The private copy of a batch's ids: the allocator reads the caller's array exactly once, here,
// and checks and applies this copy. Small batches stay on the stack.
class IdCopy {
 public:
  static constexpr std::size_t kInline = BlockAllocator::kStackBatch;

  explicit IdCopy(std::span<const BlockId> ids) noexcept : size_(ids.size()) {
    BlockId* dst = inline_.data();
    if (size_ > kInline) {
      heap_.reset(new (std::nothrow) BlockId[size_]);
      dst = heap_.get();
    }
    if (dst != nullptr) std::copy(ids.begin(), ids.end(), dst);
    data_ = dst;
  }

  [[nodiscard]] bool ok() const noexcept { return data_ != nullptr; }
  [[nodiscard]] std::span<const BlockId> span() const noexcept { return {data_, size_}; }

 private:
  std::size_t size_;
  const BlockId* data_ = nullptr;
  std::array<BlockId, kInline> inline_;
  std::unique_ptr<BlockId[]> heap_;
};

// Up to this many ids first_overdrawn finds repeats with a bit filter on the stack; longer batches
// sort a copy.
constexpr std::size_t kFilterMaxIds = 256;
// Up to this many ids pop_chain keeps its walk on the stack.
constexpr std::size_t kWalkInline = 256;
constexpr std::uint32_t kFilterBits = 4096;

}  // namespace

BlockAllocator::BlockAllocator(std::uint32_t num_blocks)
    : num_blocks_(num_blocks),
      nil_(num_blocks),
      index_bits_(static_cast<std::uint32_t>(std::bit_width(num_blocks))),
      index_mask_((std::uint64_t{1} << std::bit_width(num_blocks)) - 1),
      head_(0),
      available_(0),
      limit_(num_blocks) {
  if (num_blocks == 0 || num_blocks > kMaxBlocks) {
    throw Error(ErrorCode::kInvalidArgument,
                "num_blocks must be in [1, " + std::to_string(kMaxBlocks) + "], got " +
                    std::to_string(num_blocks));
  }
  slots_ = std::make_unique<Slot[]>(num_blocks);
  // Ids come off the stack in ascending order on a fresh allocator: easy to read in tests and logs.
  for (std::uint32_t i = 0; i < num_blocks; ++i) {
    slots_[i].next.store(i + 1 < num_blocks ? i + 1 : nil_, std::memory_order_relaxed);
    slots_[i].refs.store(0, std::memory_order_relaxed);
  }
  head_.store(0, std::memory_order_relaxed);  // index 0 on top, version 0
  // The constructor publishes to other threads through whatever hands them the object.
  available_.store(num_blocks, std::memory_order_release);
}

BlockAllocator::~BlockAllocator() = default;

BatchStatus BlockAllocator::allocate(std::span<BlockId> out) noexcept {
  const auto n = static_cast<std::int64_t>(out.size());
  if (n == 0) return {};
  // Reserve n blocks. Invariant: the stack holds at least `available_` + (outstanding
  // reservations) + (blocks held back by the limit) nodes, because a free pushes its nodes before
  // it raises `available_`. A successful reservation therefore guarantees pop_chain finds n nodes.
  // acquire pairs with the release fetch_add in push_chain, so the pushed nodes are visible.
  std::int64_t avail = available_.load(std::memory_order_acquire);
  do {
    if (avail < n) return {ErrorCode::kPoolFull, -1};
  } while (!available_.compare_exchange_weak(avail, avail - n, std::memory_order_acquire,
                                             std::memory_order_acquire));
  pop_chain(out);
  return {};
}

BlockId BlockAllocator::allocate_one() noexcept {
  BlockId id = -1;
  if (!allocate(std::span<BlockId>(&id, 1)).ok()) return -1;
  return id;
}

void BlockAllocator::pop_chain(std::span<BlockId> out) noexcept {
  // CAS loop invariant: `old` is a snapshot of the head; we walk out.size() nodes from it and swing
  // the head past them in one CAS. The version tag above the index bits changes on every successful
  // update, so if any other thread popped or pushed since our snapshot (even restoring the same top
  // index), the CAS fails and we walk again (see the header for the wrap-around bound). Reads of next_ from a stale snapshot may see values being
  // rewritten; they are atomics and the failed CAS discards them.
  // acquire on the head load pairs with the release CAS in push_chain: the next_ links of every
  // node on the stack (written before their push) are visible to the walk.
  std::array<std::uint32_t, kWalkInline> walk;  // short batches: the walk's ids, read back on success
  const bool keep = out.size() <= kWalkInline;
  std::uint64_t old = head_.load(std::memory_order_acquire);
  for (;;) {
    std::uint32_t cur = head_index(old);
    std::size_t taken = 0;
    for (; taken < out.size(); ++taken) {
      if (cur >= num_blocks_) break;  // nil_, or a link rewritten under a stale snapshot
      if (keep) walk[taken] = cur;
      cur = slots_[cur].next.load(std::memory_order_relaxed);
    }
    if (taken == out.size()) {
      const std::uint64_t desired = next_head(old, cur);
      if (head_.compare_exchange_weak(old, desired, std::memory_order_acquire,
                                      std::memory_order_acquire)) {
        // The chain is ours now: give each block its first reference. Ids come from our own
        // copy of the walk, or for long batches from the chain itself; never from `out`, which
        // the caller owns. A block's link is read before it gets its reference: from then on a
        // stale free of it (a double free by a former holder) may push it and rewrite the link,
        // which must cost that one block, not the rest of the chain.
        if (out.size() <= kWalkInline) {
          for (std::size_t k = 0; k < out.size(); ++k) {
            slots_[walk[k]].refs.store(1, std::memory_order_relaxed);
            out[k] = static_cast<BlockId>(walk[k]);
          }
        } else {
          for (std::uint32_t id = head_index(old), k = 0; k < out.size(); ++k) {
            const std::uint32_t next = slots_[id].next.load(std::memory_order_relaxed);
            slots_[id].refs.store(1, std::memory_order_relaxed);
            out[k] = static_cast<BlockId>(id);
            id = next;
          }
        }
        return;
      }
    } else {
      old = head_.load(std::memory_order_acquire);
    }
  }
}

void BlockAllocator::push_chain(std::uint32_t first, std::uint32_t last,
                                std::uint32_t count) noexcept {
  // CAS loop invariant: the chain first..last is private to this thread (every node has count 0
  // and is not on the stack), so only slots_[last].next needs re-pointing on each retry. The version bump
  // defends against ABA exactly as in pop_chain.
  // release publishes the chain's next_ links (and the callers' writes to the blocks' memory) to
  // the thread that pops them with acquire.
  std::uint64_t old = head_.load(std::memory_order_relaxed);
  do {
    slots_[last].next.store(head_index(old), std::memory_order_relaxed);
  } while (!head_.compare_exchange_weak(old, next_head(old, first),
                                        std::memory_order_release, std::memory_order_relaxed));
  // Only after the nodes are on the stack may they be reserved (see allocate).
  available_.fetch_add(count, std::memory_order_release);
}

BatchStatus BlockAllocator::free(std::span<const BlockId> ids) noexcept {
  if (ids.empty()) return {};
  const IdCopy copy(ids);
  if (!copy.ok()) return {ErrorCode::kMemoryExhausted, -1, -1, false};
  const std::span<const BlockId> own = copy.span();
  // --- check: nothing changes until every id passes -------------------------------------------
  if (const BatchStatus range = check_range(own, num_blocks_); !range.ok()) return range;
  if (const std::int64_t bad = first_overdrawn(own); bad >= 0) {
    return {ErrorCode::kDoubleFree, bad, own[static_cast<std::size_t>(bad)], false};
  }
  return apply_free(own);
}

std::int64_t BlockAllocator::first_overdrawn(std::span<const BlockId> ids) const noexcept {
  // A snapshot check: a caller that holds the references it frees keeps every count at least as
  // high as its own share until it drops them, so concurrent frees by other holders cannot make a
  // legitimate batch fail here.
  const auto refs_of = [this](BlockId id) {
    return slots_[static_cast<std::uint32_t>(id)].refs.load(std::memory_order_relaxed);
  };
  if (ids.size() == 1) return refs_of(ids[0]) == 0 ? 0 : -1;
  if (ids.size() <= kFilterMaxIds) {
    // A 4096-bit filter of the ids seen so far: an id whose bit is clear appears for the first
    // time (the common case, one load and one bit test); only on a set bit are the earlier ids
    // counted exactly. So the check is exact, and linear unless ids collide in the filter.
    std::array<std::uint64_t, kFilterBits / 64> seen{};
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::uint32_t c = refs_of(ids[i]);
      if (c == 0) return static_cast<std::int64_t>(i);
      const auto h = static_cast<std::uint32_t>(ids[i]) % kFilterBits;
      const std::uint64_t bit = std::uint64_t{1} << (h % 64);
      if ((seen[h / 64] & bit) != 0) {
        const auto earlier = std::count(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids[i]);
        if (static_cast<std::uint64_t>(earlier) + 1 > c) return static_cast<std::int64_t>(i);
      }
      seen[h / 64] |= bit;
    }
    return -1;
  }
  // Long batches: sort (id, position) keys, then each run of one id needs that many references;
  // the first position beyond the count is the one reported.
  std::unique_ptr<std::uint64_t[]> keys(new (std::nothrow) std::uint64_t[ids.size()]);
  if (!keys) {
    // No scratch memory: fall back to the quadratic scan (slow, still exact).
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const auto earlier = static_cast<std::uint32_t>(std::count(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids[i]));
      if (earlier + 1 > refs_of(ids[i])) return static_cast<std::int64_t>(i);
    }
    return -1;
  }
  for (std::size_t i = 0; i < ids.size(); ++i) {
    keys[i] = (static_cast<std::uint64_t>(static_cast<std::uint32_t>(ids[i])) << 32) | static_cast<std::uint32_t>(i);
  }
  std::sort(keys.get(), keys.get() + ids.size());
  std::int64_t worst = -1;  // the smallest offending position over all runs
  for (std::size_t r = 0; r < ids.size();) {
    const auto id = static_cast<BlockId>(keys[r] >> 32);
    std::size_t e = r + 1;
    while (e < ids.size() && (keys[e] >> 32) == (keys[r] >> 32)) ++e;
    const std::uint32_t c = refs_of(id);
    if (e - r > c) {
      const auto pos = static_cast<std::int64_t>(keys[r + c] & 0xFFFFFFFFu);
      if (worst < 0 || pos < worst) worst = pos;
    }
    r = e;
  }
  return worst;
}

BatchStatus BlockAllocator::apply_free(std::span<const BlockId> ids) noexcept {
  std::uint32_t first = nil_;
  std::uint32_t last = nil_;
  std::uint32_t count = 0;
  BatchStatus status;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const auto id = static_cast<std::uint32_t>(ids[i]);
    // CAS loop invariant: a count only ever moves from c > 0 to c - 1, so it never goes below zero
    // and a block on the free list (count 0) is never touched. acq_rel: the release half orders
    // this holder's writes to the block before the block can be reused; the acquire half lets the
    // last holder (which pushes the block) see every other holder's writes. No ABA concern: the
    // value itself is the whole state.
    std::uint32_t c = slots_[id].refs.load(std::memory_order_relaxed);
    bool dropped = true;
    do {
      if (c == 0) {
        dropped = false;  // checked > 0 a moment ago: a double free lost a race (file comment)
        break;
      }
    } while (!slots_[id].refs.compare_exchange_weak(c, c - 1, std::memory_order_acq_rel,
                                                    std::memory_order_relaxed));
    if (!dropped) {
      if (status.ok()) status = {ErrorCode::kDoubleFree, static_cast<std::int64_t>(i), ids[i], true};
      continue;
    }
    if (c == 1) {
      // Last reference: link into the private chain that goes onto the stack at the end.
      slots_[id].next.store(first, std::memory_order_relaxed);
      first = id;
      if (last == nil_) last = id;
      ++count;
    }
  }
  if (count != 0) push_chain(first, last, count);
  return status;
}

BatchStatus BlockAllocator::incref(std::span<const BlockId> ids) noexcept {
  if (ids.empty()) return {};
  const IdCopy copy(ids);
  if (!copy.ok()) return {ErrorCode::kMemoryExhausted, -1, -1, false};
  const std::span<const BlockId> own = copy.span();
  if (const BatchStatus range = check_range(own, num_blocks_); !range.ok()) return range;
  for (std::size_t i = 0; i < own.size(); ++i) {
    const auto id = static_cast<std::uint32_t>(own[i]);
    // CAS loop invariant: a reference can only be added to a block that has one (c > 0); a free
    // block stays free. Relaxed: the caller already holds a reference, which orders its accesses.
    std::uint32_t c = slots_[id].refs.load(std::memory_order_relaxed);
    do {
      if (c == 0 || c == 0xFFFFFFFFu) {
        // Drop exactly the references this call added (on the private copy, never re-read): they
        // are ours, so the counts are at least that high and the drop cannot be refused; a block
        // whose other holders let go meanwhile returns to the free list here, as it should.
        [[maybe_unused]] const BatchStatus undo = apply_free(own.first(i));
        assert(undo.ok());
        return {ErrorCode::kInvalidBlock, static_cast<std::int64_t>(i), own[i], false};
      }
    } while (!slots_[id].refs.compare_exchange_weak(c, c + 1, std::memory_order_relaxed,
                                                    std::memory_order_relaxed));
  }
  return {};
}

std::uint32_t BlockAllocator::ref_count(BlockId id) const {
  if (id < 0 || static_cast<std::uint32_t>(id) >= num_blocks_) {
    throw Error(ErrorCode::kInvalidBlock, "block id " + std::to_string(id) +
                                              " is out of range [0, " +
                                              std::to_string(num_blocks_) + ")");
  }
  return slots_[static_cast<std::uint32_t>(id)].refs.load(std::memory_order_relaxed);
}

bool BlockAllocator::is_allocated(BlockId id) const noexcept {
  return id >= 0 && static_cast<std::uint32_t>(id) < num_blocks_ &&
         slots_[static_cast<std::uint32_t>(id)].refs.load(std::memory_order_relaxed) > 0;
}

std::uint32_t BlockAllocator::num_available() const noexcept {
  const std::int64_t a = available_.load(std::memory_order_relaxed);
  return a < 0 ? 0u : static_cast<std::uint32_t>(a);
}

std::uint32_t BlockAllocator::num_allocated() const noexcept {
  // available_ = limit - allocated (a reservation in flight counts as allocated). The two loads are
  // not one snapshot: between set_limit's store of the limit and its update of available_, a read
  // may pair the new limit with the old count (off by the change, e.g. 2N with every block in use
  // under a limit of 0 raised to N). Clamped to [0, num_blocks], so it never reports more blocks
  // than exist; exact whenever no limit change is in flight.
  const std::int64_t used =
      static_cast<std::int64_t>(limit_.load(std::memory_order_relaxed)) -
      available_.load(std::memory_order_relaxed);
  return static_cast<std::uint32_t>(std::clamp<std::int64_t>(used, 0, num_blocks_));
}

void BlockAllocator::set_limit(std::uint32_t limit) {
  if (limit > num_blocks_) {
    throw Error(ErrorCode::kInvalidArgument, "limit " + std::to_string(limit) +
                                                 " exceeds num_blocks " +
                                                 std::to_string(num_blocks_));
  }
  // Under the mutex, limit changes apply their deltas in the order they read the old limit, so
  // available_ never exceeds limit - allocated for any limit this allocator had: a reservation can
  // therefore always find its nodes on the stack (two unordered deltas once let it exceed that and
  // pop_chain spin). allocate/free never take the mutex.
  const std::lock_guard lock(limit_mutex_);
  const std::uint32_t old = limit_.load(std::memory_order_relaxed);
  limit_.store(limit, std::memory_order_relaxed);
  available_.fetch_add(static_cast<std::int64_t>(limit) - static_cast<std::int64_t>(old),
                       std::memory_order_release);
}

}  // namespace sagellm::kv
