// OffloadIndex: slot states, store chains, pins, eviction order and the all-or-nothing errors.
#include "sagellm_kv/offload_index.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <random>
#include <set>
#include <vector>

#include "sagellm_kv/error.hpp"

namespace sagellm::kv {
namespace {

constexpr BlockId kNew = OffloadIndex::kNoSlot;

OffloadIndex make(std::uint32_t n, EvictionPolicy policy = EvictionPolicy::kLru) {
  OffloadIndexOptions o;
  o.num_slots = n;
  o.policy = policy;
  return OffloadIndex(o);
}

// Reserves `count` new slots chained after `prev`; returns them (empty when refused).
std::vector<BlockId> reserve_new(OffloadIndex& idx, std::size_t count, BlockId prev = OffloadIndex::kNoSlot,
                                 std::vector<BlockId>* evicted = nullptr) {
  std::vector<BlockId> call(count, kNew);
  std::vector<BlockId> out(count);
  std::vector<BlockId> gone;
  if (!idx.reserve(call, prev, out, evicted != nullptr ? *evicted : gone)) return {};
  return out;
}

// commit / abandon of a copy (they reorder their argument into reservation order).
void commit(OffloadIndex& idx, std::vector<BlockId> slots) { idx.commit(slots); }
void abandon(OffloadIndex& idx, std::vector<BlockId> slots) { idx.abandon(slots); }

ErrorCode code_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kOk;
}

TEST(OffloadIndex, RejectsBadOptions) {
  EXPECT_EQ(code_of([] { (void)make(0); }), ErrorCode::kInvalidArgument);
  OffloadIndexOptions o;
  o.num_slots = 4;
  o.policy = EvictionPolicy::kTtl;
  o.ttl_seconds = -1;
  EXPECT_EQ(code_of([&] { OffloadIndex idx(o); }), ErrorCode::kInvalidArgument);
}

TEST(OffloadIndex, SlotDigestNamesTheSlot) {
  const BlockHash d = OffloadIndex::slot_digest(0x0102);
  EXPECT_EQ(d.bytes[0], 0x02);
  EXPECT_EQ(d.bytes[1], 0x01);
  EXPECT_EQ(d.bytes[8], 's');
  EXPECT_NE(OffloadIndex::slot_digest(1), OffloadIndex::slot_digest(2));
}

TEST(OffloadIndex, ReserveCommitAndAbandon) {
  OffloadIndex idx = make(4);
  const auto slots = reserve_new(idx, 3);
  ASSERT_EQ(slots.size(), 3u);
  for (BlockId s : slots) EXPECT_EQ(idx.state(s), SlotState::kPending);
  auto st = idx.stats();
  EXPECT_EQ(st.free_slots, 1u);
  EXPECT_EQ(st.pending_slots, 3u);
  commit(idx, std::vector<BlockId>{slots[2], slots[0]});  // a set: any order
  abandon(idx, std::vector<BlockId>{slots[1]});
  EXPECT_EQ(idx.state(slots[0]), SlotState::kResident);
  EXPECT_EQ(idx.state(slots[1]), SlotState::kFree);
  EXPECT_EQ(idx.parent(slots[0]), OffloadIndex::kNoSlot);
  EXPECT_EQ(idx.parent(slots[2]), OffloadIndex::kNoSlot);  // its parent-to-be failed: a root
  st = idx.stats();
  EXPECT_EQ(st.free_slots, 2u);
  EXPECT_EQ(st.resident_slots, 2u);
  EXPECT_EQ(st.pending_slots, 0u);
  idx.check_invariants();
}

TEST(OffloadIndex, CommitInOneCallChainsParentsFirst) {
  OffloadIndex idx = make(8);
  const auto a = reserve_new(idx, 3);
  const auto b = reserve_new(idx, 2, a[2]);  // continues a's request while a is still pending
  std::vector<BlockId> set{b[1], a[2], b[0], a[0], a[1]};
  idx.commit(set);
  EXPECT_EQ(set, (std::vector<BlockId>{a[0], a[1], a[2], b[0], b[1]}));  // reordered: reservation order
  EXPECT_EQ(idx.parent(a[1]), a[0]);
  EXPECT_EQ(idx.parent(a[2]), a[1]);
  EXPECT_EQ(idx.parent(b[0]), a[2]);
  EXPECT_EQ(idx.parent(b[1]), b[0]);
  idx.check_invariants();
}

TEST(OffloadIndex, ExistingEntriesSplitTheChain) {
  OffloadIndex idx = make(8);
  const auto a = reserve_new(idx, 1);
  commit(idx, a);
  std::vector<BlockId> call{kNew, a[0], kNew};
  std::vector<BlockId> out(2);
  std::vector<BlockId> evicted;
  ASSERT_TRUE(idx.reserve(call, OffloadIndex::kNoSlot, out, evicted));
  commit(idx, out);
  EXPECT_EQ(idx.parent(out[0]), OffloadIndex::kNoSlot);
  EXPECT_EQ(idx.parent(out[1]), a[0]);
}

TEST(OffloadIndex, EvictsTailsFirstAndSparesTheCallAndPins) {
  OffloadIndex idx = make(4);
  const auto chain = reserve_new(idx, 3);
  commit(idx, chain);
  const auto lone = reserve_new(idx, 1);
  commit(idx, lone);
  idx.pin(std::vector<BlockId>{chain[0], chain[1]});  // a request's prefix: one match
  EXPECT_EQ(idx.stats().trie.lookups, 1u);
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 2u);
  // lone is part of the call, chain[0..1] pinned: only the tail can go
  std::vector<BlockId> call{lone[0], kNew};
  std::vector<BlockId> out(1);
  std::vector<BlockId> evicted;
  ASSERT_TRUE(idx.reserve(call, OffloadIndex::kNoSlot, out, evicted));
  EXPECT_EQ(evicted, std::vector<BlockId>{chain[2]});
  EXPECT_EQ(out[0], chain[2]);  // the freed slot is reused
  EXPECT_EQ(idx.stats().evictions, 1u);
  // nothing else can go now
  std::vector<BlockId> out2(1);
  std::vector<BlockId> evicted2;
  const std::vector<BlockId> call2{lone[0], kNew};
  EXPECT_FALSE(idx.reserve(call2, OffloadIndex::kNoSlot, out2, evicted2));
  EXPECT_TRUE(evicted2.empty());
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 2u);  // the spare pins were released
  idx.unpin(std::vector<BlockId>{chain[1], chain[0]});
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 0u);
  commit(idx, out);
  idx.check_invariants();
}

TEST(OffloadIndex, LruFollowsPinsAndTouches) {
  OffloadIndex idx = make(3);
  std::vector<BlockId> s;
  for (int i = 0; i < 3; ++i) {
    const auto one = reserve_new(idx, 1);
    commit(idx, one);
    s.push_back(one[0]);
  }
  idx.pin(std::vector<BlockId>{s[0]});
  idx.unpin(std::vector<BlockId>{s[0]});
  idx.touch(std::vector<BlockId>{s[1], 99, -5});  // non-resident entries are ignored
  std::vector<BlockId> evicted;
  ASSERT_EQ(reserve_new(idx, 1, OffloadIndex::kNoSlot, &evicted).size(), 1u);
  EXPECT_EQ(evicted, std::vector<BlockId>{s[2]});
}

TEST(OffloadIndex, ScatteredPinsCoverRootPaths) {
  OffloadIndex idx = make(6);
  const auto chain = reserve_new(idx, 4);
  commit(idx, chain);
  idx.pin(std::vector<BlockId>{chain[3], chain[1]});  // not a chain from the root: paths of the deepest
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 4u);
  idx.unpin(std::vector<BlockId>{chain[1], chain[3]});
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 0u);
  idx.check_invariants();
}

TEST(OffloadIndex, ErrorsChangeNothing) {
  OffloadIndex idx = make(4);
  const auto a = reserve_new(idx, 2);
  EXPECT_EQ(code_of([&] { idx.pin(a); }), ErrorCode::kCacheMiss);  // pending: not readable
  EXPECT_EQ(code_of([&] { commit(idx, std::vector<BlockId>{a[0], a[0]}); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { commit(idx, std::vector<BlockId>{a[0], 7}); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(idx.state(a[0]), SlotState::kPending);
  commit(idx, a);
  EXPECT_EQ(code_of([&] { commit(idx, a); }), ErrorCode::kInvalidArgument);  // not pending any more
  EXPECT_EQ(code_of([&] { idx.unpin(a); }), ErrorCode::kRefCountUnderflow);
  idx.pin(std::vector<BlockId>{a[0]});
  EXPECT_EQ(code_of([&] { idx.unpin(a); }), ErrorCode::kRefCountUnderflow);  // a[1] not pinned: all or nothing
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 1u);
  std::vector<BlockId> out(1);
  std::vector<BlockId> evicted;
  const BlockId free_slot = idx.state(2) == SlotState::kFree ? 2 : 3;
  const std::vector<BlockId> call{free_slot, kNew};
  EXPECT_EQ(code_of([&] { (void)idx.reserve(call, OffloadIndex::kNoSlot, out, evicted); }), ErrorCode::kInvalidArgument);
  const std::vector<BlockId> call_one{kNew};
  std::vector<BlockId> wrong(2);
  EXPECT_EQ(code_of([&] { (void)idx.reserve(call_one, OffloadIndex::kNoSlot, wrong, evicted); }),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { (void)idx.reserve(call_one, 9, out, evicted); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(idx.stats().free_slots, 2u);
  idx.unpin(std::vector<BlockId>{a[0]});
  idx.check_invariants();
}

TEST(OffloadIndex, ReusedParentSlotDoesNotChain) {
  OffloadIndex idx = make(2);
  const auto a = reserve_new(idx, 1);
  commit(idx, a);
  const auto b = reserve_new(idx, 1, a[0]);  // pending, chained after a
  std::vector<BlockId> evicted;
  const auto c = reserve_new(idx, 1, OffloadIndex::kNoSlot, &evicted);  // evicts a, reuses its slot
  ASSERT_EQ(evicted, a);
  ASSERT_EQ(c, a);
  commit(idx, c);
  commit(idx, b);
  EXPECT_EQ(idx.parent(b[0]), OffloadIndex::kNoSlot);  // a's slot now holds another chunk
  idx.check_invariants();
}

TEST(OffloadIndex, ResetDropsPinsAndPending) {
  OffloadIndex idx = make(4);
  const auto a = reserve_new(idx, 2);
  commit(idx, a);
  idx.pin(a);
  (void)reserve_new(idx, 1);
  idx.reset();
  const auto st = idx.stats();
  EXPECT_EQ(st.free_slots, 4u);
  EXPECT_EQ(st.pending_slots + st.resident_slots + st.trie.in_use_blocks + st.trie.lookups + st.evictions, 0u);
  idx.check_invariants();
  EXPECT_EQ(reserve_new(idx, 4).size(), 4u);
}

TEST(OffloadIndex, ALoadReleasedInPartsKeepsItsPinsUntilItsLastSlot) {
  OffloadIndex idx = make(2);
  const auto chain = reserve_new(idx, 2);
  commit(idx, chain);
  idx.pin(chain);
  idx.unpin(std::vector<BlockId>{chain[1]});  // chain[0] is still loading
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 2u);
  EXPECT_TRUE(reserve_new(idx, 1).empty());  // it released the whole chain: chain[0] was evicted under its load
  EXPECT_EQ(code_of([&] { idx.unpin(std::vector<BlockId>{chain[1]}); }), ErrorCode::kRefCountUnderflow);
  idx.unpin(std::vector<BlockId>{chain[0]});
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 0u);
  // a slot pinned only as an ancestor has no load of its own to release (it used to release one, leaving
  // chain[1] in use under an unused parent, which eviction then counted as evictable)
  idx.pin(std::vector<BlockId>{chain[1]});
  EXPECT_EQ(code_of([&] { idx.unpin(std::vector<BlockId>{chain[0]}); }), ErrorCode::kRefCountUnderflow);
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 2u);
  // two loads of one slot, released in another split: each release takes one load
  idx.pin(chain);
  idx.unpin(std::vector<BlockId>{chain[1], chain[1]});  // listed twice: once
  idx.unpin(std::vector<BlockId>{chain[1], chain[0]});
  EXPECT_EQ(idx.stats().trie.in_use_blocks, 0u);
  idx.check_invariants();
  idx.pin(chain);
  idx.reset();  // drops loads in flight too
  idx.check_invariants();
  EXPECT_EQ(code_of([&] { idx.unpin(std::vector<BlockId>{}); }), ErrorCode::kOk);
}

// Random calls against a plain model of the states; the index's invariants hold throughout.
TEST(OffloadIndex, RandomSequencesKeepTheBooks) {
  std::mt19937 rng(11);
  OffloadIndex idx = make(24);
  std::set<BlockId> pending;
  std::set<BlockId> resident;
  std::vector<std::vector<BlockId>> pins;
  for (int step = 0; step < 3000; ++step) {
    const int op = static_cast<int>(rng() % 5);
    if (op == 0 || op == 1) {
      std::vector<BlockId> call;
      for (BlockId s : resident) {
        if (rng() % 8 == 0) call.push_back(s);
      }
      const std::size_t fresh = 1 + rng() % 6;
      for (std::size_t i = 0; i < fresh; ++i) call.insert(call.begin() + static_cast<std::ptrdiff_t>(rng() % (call.size() + 1)), kNew);
      std::vector<BlockId> out(fresh);
      std::vector<BlockId> evicted;
      if (idx.reserve(call, OffloadIndex::kNoSlot, out, evicted)) {
        for (BlockId s : evicted) {
          ASSERT_EQ(resident.erase(s), 1u);
          ASSERT_EQ(std::count(call.begin(), call.end(), s), 0);
          for (const auto& pin : pins) ASSERT_EQ(std::count(pin.begin(), pin.end(), s), 0);
        }
        for (BlockId s : out) ASSERT_TRUE(pending.insert(s).second);
      } else {
        ASSERT_TRUE(evicted.empty());
      }
    } else if (op == 2 && !pending.empty()) {
      std::vector<BlockId> part;
      for (BlockId s : pending) {
        if (rng() % 2 == 0) part.push_back(s);
      }
      std::shuffle(part.begin(), part.end(), rng);
      const bool ok = rng() % 5 != 0;
      if (ok) {
        commit(idx, part);
      } else {
        abandon(idx, part);
      }
      for (BlockId s : part) {
        pending.erase(s);
        if (ok) resident.insert(s);
      }
    } else if (op == 3 && !resident.empty()) {
      std::vector<BlockId> pick;
      for (BlockId s : resident) {
        if (rng() % 3 == 0) pick.push_back(s);
      }
      idx.pin(pick);
      pins.push_back(pick);
    } else if (op == 4 && !pins.empty()) {
      // a load completes whole or in parts; the slots of its rest must stay pinned (checked on eviction)
      const std::size_t at = rng() % pins.size();
      auto pick = pins[at];
      pins.erase(pins.begin() + static_cast<std::ptrdiff_t>(at));
      std::shuffle(pick.begin(), pick.end(), rng);
      const std::size_t done = rng() % 2 == 0 ? pick.size() : rng() % (pick.size() + 1);
      idx.unpin(std::span<const BlockId>(pick).first(done));
      if (done < pick.size()) pins.emplace_back(pick.begin() + static_cast<std::ptrdiff_t>(done), pick.end());
    }
    const auto st = idx.stats();
    ASSERT_EQ(st.pending_slots, pending.size());
    ASSERT_EQ(st.resident_slots, resident.size());
    ASSERT_EQ(st.free_slots, 24 - pending.size() - resident.size());
    if (step % 100 == 0) idx.check_invariants();
  }
}

}  // namespace
}  // namespace sagellm::kv
