// Every heap allocation of PrefixCache::insert, OffloadIndex::commit and RequestManager::admit /
// append may fail with std::bad_alloc. The call then changes nothing (no block taken, no use of a
// cached block held, no node, slot or request added or extended), or, when only the manager's
// best-effort publish failed, succeeds with those blocks private. After PrefixCache::reserve_insert
// the inserts it made room for cannot fail for memory. Cleanup cannot fail for memory: PrefixCache::release makes
// no allocation at all, and RequestManager finish / abort / preempt either refuse before changing
// anything or end every request named (their release phase runs in noexcept code, where a
// bad_alloc would terminate the process). This binary replaces the global operator new so that a
// test can fail the k-th allocation of one call, for every k until the call makes no more
// allocations.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/offload_index.hpp"
#include "sagellm_kv/prefix_cache.hpp"
#include "sagellm_kv/request_manager.hpp"

namespace {

thread_local long t_fail_countdown = -1;  // -1: off; 0: the next allocation of this thread fails
thread_local bool t_failed = false;       // an allocation was failed on purpose
thread_local long t_allocations = 0;      // allocations this thread asked for

void* counted_malloc(std::size_t n) {
  ++t_allocations;
  if (t_fail_countdown >= 0 && t_fail_countdown-- == 0) {
    t_failed = true;
    throw std::bad_alloc();
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}

}  // namespace

void* operator new(std::size_t n) { return counted_malloc(n); }
void* operator new[](std::size_t n) { return counted_malloc(n); }
// The nothrow forms too (the allocator's long batches use them): a sanitizer runtime supplies its
// own otherwise, which neither fails on purpose nor pairs with the delete below.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_malloc(n);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& tag) noexcept { return operator new(n, tag); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace sagellm::kv {
namespace {

constexpr std::uint32_t kBs = 4;
constexpr std::uint32_t kBlocks = 12;

// Runs `call` with this thread's k-th allocation from now failing with std::bad_alloc (k = 0: the
// first one), then stops failing. Returns what `call` returned (true for a void call), or nothing
// (false) when a bad_alloc left it; `injected` counts the calls in which an allocation was failed on
// purpose (t_failed says whether this one was).
template <class Call>
auto failing_at(long k, long& injected, Call&& call) {
  using R = std::invoke_result_t<Call&>;
  std::conditional_t<std::is_void_v<R>, bool, std::optional<R>> out{};
  t_failed = false;
  t_fail_countdown = k;
  try {
    if constexpr (std::is_void_v<R>) {
      call();
      out = true;
    } else {
      out = call();
    }
  } catch (const std::bad_alloc&) {
  }
  t_fail_countdown = -1;
  injected += t_failed ? 1 : 0;
  return out;
}

// The allocation-failure sweep: runs `attempt(fail, where)` for k = 0, 1, 2, ... Each attempt builds
// its fixture afresh and makes the call under test as `fail(call)` (failing_at with this k: the
// call's k-th allocation fails); `where` names the attempt for its messages. The sweep ends after
// the first attempt whose call ran with no allocation failed, i.e. once every allocation point of
// the call has been tried, or at a fatal failure. It expects to end that way within `max_attempts`
// attempts, having failed an allocation inside the call in at least `min_injected` of them.
template <class Attempt>
void sweep_allocations(long min_injected, Attempt&& attempt, long max_attempts = 10000) {
  long injected = 0;
  bool completed = false;
  for (long k = 0; k < max_attempts && !completed; ++k) {
    const auto fail = [&](auto&& call) { return failing_at(k, injected, call); };
    attempt(fail, "allocation " + std::to_string(k));
    if (::testing::Test::HasFatalFailure()) return;
    completed = !t_failed;
  }
  EXPECT_TRUE(completed);
  EXPECT_GE(injected, min_injected) << "the sweep failed too few allocations inside the call";
  std::printf("%ld allocations failed in turn\n", injected);
}

std::vector<std::int32_t> seq(std::int32_t start, std::size_t n) {
  std::vector<std::int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

std::vector<BlockHash> chain(std::int32_t start, std::size_t blocks) {
  const auto tokens = seq(start, blocks * kBs);
  std::vector<BlockHash> out(blocks);
  (void)hash_blocks(HashAlgorithm::kSha256, tokens, kBs, kRootBlockHash, {}, out);
  return out;
}

// Where the allocator is lock-free: allocate never takes heap memory, nor do free and incref of up
// to kStackBatch ids; longer batches copy their ids to heap scratch (whose allocator may lock), and
// when that fails they are refused with kMemoryExhausted, having changed nothing.
TEST(BlockAllocatorAllocFailure, OnlyBatchesAboveTheStackBatchTakeHeapMemory) {
  constexpr std::size_t kShort = BlockAllocator::kStackBatch;
  constexpr std::size_t kLong = kShort + 44;
  BlockAllocator alloc(512);
  std::vector<BlockId> ids(kLong);
  const long before = t_allocations;
  ASSERT_TRUE(alloc.allocate(ids).ok());  // a long pop: no heap either
  const std::span<const BlockId> first = std::span<const BlockId>(ids).first(kShort);
  ASSERT_TRUE(alloc.incref(first).ok());
  ASSERT_TRUE(alloc.free(first).ok());
  EXPECT_EQ(t_allocations, before);
  long injected = 0;
  EXPECT_EQ(failing_at(0, injected, [&] { return alloc.free(ids); })->code, ErrorCode::kMemoryExhausted);
  EXPECT_EQ(failing_at(0, injected, [&] { return alloc.incref(ids); })->code, ErrorCode::kMemoryExhausted);
  EXPECT_EQ(injected, 2);
  for (BlockId id : ids) ASSERT_EQ(alloc.ref_count(id), 1u) << "block " << id;
  EXPECT_EQ(alloc.num_allocated(), kLong);
  ASSERT_TRUE(alloc.free(ids).ok());
  EXPECT_EQ(alloc.num_available(), 512u);
}

TEST(PrefixCacheAllocFailure, InsertChangesNothingWhenAnAllocationFails) {
  // 20 new nodes under a cached prefix of 3: the digest index, node table, heaps and event all grow.
  const auto digests = chain(0, 23);
  sweep_allocations(5, [&](auto& fail, const std::string& where) {
    BlockAllocator alloc(64);
    PrefixCacheOptions o;
    o.block_size = kBs;
    o.event_queue_capacity = 64;
    PrefixCache cache(o, &alloc);
    std::vector<BlockId> blocks(23);
    ASSERT_TRUE(alloc.allocate(blocks).ok());
    ASSERT_EQ(cache.insert(std::span(digests).first(3), std::span(blocks).first(3)).num_inserted, 3u);
    (void)cache.drain_events();
    InsertOptions io;
    io.acquire = true;
    const auto res = fail([&] { return cache.insert(digests, blocks, io); });
    cache.check_invariants();
    if (!res) {
      ASSERT_EQ(cache.size(), 3u) << where;
      ASSERT_EQ(cache.stats().in_use_blocks, 0u) << where;
      for (std::size_t i = 0; i < digests.size(); ++i) ASSERT_EQ(cache.contains(digests[i]), i < 3) << where;
      for (std::size_t i = 0; i < blocks.size(); ++i) ASSERT_EQ(alloc.ref_count(blocks[i]), i < 3 ? 2u : 1u) << where;
      ASSERT_TRUE(cache.drain_events().empty()) << where;
      return;
    }
    ASSERT_EQ(res->num_cached(), 23u) << where;
    ASSERT_EQ(cache.stats().in_use_blocks, 23u) << where;
    cache.release(digests);
    ASSERT_TRUE(alloc.free(blocks).ok());
  });
}

// A metadata-only cache (no allocator): block ids are opaque numbers, dense ones mapped through a
// vector that grows with them, far and negative ones through a map. An insert whose new ids make the
// vector grow past ids that sat in the map (moving them over), and add far and negative ids, with
// each of its allocations failing in turn: nothing the cache shows changes, every old id still maps
// to its node (a second insert of it is refused), and a completed insert maps every new id.
TEST(PrefixCacheAllocFailure, MetadataOnlyInsertGrowingTheDenseTableChangesNothing) {
  const auto old_digests = chain(0, 6);
  // Dense from 0, then 1100 (beyond the first table's 4 x 6 + 1024 ids, so in the map until the
  // table grows over it), far, negative.
  const std::vector<BlockId> old_ids{0, 1, 2, 1100, 1 << 30, -3};
  const auto new_digests = chain(5000, 40);
  std::vector<BlockId> new_ids;
  for (BlockId b = 3; b < 33; ++b) new_ids.push_back(b);                    // dense, within the table
  // 1150 grows the table to 1151 ids (within 4 x 46 + 1024), moving 1100 over; 1300 and up stay sparse.
  for (BlockId b : {1050, 1150, 1300, 1700, 100000, -1, -2, -100, 1 << 29, 5000}) new_ids.push_back(b);
  ASSERT_EQ(new_ids.size(), new_digests.size());
  const auto refused_again = [](PrefixCache& cache, BlockId b) {
    const auto d = chain(900000 + b, 1);
    try {
      (void)cache.insert(d, std::span<const BlockId>(&b, 1));
    } catch (const Error& e) {
      return e.code() == ErrorCode::kInvalidArgument;
    }
    return false;
  };
  for (const bool bounded : {false, true}) {
    SCOPED_TRACE(bounded);
    sweep_allocations(3, [&](auto& fail, const std::string& where) {
      PrefixCacheOptions o;
      o.block_size = kBs;
      o.event_queue_capacity = 64;
      if (bounded) o.capacity_blocks = 30;  // evicts the old chain's unused blocks, caches part of the new
      PrefixCache cache(o);
      // The old chain, its first two blocks held (they stay whatever is evicted).
      ASSERT_EQ(cache.insert(old_digests, old_ids).num_inserted, 6u);
      const auto held = std::span(old_digests).first(2);
      std::vector<BlockId> out(2);
      ASSERT_EQ(cache.match(held, out), 2u);
      (void)cache.drain_events();
      const auto before = cache.stats();
      const auto res = fail([&] { return cache.insert(new_digests, new_ids); });
      ASSERT_NO_THROW(cache.check_invariants()) << where;
      if (!res) {
        ASSERT_EQ(cache.size(), 6u) << where;
        ASSERT_EQ(cache.stats().evictions, before.evictions) << where;
        for (std::size_t i = 0; i < old_digests.size(); ++i) {
          const auto info = cache.lookup(old_digests[i]);
          ASSERT_TRUE(info.has_value()) << where;
          ASSERT_EQ(info->block_id, old_ids[i]) << where;
          ASSERT_TRUE(refused_again(cache, old_ids[i])) << where << ": id " << old_ids[i] << " lost its node";
        }
        for (const BlockHash& d : new_digests) ASSERT_FALSE(cache.contains(d)) << where;
        ASSERT_EQ(cache.peek(new_digests), 0u) << where;
        ASSERT_TRUE(cache.drain_events().empty()) << where;
        // The ids that did not go in are free to cache something now.
        const auto again = cache.insert(new_digests, new_ids);
        ASSERT_EQ(again.num_cached(), bounded ? 28u : 40u) << where;
        ASSERT_NO_THROW(cache.check_invariants()) << where;
        return;
      }
      const std::uint32_t cached = res->num_cached();
      // Bounded: the old chain's 4 unused blocks make room, its 2 held ones stay: 28 of the 40 fit.
      ASSERT_EQ(cached, bounded ? 28u : 40u) << where;
      ASSERT_LE(cache.size(), bounded ? 30u : 46u) << where;
      for (std::size_t i = 0; i < new_ids.size(); ++i) {
        const auto info = cache.lookup(new_digests[i]);
        ASSERT_EQ(info.has_value(), i < cached) << where;
        if (i < cached) {
          ASSERT_EQ(info->block_id, new_ids[i]) << where;
          ASSERT_TRUE(refused_again(cache, new_ids[i])) << where << ": id " << new_ids[i] << " not mapped";
        }
      }
      cache.release(held);
      (void)cache.clear();
      ASSERT_EQ(cache.size(), 0u) << where;
      ASSERT_NO_THROW(cache.check_invariants()) << where;
      // Reused after the clear: the same ids map again.
      ASSERT_EQ(cache.insert(new_digests, new_ids).num_cached(), bounded ? 30u : 40u) << where;
      ASSERT_NO_THROW(cache.check_invariants()) << where;
    });
  }
}

// Without leftovers from earlier calls: a fresh cache whose heap grew only as inserts required.
TEST(PrefixCacheAllocFailure, ReleaseMakesNoAllocation) {
  for (const EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kPriority, EvictionPolicy::kTtl}) {
    SCOPED_TRACE(std::string(eviction_policy_name(policy)));
    BlockAllocator alloc(256);
    PrefixCacheOptions o;
    o.block_size = kBs;
    o.policy = policy;
    PrefixCache cache(o, &alloc);
    InsertOptions io;
    io.acquire = true;  // held: the heap stays empty while the chains grow
    std::vector<std::vector<BlockHash>> chains;
    for (std::int32_t c = 0; c < 12; ++c) {
      chains.push_back(chain(1000 * c, 6));
      std::vector<BlockId> blocks(6);
      ASSERT_TRUE(alloc.allocate(blocks).ok());
      ASSERT_EQ(cache.insert(chains.back(), blocks, io).num_inserted, 6u);
      ASSERT_TRUE(alloc.free(blocks).ok());
    }
    // A second use of chain 0's first 4 blocks (a match, released along parent links), and two more
    // of chain 1's first 3, released as digests out of chain order, one of them twice (the general
    // path).
    ASSERT_EQ(cache.match(std::span(chains[0]).first(4)).num_matched, 4u);
    ASSERT_EQ(cache.match(std::span(chains[1]).first(3)).num_matched, 3u);
    ASSERT_EQ(cache.match(std::span(chains[1]).first(3)).num_matched, 3u);
    const std::vector<BlockHash> scattered{chains[1][2], chains[1][0], chains[1][1], chains[1][2]};
    const auto released_without_allocating = [&](std::span<const BlockHash> digests) {
      t_failed = false;
      t_fail_countdown = 0;  // the first allocation of the call fails
      bool threw = false;
      try {
        cache.release(digests);
      } catch (const std::bad_alloc&) {
        threw = true;
      }
      t_fail_countdown = -1;
      return !threw && !t_failed;
    };
    EXPECT_TRUE(released_without_allocating(std::span(chains[0]).first(4)));
    EXPECT_TRUE(released_without_allocating(scattered));
    for (const auto& c : chains) EXPECT_TRUE(released_without_allocating(c));  // every leaf evictable now
    // Chain 1's first two blocks still have one use each, its third none.
    EXPECT_TRUE(released_without_allocating(std::span(chains[1]).first(2)));
    EXPECT_THROW(cache.release(std::span(chains[1]).subspan(2, 1)), Error);
    cache.check_invariants();
    const PrefixCacheStats st = cache.stats();
    EXPECT_EQ(st.in_use_blocks, 0u);
    EXPECT_EQ(st.evictable_blocks, 12u);
    EXPECT_EQ(cache.evict(72), 72u);
    EXPECT_EQ(alloc.num_allocated(), 0u);
  }
}

// The offload index's commit relies on this: after reserve_insert, a sequence of inserts (here a
// chain of 300 under a cached parent, more blocks than the allocator increfs without scratch
// memory, then a root chain of 5 and a reused prefix plus 3 new) cannot fail for memory: failing
// each allocation they attempt in turn (the long incref's scratch copy, which falls back to
// pieces) changes no outcome.
TEST(PrefixCacheAllocFailure, InsertsAfterReserveInsertCannotFailForMemory) {
  for (const EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kTtl}) {
    SCOPED_TRACE(std::string(eviction_policy_name(policy)));
    sweep_allocations(1, [&](auto& fail, const std::string& where) {
      BlockAllocator alloc(1024);
      PrefixCacheOptions o;
      o.block_size = kBs;
      o.policy = policy;
      PrefixCache cache(o, &alloc);
      const auto head = chain(0, 301);
      std::vector<BlockId> head_blocks(301);
      ASSERT_TRUE(alloc.allocate(head_blocks).ok());
      ASSERT_EQ(cache.insert(std::span(head).first(1), std::span(head_blocks).first(1)).num_inserted, 1u);
      const auto other = chain(5000, 8);
      std::vector<BlockId> other_blocks(8);
      ASSERT_TRUE(alloc.allocate(other_blocks).ok());
      std::vector<BlockId> all(head_blocks.begin() + 1, head_blocks.end());
      all.insert(all.end(), other_blocks.begin(), other_blocks.end());
      cache.reserve_insert(all);  // 308 blocks; the inserts below pass 300 + 5 + 8 = 313 digests
      cache.reserve_insert({});   // nothing to do
      InsertOptions under;
      under.parent = head[0];
      under.trusted_chain = true;
      const auto inserted = fail([&] {
        return cache.insert(std::span(head).subspan(1), std::span(head_blocks).subspan(1), under).num_inserted +
               cache.insert(std::span(other).first(5), std::span(other_blocks).first(5)).num_inserted +
               cache.insert(other, other_blocks).num_inserted;
      });
      if (!inserted) ADD_FAILURE() << "an insert failed for memory";
      ASSERT_EQ(inserted.value_or(0), 308u) << where;
      cache.check_invariants();
      for (BlockId b : head_blocks) ASSERT_EQ(alloc.ref_count(b), 2u) << where;
    }, 1000);
  }
}

TEST(PrefixCacheAllocFailure, InsertBeyondCapacityGivesBackEveryBlockItCannotCache) {
  // 300 new blocks into room for 4: the references on the 296 that do not fit go back in the commit
  // phase, a batch too long for the allocator's stack copy.
  constexpr std::uint32_t kNew = 300, kRoom = 4;
  const auto digests = chain(0, kNew);
  sweep_allocations(3, [&](auto& fail, const std::string& where) {
    BlockAllocator alloc(512);
    PrefixCacheOptions o;
    o.block_size = kBs;
    o.capacity_blocks = kRoom;
    PrefixCache cache(o, &alloc);
    std::vector<BlockId> blocks(kNew);
    ASSERT_TRUE(alloc.allocate(blocks).ok());
    const auto res = fail([&] { return cache.insert(digests, blocks); });
    cache.check_invariants();
    const std::uint32_t cached = res ? res->num_cached() : 0;
    ASSERT_EQ(cache.size(), cached) << where;
    if (res) {
      ASSERT_EQ(cached, kRoom) << where;
    }
    for (std::uint32_t i = 0; i < kNew; ++i) ASSERT_EQ(alloc.ref_count(blocks[i]), i < cached ? 2u : 1u) << where;
    ASSERT_TRUE(alloc.free(blocks).ok());
  });
}

TEST(PrefixCacheAllocFailure, ClearRemovesEverythingOrNothing) {
  // Emptying the cache shrinks its tables; that shrink used to throw after every node was gone.
  sweep_allocations(2, [&](auto& fail, const std::string& where) {
    BlockAllocator alloc(256);
    PrefixCacheOptions o;
    o.block_size = kBs;
    o.event_queue_capacity = 8;
    PrefixCache cache(o, &alloc);
    for (std::int32_t c = 0; c < 8; ++c) {
      std::vector<BlockId> blocks(20);
      ASSERT_TRUE(alloc.allocate(blocks).ok());
      ASSERT_EQ(cache.insert(chain(1000 * c, 20), blocks).num_inserted, 20u);
      ASSERT_TRUE(alloc.free(blocks).ok());
    }
    (void)cache.drain_events();
    const auto removed = fail([&] { return cache.clear(); });
    cache.check_invariants();
    if (!removed) {
      ASSERT_EQ(cache.size(), 160u) << where;
      ASSERT_EQ(alloc.num_allocated(), 160u) << where;
      return;
    }
    ASSERT_EQ(*removed, 160u) << where;
    ASSERT_EQ(cache.size(), 0u) << where;
    ASSERT_EQ(alloc.num_allocated(), 0u) << where;
    ASSERT_FALSE(cache.contains(chain(0, 1)[0])) << where;
    const auto events = cache.drain_events();
    ASSERT_TRUE(events.size() == 1 && events[0].type == PrefixCacheEvent::Type::kCleared) << where;
  });
}

// An offload index of 600 slots, all resident in two chains of 300.
struct FullIndex {
  FullIndex() : index(options()) {
    for (int c = 0; c < 2; ++c) {
      const std::vector<BlockId> call(300, OffloadIndex::kNoSlot);
      std::vector<BlockId> slots(300);
      std::vector<BlockId> gone;
      EXPECT_TRUE(index.reserve(call, OffloadIndex::kNoSlot, slots, gone));
      index.commit(slots);
    }
  }
  static OffloadIndexOptions options() {
    OffloadIndexOptions o;
    o.num_slots = 600;
    return o;
  }
  OffloadIndex index;
};

TEST(OffloadIndexAllocFailure, ReserveThatEvictsManySlotsChangesNothingOrEvictsThemCleanly) {
  // 300 victims: more than the allocator frees without scratch memory. Their frees used to be
  // refused then (after the victims left the trie), which threw Error(kInternal) half way.
  sweep_allocations(1, [&](auto& fail, const std::string& where) {
    FullIndex f;
    const std::vector<BlockId> call(300, OffloadIndex::kNoSlot);
    std::vector<BlockId> slots(300, -7);
    std::vector<BlockId> evicted;
    const auto ok =
        fail([&] { return f.index.reserve(call, OffloadIndex::kNoSlot, slots, evicted); });
    f.index.check_invariants();
    const OffloadIndexStats st = f.index.stats();
    if (!ok) {
      ASSERT_EQ(st.resident_slots, 600u) << where;
      ASSERT_EQ(st.pending_slots, 0u) << where;
      ASSERT_TRUE(evicted.empty()) << where;
      return;
    }
    ASSERT_TRUE(*ok) << where;
    ASSERT_EQ(evicted.size(), 300u) << where;
    ASSERT_EQ(st.resident_slots, 300u) << where;
    ASSERT_EQ(st.pending_slots, 300u) << where;
  });
}

TEST(OffloadIndexAllocFailure, AbandonOfManySlotsFreesThemOrChangesNothing) {
  sweep_allocations(1, [&](auto& fail, const std::string& where) {
    OffloadIndex index(FullIndex::options());
    const std::vector<BlockId> call(300, OffloadIndex::kNoSlot);
    std::vector<BlockId> slots(300);
    std::vector<BlockId> gone;
    ASSERT_TRUE(index.reserve(call, OffloadIndex::kNoSlot, slots, gone));
    const bool done = fail([&] { index.abandon(slots); });
    index.check_invariants();
    ASSERT_EQ(index.stats().pending_slots, done ? 0u : 300u) << where;
    ASSERT_EQ(index.stats().free_slots, done ? 600u : 300u) << where;
  });
}

// One commit of several runs: a run of 300 slots continuing a resident chain (more than the
// allocator increfs without scratch memory), a run of 4 from the root, and a run of 2 whose parent
// is the long run's last slot, committed in the same call. Each run is one trie insert; a failure
// in a later run's insert used to leave the earlier runs inserted and the failing run's slots
// marked resident but absent from the trie.
TEST(OffloadIndexAllocFailure, CommitOfSeveralRunsCommitsAllOrNothing) {
  for (const EvictionPolicy policy : {EvictionPolicy::kLru, EvictionPolicy::kTtl}) {
    SCOPED_TRACE(std::string(eviction_policy_name(policy)));
    sweep_allocations(3, [&](auto& fail, const std::string& where) {
      OffloadIndexOptions o;
      o.num_slots = 400;
      o.policy = policy;
      OffloadIndex index(o);
      std::vector<BlockId> gone;
      std::vector<BlockId> head(5);
      ASSERT_TRUE(index.reserve(std::vector<BlockId>(5, OffloadIndex::kNoSlot), OffloadIndex::kNoSlot, head, gone));
      index.commit(head);
      std::vector<BlockId> call1(301, OffloadIndex::kNoSlot);
      call1[0] = head.back();
      std::vector<BlockId> long_run(300);
      ASSERT_TRUE(index.reserve(call1, OffloadIndex::kNoSlot, long_run, gone));
      std::vector<BlockId> root_run(4);
      ASSERT_TRUE(index.reserve(std::vector<BlockId>(4, OffloadIndex::kNoSlot), OffloadIndex::kNoSlot, root_run, gone));
      std::vector<BlockId> tail_run(2);
      ASSERT_TRUE(index.reserve(std::vector<BlockId>(2, OffloadIndex::kNoSlot), long_run.back(), tail_run, gone));
      ASSERT_TRUE(gone.empty());
      // Handed over in a scrambled order (a caller's set), as the binding may.
      std::vector<BlockId> slots;
      slots.insert(slots.end(), tail_run.begin(), tail_run.end());
      slots.insert(slots.end(), root_run.rbegin(), root_run.rend());
      slots.insert(slots.end(), long_run.rbegin(), long_run.rend());
      const std::vector<BlockId> given = slots;
      const OffloadIndexStats before = index.stats();
      const bool done = fail([&] { index.commit(slots); });
      ASSERT_NO_THROW(index.check_invariants()) << where;
      const OffloadIndexStats st = index.stats();
      if (!done) {  // nothing changed: every slot still pending, the trie as it was
        ASSERT_EQ(slots, given) << where;
        ASSERT_EQ(st.pending_slots, 306u) << where;
        ASSERT_EQ(st.resident_slots, 5u) << where;
        ASSERT_EQ(st.free_slots, before.free_slots) << where;
        ASSERT_EQ(st.trie.inserts, before.trie.inserts) << where;
        for (BlockId s : given) ASSERT_EQ(index.state(s), SlotState::kPending) << where;
        return;
      }
      ASSERT_EQ(st.pending_slots, 0u) << where;
      ASSERT_EQ(st.resident_slots, 311u) << where;
      ASSERT_EQ(st.trie.inserts, before.trie.inserts + 306u) << where;
      ASSERT_EQ(index.parent(long_run.front()), head.back()) << where;
      ASSERT_EQ(index.parent(long_run.back()), long_run[298]) << where;
      ASSERT_EQ(index.parent(root_run.front()), OffloadIndex::kNoSlot) << where;
      ASSERT_EQ(index.parent(root_run.back()), root_run[2]) << where;
      ASSERT_EQ(index.parent(tail_run.front()), long_run.back()) << where;
      ASSERT_EQ(index.parent(tail_run.back()), tail_run.front()) << where;
    });
  }
}

TEST(OffloadIndexAllocFailure, ResetStartsAfreshOrChangesNothing) {
  // The old trie used to go before the new allocator was made: a failure then left no trie, and
  // the next call dereferenced it.
  sweep_allocations(2, [&](auto& fail, const std::string& where) {
    FullIndex f;
    const bool done = fail([&] { f.index.reset(); });
    ASSERT_NO_THROW(f.index.check_invariants()) << where;
    const OffloadIndexStats st = f.index.stats();
    ASSERT_EQ(st.resident_slots, done ? 0u : 600u) << where;
    ASSERT_EQ(st.free_slots, done ? 600u : 0u) << where;
  });
}

// A pool whose cache emits events (so published blocks carry their tokens: more allocations).
struct World {
  explicit World(std::uint32_t num_blocks = kBlocks) : alloc(num_blocks) {
    PrefixCacheOptions o;
    o.block_size = kBs;
    o.event_queue_capacity = 64;
    cache.emplace(o, &alloc);
    RequestManagerOptions mo;
    mo.block_size = kBs;
    manager.emplace(alloc, &*cache, mo);
  }
  ~World() {
    manager.reset();
    cache.reset();
  }

  BatchStatus admit(std::vector<AdmitRequest> batch, std::vector<BlockId>* tables) {
    std::vector<std::uint32_t> cached(batch.size());
    return manager->admit(batch, cached, tables);
  }

  // Every allocator reference is the cache's or a running request's own, and the structures agree.
  void check_accounting(const std::string& where) {
    manager->check_invariants();
    cache->check_invariants();
    std::uint64_t refs = 0;
    for (BlockId b = 0; b < static_cast<BlockId>(alloc.num_blocks()); ++b) refs += alloc.ref_count(b);
    ASSERT_EQ(refs, std::uint64_t{cache->size()} + manager->stats().owned_blocks) << where;
  }

  BlockAllocator alloc;
  std::optional<PrefixCache> cache;
  std::optional<RequestManager> manager;
};

// Cached, unused: blocks of two finished prompts, so the admits below match some and evict others.
void warm_up(World& w) {
  const auto a = seq(0, 8);
  const auto b = seq(200, 8);
  ASSERT_TRUE(w.admit({AdmitRequest{1, a, {}}, AdmitRequest{2, b, {}}}, nullptr).ok());
  const std::vector<RequestId> done{1, 2};
  w.manager->finish(done);
}

TEST(RequestManagerAllocFailure, AdmitChangesNothingWhenAnAllocationFails) {
  const auto matching = seq(0, 9);                 // matches the 2 cached blocks of prompt 1, 1 more
  const auto fresh = seq(500, 30);                 // 8 blocks: one of prompt 2's must be evicted
  const BlockHashKey salted{"salt", "extra"};
  sweep_allocations(5, [&](auto& fail, const std::string& where) {
    World w;
    warm_up(w);
    const std::vector<AdmitRequest> batch{AdmitRequest{10, matching, {}}, AdmitRequest{11, fresh, salted}};
    std::vector<std::uint32_t> cached(batch.size());
    std::vector<BlockId> tables{-7};
    const auto st = fail([&] { return w.manager->admit(batch, cached, &tables); });
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where));
    if (!st) {  // refused: nothing admitted, no use held, no block taken
      ASSERT_TRUE(w.manager->running().empty()) << where;
      ASSERT_EQ(w.cache->stats().in_use_blocks, 0u) << where;
      ASSERT_EQ(w.manager->stats().owned_blocks, 0u) << where;
      ASSERT_EQ(tables, std::vector<BlockId>{-7}) << where;
      return;
    }
    ASSERT_TRUE(st->ok()) << where;
    ASSERT_EQ(tables.size(), 1u + 3u + 8u) << where;
    const std::vector<RequestId> both{10, 11};
    w.manager->finish(both);
    ASSERT_EQ(w.cache->stats().in_use_blocks, 0u) << where;
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where + ", after finish"));
  });
}

TEST(RequestManagerAllocFailure, AppendChangesNothingWhenAnAllocationFails) {
  sweep_allocations(5, [&](auto& fail, const std::string& where) {
    World w;
    warm_up(w);
    ASSERT_TRUE(w.admit({AdmitRequest{10, seq(0, 7), {}}, AdmitRequest{11, seq(50, 3), {"s", ""}}}, nullptr).ok());
    const auto table10 = w.manager->block_table(10);
    const auto table11 = w.manager->block_table(11);
    const std::uint32_t in_use = w.cache->stats().in_use_blocks;
    const auto tokens = seq(900, 11);                  // 6 for request 10, 5 for request 11
    const std::vector<std::size_t> offsets{0, 6, 11};
    const std::vector<RequestId> ids{10, 11};
    std::vector<std::uint32_t> new_blocks(2, 0);
    std::vector<BlockId> new_ids{-7};
    const auto st =
        fail([&] { return w.manager->append(ids, tokens, offsets, new_blocks, &new_ids); });
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where));
    if (!st) {  // refused: both requests as they were
      ASSERT_EQ(w.manager->num_tokens(10), 7u) << where;
      ASSERT_EQ(w.manager->num_tokens(11), 3u) << where;
      ASSERT_EQ(w.manager->block_table(10), table10) << where;
      ASSERT_EQ(w.manager->block_table(11), table11) << where;
      ASSERT_EQ(w.cache->stats().in_use_blocks, in_use) << where;
      ASSERT_EQ(new_ids, std::vector<BlockId>{-7}) << where;
      return;
    }
    ASSERT_TRUE(st->ok()) << where;
    ASSERT_EQ(w.manager->num_tokens(10), 13u) << where;
    ASSERT_EQ(w.manager->num_tokens(11), 8u) << where;
    ASSERT_EQ(new_ids.size(), 1u + 2u + 1u) << where;
    w.manager->finish(ids);
    ASSERT_EQ(w.cache->stats().in_use_blocks, 0u) << where;
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where + ", after finish"));
  });
}

// Finished requests leave their records for the next admits. Three records of different kinds
// (salted with an extra key, opaque, plain) are reused by a batch of requests of other kinds and
// sizes (the reused vectors must grow) plus a fresh one, with each allocation failing in turn; a
// refused admit is then retried in the same manager. Nothing of a record's previous request shows:
// the digests published are the new requests' own (salt and extra key as given now), an opaque
// request publishes nothing, and every request's state checks out through append and finish.
TEST(RequestManagerAllocFailure, AdmitReusingFinishedRecordsCarriesNothingOver) {
  const auto long_prompt = seq(3000, 9 * kBs + 1);  // 9 full blocks: more than any earlier record held
  const auto plain = seq(4000, 2 * kBs + 3);
  const auto salted_prompt = seq(5000, kBs + 2);
  const BlockHashKey salted{"tenant", "lora"};
  const auto digests = [](const std::vector<std::int32_t>& t, const BlockHashKey& key) {
    std::vector<BlockHash> d(t.size() / kBs);
    (void)hash_blocks(HashAlgorithm::kSha256, t, kBs, kRootBlockHash, key, d);
    return d;
  };
  sweep_allocations(5, [&](auto& fail, const std::string& where) {
    World w(64);
    {
      const auto a = seq(0, 2 * kBs + 1);
      const auto b = seq(100, kBs + 1);
      AdmitRequest opaque{3, {}, {}};
      opaque.num_opaque_tokens = 7;
      ASSERT_TRUE(w.admit({AdmitRequest{1, a, BlockHashKey{"old-salt", "old-extra"}}, AdmitRequest{2, b, {}}, opaque},
                          nullptr)
                      .ok());
      const std::vector<RequestId> done{1, 2, 3};
      w.manager->finish(done);
    }
    (void)w.cache->drain_events();
    const std::uint32_t cached_before = w.cache->size();
    // Ids 1-3 again with other kinds, and a fresh id 4.
    AdmitRequest opaque_now{2, {}, {}};
    opaque_now.num_opaque_tokens = 5;
    const std::vector<AdmitRequest> batch{AdmitRequest{3, long_prompt, {}}, AdmitRequest{1, plain, {}}, opaque_now,
                                          AdmitRequest{4, salted_prompt, salted}};
    std::vector<std::uint32_t> cached(batch.size(), 77);
    const auto st = fail([&] { return w.manager->admit(batch, cached, nullptr); });
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where));
    if (!st) {
      ASSERT_TRUE(w.manager->running().empty()) << where;
      ASSERT_EQ(w.manager->stats().owned_blocks, 0u) << where;
      ASSERT_EQ(w.cache->size(), cached_before) << where;
      ASSERT_EQ(w.cache->stats().in_use_blocks, 0u) << where;
      // The same admit, unfailing, in the manager the failure left behind.
      ASSERT_TRUE(w.manager->admit(batch, cached, nullptr).ok()) << where;
    } else {
      ASSERT_TRUE(st->ok()) << where;
    }
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where + ", admitted"));
    ASSERT_EQ(cached, (std::vector<std::uint32_t>{0, 0, 0, 0})) << where;
    ASSERT_EQ(w.manager->num_tokens(3), long_prompt.size()) << where;
    ASSERT_EQ(w.manager->num_tokens(1), plain.size()) << where;
    ASSERT_EQ(w.manager->num_tokens(2), 5u) << where;
    ASSERT_EQ(w.manager->num_tokens(4), salted_prompt.size()) << where;
    // Published, unless the publish ran out of memory (absorbed: those blocks stay private until the
    // request's next publish): a cached leading run of each chain, held once.
    const auto held_run = [&](const std::vector<BlockHash>& chain_digests, bool all) {
      bool cached_so_far = true;
      for (const BlockHash& d : chain_digests) {
        const auto info = w.cache->lookup(d);
        ASSERT_TRUE(!all || info.has_value()) << where;
        ASSERT_TRUE(cached_so_far || !info.has_value()) << where;
        cached_so_far = info.has_value();
        if (info) {
          ASSERT_EQ(info->users, 1u) << where;
        }
      }
    };
    const bool all_published = w.manager->stats().published_blocks == 3u + 9u + 2u + 1u;
    ASSERT_TRUE(all_published || t_failed) << where;
    ASSERT_NO_FATAL_FAILURE(held_run(digests(long_prompt, {}), all_published));
    ASSERT_NO_FATAL_FAILURE(held_run(digests(plain, {}), all_published));
    ASSERT_NO_FATAL_FAILURE(held_run(digests(salted_prompt, salted), all_published));
    // The stored events name the new requests' salt and extra key, not the records' old ones.
    for (const PrefixCacheEvent& ev : w.cache->drain_events()) {
      if (ev.type != PrefixCacheEvent::Type::kStored) continue;
      const bool is_salted = ev.digests.front() == digests(salted_prompt, salted).front();
      ASSERT_EQ(ev.cache_salt, is_salted ? std::optional<std::string>("tenant") : std::nullopt) << where;
      ASSERT_EQ(ev.extra_key, is_salted ? std::optional<std::string>("lora") : std::nullopt) << where;
    }
    // Each fills its partial block; the blocks published now continue the new chains.
    const std::vector<RequestId> ids{3, 1, 2, 4};
    const auto tokens = seq(7000, 4 * kBs);
    const std::vector<std::size_t> offsets{0, kBs, 2 * kBs, 3 * kBs, 4 * kBs};
    std::vector<std::uint32_t> new_blocks(4);
    ASSERT_TRUE(w.manager->append(ids, tokens, offsets, new_blocks).ok()) << where;
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where + ", appended"));
    // Every full block is published now (a publish the failure cut short was retried).
    ASSERT_EQ(w.manager->stats().published_blocks, 3u + 10u + 3u + 2u) << where;
    ASSERT_EQ(w.cache->stats().in_use_blocks, 15u) << where;
    auto long_now = long_prompt;
    long_now.insert(long_now.end(), tokens.begin(), tokens.begin() + kBs);
    ASSERT_NO_FATAL_FAILURE(held_run(digests(long_now, {}), true));
    auto plain_now = plain;
    plain_now.insert(plain_now.end(), tokens.begin() + kBs, tokens.begin() + 2 * kBs);
    ASSERT_NO_FATAL_FAILURE(held_run(digests(plain_now, {}), true));
    auto salted_now = salted_prompt;
    salted_now.insert(salted_now.end(), tokens.begin() + 3 * kBs, tokens.end());
    ASSERT_NO_FATAL_FAILURE(held_run(digests(salted_now, salted), true));
    w.manager->finish(ids);
    ASSERT_EQ(w.cache->stats().in_use_blocks, 0u) << where;
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where + ", finished"));
  });
}

// An admit refused because the pool is short right now (not because it could never fit) has taken
// finished requests' records for its requests by then: it gives them back, so the admits after it
// reuse them and allocate no record (map node, vectors) anew. Before, the refused admit dropped
// them and the next admit allocated fresh ones. Single-request admits: a batch's duplicate check
// allocates. A salted request's refused record carries nothing over into the plain one reusing it.
TEST(RequestManagerAllocFailure, RefusedAdmitGivesBackTheRecordsItTook) {
  World w(16);
  std::uint32_t cached = 0;
  const auto admit_one = [&](RequestId id, const std::vector<std::int32_t>& tokens, const BlockHashKey& key = {}) {
    const AdmitRequest r{id, tokens, key};
    return w.manager->admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1));
  };
  const auto prompt = seq(100, 3 * kBs + 1);  // 3 full blocks, published at its first admit
  ASSERT_TRUE(admit_one(1, seq(0, 10 * kBs)).ok());  // runs throughout: 10 of the 16 blocks
  ASSERT_TRUE(admit_one(2, prompt).ok());            // 4 blocks
  ASSERT_TRUE(admit_one(5, prompt).ok());  // shares the 3 cached ones (none evictable), 1 of its own
  const RequestId two = 2;
  w.manager->finish(std::span<const RequestId>(&two, 1));  // one finished record to reuse
  (void)w.cache->drain_events();
  for (int round = 0; round < 4; ++round) {
    const std::string where = "round " + std::to_string(round);
    // 7 new blocks: more than the 2 free ones (nothing to evict), fewer than the pool holds.
    const BatchStatus refused = admit_one(3, seq(1000, 7 * kBs), {"tenant", "lora"});
    ASSERT_EQ(refused.code, ErrorCode::kPoolFull) << where;
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where + ", refused"));
    for (const PrefixCacheEvent& ev : w.cache->drain_events()) {  // last round's publish; evicting could not
      EXPECT_EQ(ev.type, PrefixCacheEvent::Type::kStored) << where;  // make room, so nothing was removed
    }
    const long before = t_allocations;
    ASSERT_TRUE(admit_one(4, prompt).ok()) << where;  // 3 blocks matched, a partial one: no publish
    EXPECT_EQ(t_allocations - before, 0) << where;
    EXPECT_EQ(cached, 3 * kBs) << where;
    EXPECT_EQ(w.manager->num_tokens(4), prompt.size()) << where;
    EXPECT_TRUE(w.cache->drain_events().empty()) << where;
    // Its 4th block fills: published under the plain chain, not the refused request's salt and key.
    const RequestId four = 4;
    const auto more = seq(9000, kBs - 1);
    const std::vector<std::size_t> offsets{0, more.size()};
    std::uint32_t new_blocks = 0;
    ASSERT_TRUE(w.manager->append(std::span<const RequestId>(&four, 1), more, offsets,
                                  std::span<std::uint32_t>(&new_blocks, 1)).ok()) << where;
    auto filled = prompt;
    filled.insert(filled.end(), more.begin(), more.end());
    std::vector<BlockHash> plain(4);
    (void)hash_blocks(HashAlgorithm::kSha256, filled, kBs, kRootBlockHash, {}, plain);
    const auto info = w.cache->lookup(plain[3]);
    ASSERT_TRUE(info.has_value()) << where;
    EXPECT_EQ(info->users, 1u) << where;
    w.manager->finish(std::span<const RequestId>(&four, 1));
    ASSERT_NO_FATAL_FAILURE(w.check_accounting(where + ", finished"));
  }
  // A batch, once one of its size has run, allocates nothing either (its repeated-id check sorts the
  // ids in the manager's scratch).
  const RequestId five = 5;
  w.manager->finish(std::span<const RequestId>(&five, 1));  // frees its partial block: 2 free now
  std::uint32_t pair_cached[2] = {0, 0};
  const AdmitRequest pair[2] = {{6, prompt, {}}, {7, prompt, {}}};
  const std::vector<RequestId> both{6, 7};
  for (int round = 0; round < 2; ++round) {
    const long before = t_allocations;
    ASSERT_TRUE(w.manager->admit(pair, pair_cached).ok());  // each: 3 blocks matched, a partial one
    if (round == 1) {
      EXPECT_EQ(t_allocations - before, 0);
    }
    ASSERT_NO_FATAL_FAILURE(w.check_accounting("batch"));
    w.manager->finish(both);
  }
}

enum class EndOp { kFinish, kAbort, kPreempt };

// Requests whose blocks were published (each holds a chain of cache uses) end with every
// allocation of the call failing in turn: the call refuses before any change, or ends them all.
// One request owns more blocks than the allocator copies on its stack. Before the release phase
// was allocation-free, a failure there terminated the process (noexcept) or leaked the blocks.
TEST(RequestManagerAllocFailure, EndingPublishedRequestsNeverFailsHalfWay) {
  for (const EndOp op : {EndOp::kFinish, EndOp::kAbort, EndOp::kPreempt}) {
    SCOPED_TRACE(static_cast<int>(op));
    sweep_allocations(1, [&](auto& fail, const std::string& where) {
      World w(1024);
      std::vector<std::vector<std::int32_t>> prompts;
      for (std::int32_t p = 1; p <= 5; ++p) prompts.push_back(seq(p * 100, 10));
      prompts.push_back(seq(100000, 300 * kBs + 1));  // 301 blocks, 300 published
      std::vector<AdmitRequest> batch;
      for (std::size_t i = 0; i < prompts.size(); ++i) {
        batch.push_back(AdmitRequest{static_cast<RequestId>(i + 1), prompts[i], {}});
      }
      ASSERT_TRUE(w.admit(batch, nullptr).ok());
      ASSERT_EQ(w.manager->stats().published_blocks, 5u * 2u + 300u);
      (void)w.cache->drain_events();
      const std::vector<RequestId> ids{3, 1, 6, 2, 5, 4};
      const bool ended = fail([&] {
        switch (op) {
          case EndOp::kFinish: w.manager->finish(ids); break;
          case EndOp::kAbort: w.manager->abort(ids); break;
          case EndOp::kPreempt: EXPECT_EQ(w.manager->preempt(ids), 5u * 10u + 300u * kBs + 1u); break;
        }
      });
      ASSERT_NO_FATAL_FAILURE(w.check_accounting(where));
      if (!ended) {  // refused: every request still runs and holds its uses
        ASSERT_EQ(w.manager->running().size(), 6u) << where;
        ASSERT_EQ(w.cache->stats().in_use_blocks, 310u) << where;
        return;
      }
      ASSERT_TRUE(w.manager->running().empty()) << where;
      ASSERT_EQ(w.manager->stats().owned_blocks, 0u) << where;
      ASSERT_EQ(w.cache->stats().in_use_blocks, 0u) << where;
      ASSERT_EQ(w.cache->stats().evictable_blocks, 6u) << where;
      ASSERT_EQ(w.alloc.num_allocated(), 310u) << where;  // the cache's references only
    });
  }
}

}  // namespace
}  // namespace sagellm::kv
