#include "sagellm_kv/block_allocator.hpp"

#include <cassert>
#include <string>

namespace sagellm::kv {
namespace {

constexpr std::uint32_t low_index(std::uint64_t head) noexcept {
  return static_cast<std::uint32_t>(head & 0xFFFFFFFFu);
}
constexpr std::uint32_t version_of(std::uint64_t head) noexcept {
  return static_cast<std::uint32_t>(head >> 32);
}

}  // namespace

BlockAllocator::BlockAllocator(std::uint32_t num_blocks)
    : num_blocks_(num_blocks), head_(0), available_(0), limit_(num_blocks) {
  if (num_blocks == 0 || num_blocks > kMaxBlocks) {
    throw Error(ErrorCode::kInvalidArgument,
                "num_blocks must be in [1, " + std::to_string(kMaxBlocks) + "], got " +
                    std::to_string(num_blocks));
  }
  slots_ = std::make_unique<Slot[]>(num_blocks);
  // Ids come off the stack in ascending order on a fresh allocator: easy to read in tests and logs.
  for (std::uint32_t i = 0; i < num_blocks; ++i) {
    slots_[i].next.store(i + 1 < num_blocks ? i + 1 : kNil, std::memory_order_relaxed);
    slots_[i].refs.store(0, std::memory_order_relaxed);
  }
  head_.store(pack(0, 0), std::memory_order_relaxed);
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
  // We own these ids now; nobody else reads their count until we hand the ids out.
  for (BlockId id : out) slots_[static_cast<std::uint32_t>(id)].refs.store(1, std::memory_order_relaxed);
  return {};
}

BlockId BlockAllocator::allocate_one() noexcept {
  BlockId id = -1;
  if (!allocate(std::span<BlockId>(&id, 1)).ok()) return -1;
  return id;
}

void BlockAllocator::pop_chain(std::span<BlockId> out) noexcept {
  // CAS loop invariant: `old` is a snapshot of the head; we walk out.size() nodes from it and swing
  // the head past them in one CAS. The version in the high half changes on every successful update,
  // so if any other thread popped or pushed since our snapshot (even restoring the same top index),
  // the CAS fails and we walk again. Reads of next_ from a stale snapshot may see values being
  // rewritten; they are atomics and the failed CAS discards them.
  // acquire on the head load pairs with the release CAS in push_chain: the next_ links of every
  // node on the stack (written before their push) are visible to the walk.
  std::uint64_t old = head_.load(std::memory_order_acquire);
  for (;;) {
    std::uint32_t cur = low_index(old);
    std::size_t taken = 0;
    for (; taken < out.size(); ++taken) {
      if (cur >= num_blocks_) break;  // kNil or a torn stale read: the snapshot is stale
      out[taken] = static_cast<BlockId>(cur);
      cur = slots_[cur].next.load(std::memory_order_relaxed);
    }
    if (taken == out.size()) {
      const std::uint64_t desired = pack(cur, version_of(old) + 1);
      if (head_.compare_exchange_weak(old, desired, std::memory_order_acquire,
                                      std::memory_order_acquire)) {
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
    slots_[last].next.store(low_index(old), std::memory_order_relaxed);
  } while (!head_.compare_exchange_weak(old, pack(first, version_of(old) + 1),
                                        std::memory_order_release, std::memory_order_relaxed));
  // Only after the nodes are on the stack may they be reserved (see allocate).
  available_.fetch_add(count, std::memory_order_release);
}

BatchStatus BlockAllocator::free(std::span<const BlockId> ids) noexcept {
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || static_cast<std::uint32_t>(ids[i]) >= num_blocks_) {
      return {ErrorCode::kInvalidBlock, static_cast<std::int64_t>(i)};
    }
  }
  std::uint32_t first = kNil;
  std::uint32_t last = kNil;
  std::uint32_t count = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const auto id = static_cast<std::uint32_t>(ids[i]);
    // CAS loop invariant: we only ever move a count from c > 0 to c - 1, so a free of a block with
    // no reference left is detected instead of wrapping around. acq_rel: the release half orders
    // this holder's writes to the block before the block can be reused; the acquire half lets the
    // last holder (which pushes the block) see every other holder's writes.
    std::uint32_t c = slots_[id].refs.load(std::memory_order_relaxed);
    do {
      if (c == 0) {
        rollback_free(ids, i);
        return {ErrorCode::kDoubleFree, static_cast<std::int64_t>(i)};
      }
    } while (!slots_[id].refs.compare_exchange_weak(c, c - 1, std::memory_order_acq_rel,
                                              std::memory_order_relaxed));
    if (c == 1) {
      // Last reference: link into the private chain that goes onto the stack at the end.
      slots_[id].next.store(first, std::memory_order_relaxed);
      first = id;
      if (last == kNil) last = id;
      ++count;
    }
  }
  if (count != 0) push_chain(first, last, count);
  return {};
}

void BlockAllocator::rollback_free(std::span<const BlockId> ids, std::size_t applied) noexcept {
  // Restores the references dropped by the first `applied` ids. Blocks that reached zero were not
  // pushed yet, so no other thread can have taken them; incref refuses a count of zero, so no
  // legitimate holder raced with us either.
  for (std::size_t i = 0; i < applied; ++i) {
    slots_[static_cast<std::uint32_t>(ids[i])].refs.fetch_add(1, std::memory_order_relaxed);
  }
}

BatchStatus BlockAllocator::incref(std::span<const BlockId> ids) noexcept {
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || static_cast<std::uint32_t>(ids[i]) >= num_blocks_) {
      return {ErrorCode::kInvalidBlock, static_cast<std::int64_t>(i)};
    }
  }
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const auto id = static_cast<std::uint32_t>(ids[i]);
    // CAS loop invariant: a reference can only be added to a block that has one (c > 0); a free
    // block stays free. Relaxed: the caller already holds a reference, which orders its accesses.
    std::uint32_t c = slots_[id].refs.load(std::memory_order_relaxed);
    do {
      if (c == 0 || c == 0xFFFFFFFFu) {
        // Undo what we added; those blocks keep at least the reference the caller holds, so this
        // cannot push anything (and cannot fail).
        [[maybe_unused]] const BatchStatus undo = free(ids.first(i));
        assert(undo.ok());
        return {ErrorCode::kInvalidBlock, static_cast<std::int64_t>(i)};
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
  // available_ = limit - allocated (a reservation in flight counts as allocated).
  const std::int64_t used =
      static_cast<std::int64_t>(limit_.load(std::memory_order_relaxed)) -
      available_.load(std::memory_order_relaxed);
  return used < 0 ? 0u : static_cast<std::uint32_t>(used);
}

void BlockAllocator::set_limit(std::uint32_t limit) {
  if (limit > num_blocks_) {
    throw Error(ErrorCode::kInvalidArgument, "limit " + std::to_string(limit) +
                                                 " exceeds num_blocks " +
                                                 std::to_string(num_blocks_));
  }
  // exchange gives each concurrent caller a consistent delta; the sum of deltas equals the net
  // change of the limit, so available_ stays limit - allocated.
  const std::uint32_t old = limit_.exchange(limit, std::memory_order_relaxed);
  available_.fetch_add(static_cast<std::int64_t>(limit) - static_cast<std::int64_t>(old),
                       std::memory_order_release);
}

}  // namespace sagellm::kv
