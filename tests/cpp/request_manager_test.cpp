#include "sagellm_kv/request_manager.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/error.hpp"
#include "test_support.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace sagellm::kv {
namespace {

constexpr std::uint32_t kBs = 4;

std::vector<std::int32_t> seq(std::int32_t start, std::size_t n) {
  std::vector<std::int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

using testing::code_of;

struct Fixture {
  explicit Fixture(std::uint32_t blocks, std::optional<std::uint32_t> capacity = {}, bool caching = true)
      : alloc(blocks) {
    PrefixCacheOptions o;
    o.block_size = kBs;
    o.capacity_blocks = capacity;
    if (caching) cache.emplace(o, &alloc);
    RequestManagerOptions mo;
    mo.block_size = kBs;
    manager.emplace(alloc, caching ? &*cache : nullptr, mo);
  }
  ~Fixture() {
    manager.reset();
    cache.reset();
  }

  // Admits one request; returns its cached token count, or -1 when refused.
  std::int64_t admit(RequestId id, const std::vector<std::int32_t>& tokens, std::vector<BlockId>* table = nullptr) {
    const AdmitRequest r{id, tokens, {}};
    std::uint32_t cached = 0;
    const BatchStatus st = manager->admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1), table);
    return st.ok() ? std::int64_t{cached} : -1;
  }
  BatchStatus append(const std::vector<RequestId>& ids, const std::vector<std::vector<std::int32_t>>& runs,
                     std::vector<std::uint32_t>* counts = nullptr, std::vector<BlockId>* new_ids = nullptr) {
    std::vector<std::int32_t> flat;
    std::vector<std::size_t> offsets{0};
    for (const auto& r : runs) {
      flat.insert(flat.end(), r.begin(), r.end());
      offsets.push_back(flat.size());
    }
    std::vector<std::uint32_t> local(ids.size());
    auto& out = counts != nullptr ? *counts : local;
    out.resize(ids.size());
    return manager->append(ids, flat, offsets, out, new_ids);
  }
  void finish(RequestId id) { manager->finish(std::span<const RequestId>(&id, 1)); }

  BlockAllocator alloc;
  std::optional<PrefixCache> cache;
  std::optional<RequestManager> manager;
};

TEST(RequestManager, AdmitAllocatesTableAndPublishesFullBlocks) {
  Fixture f(64);
  std::vector<BlockId> table;
  EXPECT_EQ(f.admit(1, seq(0, 10), &table), 0);  // 2 full blocks + 2 tokens
  EXPECT_EQ(table.size(), 3u);
  EXPECT_EQ(f.manager->block_table(1), table);
  EXPECT_EQ(f.manager->num_tokens(1), 10u);
  EXPECT_EQ(f.cache->size(), 2u);
  EXPECT_EQ(f.alloc.num_allocated(), 3u);
  EXPECT_EQ(f.cache->stats().in_use_blocks, 2u);  // held by the running request
  f.manager->check_invariants();
  f.cache->check_invariants();
}

TEST(RequestManager, SecondRequestSharesPrefixAndFinishKeepsItCached) {
  Fixture f(64);
  std::vector<BlockId> a, b;
  ASSERT_EQ(f.admit(1, seq(0, 12), &a), 0);
  auto tokens = seq(0, 8);
  tokens.push_back(999);
  ASSERT_EQ(f.admit(2, tokens, &b), 8);
  EXPECT_EQ(b[0], a[0]);
  EXPECT_EQ(b[1], a[1]);
  EXPECT_NE(b[2], a[2]);
  EXPECT_EQ(f.alloc.num_allocated(), 4u);  // 3 of request 1 + 1 of request 2
  f.finish(1);
  f.finish(2);
  f.manager->check_invariants();
  EXPECT_EQ(f.alloc.num_allocated(), 3u);  // the three published blocks stay cached
  EXPECT_EQ(f.cache->stats().in_use_blocks, 0u);
  EXPECT_EQ(f.admit(3, seq(0, 13)), 12);
  EXPECT_EQ(f.manager->stats().hit_blocks, 5u);
}

TEST(RequestManager, PublishedBlocksAreTheCachesNotTheRequests) {
  Fixture f(64);
  std::vector<BlockId> table;
  ASSERT_EQ(f.admit(1, seq(0, 10), &table), 0);  // 2 full blocks + 2 tokens
  // Publishing handed the request's references on its full blocks to the cache: one each.
  for (BlockId b : table) EXPECT_EQ(f.alloc.ref_count(b), 1u) << b;
  EXPECT_EQ(f.manager->stats().owned_blocks, 1u);  // the partial block
  std::vector<BlockId> fresh;
  ASSERT_TRUE(f.append({1}, {seq(10, 2)}, nullptr, &fresh).ok());  // fills block 2, no new block
  EXPECT_TRUE(fresh.empty());
  EXPECT_EQ(f.manager->stats().owned_blocks, 0u);
  EXPECT_EQ(f.alloc.ref_count(table[2]), 1u);
  EXPECT_EQ(f.alloc.num_allocated(), f.cache->size() + f.manager->stats().owned_blocks);
  f.manager->check_invariants();
  f.finish(1);
  EXPECT_EQ(f.alloc.num_allocated(), 3u);  // the cache's, one reference each
  for (BlockId b : table) EXPECT_EQ(f.alloc.ref_count(b), 1u) << b;
  f.cache->check_invariants();
}

TEST(RequestManager, FullyCachedPromptLeavesLastTokenToCompute) {
  Fixture f(64);
  ASSERT_EQ(f.admit(1, seq(0, 8)), 0);
  f.finish(1);
  EXPECT_EQ(f.admit(2, seq(0, 8)), 4);  // block 2 is cached but holds the last token
  f.manager->check_invariants();
}

TEST(RequestManager, AppendAllocatesWhenBlockFillsAndPublishesIt) {
  Fixture f(64);
  ASSERT_EQ(f.admit(1, seq(0, 3)), 0);
  EXPECT_EQ(f.cache->size(), 0u);
  std::vector<std::uint32_t> counts;
  std::vector<BlockId> fresh;
  ASSERT_TRUE(f.append({1}, {{3}}, &counts, &fresh).ok());
  EXPECT_EQ(counts[0], 0u);
  EXPECT_EQ(f.cache->size(), 1u);  // block 0 became full
  ASSERT_TRUE(f.append({1}, {{4}}, &counts, &fresh).ok());
  EXPECT_EQ(counts[0], 1u);
  ASSERT_EQ(fresh.size(), 1u);
  EXPECT_EQ(f.manager->block_table(1).back(), fresh[0]);
  ASSERT_TRUE(f.append({1}, {seq(5, 7)}, &counts).ok());  // 12 tokens: blocks 1 and 2 full
  EXPECT_EQ(f.cache->size(), 3u);
  f.manager->check_invariants();
  // The digests published by append equal those of hashing the whole sequence.
  const auto expect = BlockHasher().hash_blocks(seq(0, 12), kBs);
  for (const auto& d : expect) EXPECT_TRUE(f.cache->contains(d));
}

TEST(RequestManager, AppendBatchIsAllOrNothing) {
  Fixture f(4);
  ASSERT_EQ(f.admit(1, seq(0, 4)), 0);
  ASSERT_EQ(f.admit(2, seq(100, 4)), 0);
  // Each needs 2 more blocks: 4 > 2 available.
  const auto before1 = f.manager->block_table(1);
  const BatchStatus st = f.append({1, 2}, {seq(4, 5), seq(104, 5)});
  EXPECT_EQ(st.code, ErrorCode::kPoolFull);
  EXPECT_EQ(st.index, 1);
  EXPECT_EQ(f.manager->block_table(1), before1);
  EXPECT_EQ(f.manager->num_tokens(1), 4u);
  EXPECT_EQ(f.alloc.num_allocated(), 2u);
  f.manager->check_invariants();
  EXPECT_TRUE(f.append({1, 2}, {{4}, {104}}).ok());
  EXPECT_EQ(f.alloc.num_allocated(), 4u);
}

TEST(RequestManager, AdmitBatchIsAllOrNothing) {
  Fixture f(5);
  const auto a = seq(0, 8), b = seq(100, 8), c = seq(200, 8);
  const AdmitRequest reqs[3] = {{1, a, {}}, {2, b, {}}, {3, c, {}}};
  std::uint32_t cached[3];
  const BatchStatus st = f.manager->admit(reqs, cached);
  EXPECT_EQ(st.code, ErrorCode::kPoolFull);
  EXPECT_EQ(st.index, 2);
  EXPECT_EQ(f.manager->stats().running, 0u);
  EXPECT_EQ(f.alloc.num_allocated(), 0u);
  EXPECT_EQ(f.cache->size(), 0u);
  EXPECT_TRUE(f.manager->admit(std::span<const AdmitRequest>(reqs, 2), cached).ok());
  f.manager->check_invariants();
}

TEST(RequestManager, EvictsUnusedCachedBlocksToMakeRoom) {
  Fixture f(4);
  ASSERT_EQ(f.admit(1, seq(0, 16)), 0);
  f.finish(1);
  EXPECT_EQ(f.alloc.num_available(), 0u);  // all four cached
  ASSERT_EQ(f.admit(2, seq(500, 8)), 0);
  EXPECT_EQ(f.manager->stats().evicted_for_room, 2u);
  // Blocks in use are never evicted: a third request cannot take request 2's blocks.
  ASSERT_EQ(f.admit(3, seq(900, 12)), -1);
  f.manager->check_invariants();
  f.cache->check_invariants();
}

// Evicting cannot make room for these: the refusals leave the unused cached blocks cached (they used
// to be evicted on the way to the refusal, so a scheduler retrying an admit that cannot fit emptied
// the cache each time).
TEST(RequestManager, ARefusalThatEvictingCannotAvertEvictsNothing) {
  Fixture f(12);
  ASSERT_EQ(f.admit(1, seq(0, 16)), 0);  // 4 blocks, cached unused once finished
  f.finish(1);
  ASSERT_EQ(f.admit(2, seq(500, 24)), 0);  // 6 blocks, held: 2 free, 4 evictable
  const std::vector<BlockHash> kept = [] {
    std::vector<BlockHash> d(4);
    (void)hash_blocks(HashAlgorithm::kSha256, seq(0, 16), kBs, kRootBlockHash, {}, d);
    return d;
  }();
  const auto all_kept = [&] {
    for (const BlockHash& d : kept) {
      if (!f.cache->contains(d)) return false;
    }
    return true;
  };
  ASSERT_EQ(f.admit(3, seq(900, 28)), -1);  // 7 blocks > 2 + 4
  EXPECT_TRUE(all_kept());
  // A batch: 3 blocks would fit (evicting 1), 3 + 4 do not; refused at the second, nothing evicted.
  const auto b1 = seq(1000, 12), b2 = seq(2000, 16);
  const AdmitRequest batch[2] = {{4, b1, {}}, {5, b2, {}}};
  std::uint32_t cached[2];
  const BatchStatus st = f.manager->admit(batch, cached);
  EXPECT_EQ(st.code, ErrorCode::kPoolFull);
  EXPECT_EQ(st.index, 1);
  EXPECT_TRUE(all_kept());
  // An append of 7 blocks' worth of tokens to request 2 (its last block is full: all 7 are new).
  EXPECT_EQ(f.append({2}, {seq(3000, 28)}).code, ErrorCode::kPoolFull);
  EXPECT_TRUE(all_kept());
  EXPECT_EQ(f.manager->stats().evicted_for_room, 0u);
  EXPECT_EQ(f.alloc.num_available(), 2u);
  f.manager->check_invariants();
  f.cache->check_invariants();
  // What evicting can make room for still evicts: 6 blocks = 2 free + 4 evicted.
  ASSERT_EQ(f.admit(6, seq(4000, 24)), 0);
  EXPECT_EQ(f.manager->stats().evicted_for_room, 4u);
  EXPECT_EQ(f.cache->stats().cached_blocks, 12u);
}

// The same under a limit lowered below the blocks in use: the allocator is short by the excess
// (its num_available() reads 0), so evicting must first make up for that. The manager counted the
// shortfall as 0 and emptied the cache on the way to a refusal evicting could never avert.
TEST(RequestManager, UnderALimitBelowWhatIsInUseARefusalEvictsNothing) {
  Fixture f(12);
  ASSERT_EQ(f.admit(1, seq(0, 16)), 0);  // 4 blocks, cached unused once finished
  f.finish(1);
  ASSERT_EQ(f.admit(2, seq(500, 24)), 0);  // 6 blocks, held: 10 in use
  f.alloc.set_limit(6);                    // 4 over the limit: evicting all 4 makes room for none
  EXPECT_EQ(f.alloc.num_available(), 0u);
  EXPECT_EQ(f.admit(3, seq(900, 4)), -1);  // 1 block
  EXPECT_EQ(f.append({2}, {seq(3000, 4)}).code, ErrorCode::kPoolFull);
  EXPECT_EQ(f.cache->stats().cached_blocks, 10u);
  EXPECT_EQ(f.manager->stats().evicted_for_room, 0u);
  f.manager->check_invariants();
  f.cache->check_invariants();
  // 1 over a limit of 9: evicting the 4 makes room for 3 blocks, and does.
  f.alloc.set_limit(9);
  ASSERT_EQ(f.admit(4, seq(900, 12)), 0);
  EXPECT_EQ(f.manager->stats().evicted_for_room, 4u);
  EXPECT_EQ(f.alloc.num_available(), 0u);
  f.manager->check_invariants();
  f.cache->check_invariants();
}

TEST(RequestManager, BoundedCachePublishesWhatFitsAndRetriesLater) {
  Fixture f(64, /*capacity=*/2);
  ASSERT_EQ(f.admit(1, seq(0, 12)), 0);
  EXPECT_EQ(f.cache->size(), 2u);
  f.manager->check_invariants();
  f.finish(1);
  EXPECT_EQ(f.alloc.num_allocated(), 2u);
  ASSERT_EQ(f.admit(2, seq(0, 13)), 8);
  f.manager->check_invariants();
}

TEST(RequestManager, PreemptReleasesAndReadmitMatchesBack) {
  Fixture f(64);
  ASSERT_EQ(f.admit(1, seq(0, 6)), 0);
  ASSERT_TRUE(f.append({1}, {seq(6, 4)}).ok());
  const RequestId id = 1;
  EXPECT_EQ(f.manager->preempt(std::span<const RequestId>(&id, 1)), 10u);
  EXPECT_FALSE(f.manager->contains(1));
  EXPECT_EQ(f.admit(1, seq(0, 10)), 8);
  EXPECT_EQ(f.manager->stats().preempted, 1u);
}

TEST(RequestManager, NoCacheStillManagesTables) {
  Fixture f(8, {}, /*caching=*/false);
  ASSERT_EQ(f.admit(1, seq(0, 5)), 0);
  ASSERT_TRUE(f.append({1}, {seq(5, 4)}).ok());
  EXPECT_EQ(f.manager->block_table(1).size(), 3u);
  f.manager->check_invariants();
  f.finish(1);
  EXPECT_EQ(f.alloc.num_allocated(), 0u);
}

TEST(RequestManager, SaltSeparatesTenants) {
  Fixture f(64);
  const auto t = seq(0, 9);
  const AdmitRequest a{1, t, {"tenant-a", ""}};
  const AdmitRequest b{2, t, {"tenant-b", ""}};
  std::uint32_t cached = 0;
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&a, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&b, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  EXPECT_EQ(cached, 0u);
  // A request admitted with fewer tokens than a block gets its salt applied when the block fills.
  const auto short_tokens = seq(0, 3);
  const AdmitRequest c{3, short_tokens, {"tenant-a", ""}};
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&c, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  ASSERT_TRUE(f.append({3}, {{3}}).ok());
  const auto digest = BlockHasher().hash_blocks(seq(0, 4), kBs, kRootBlockHash, {"tenant-a", ""});
  EXPECT_EQ(f.cache->lookup(digest[0])->users, 2u);  // request 1's node, now held by request 3 too
  f.manager->check_invariants();
}

TEST(RequestManager, AFinishedRequestsRecordLeavesNothingToTheNext) {
  // Finished requests' records are reused by later admits: none of their state may carry over.
  Fixture f(64);
  std::uint32_t cached = 0;
  const auto t = seq(0, 9);
  const AdmitRequest salted{1, t, {"tenant-a", "extra"}};
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&salted, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  f.finish(1);
  // Request 2 starts short of a block: its first block is hashed at the append, with its own (empty)
  // salt and extra key, not request 1's.
  ASSERT_EQ(f.admit(2, seq(0, 3)), 0);
  ASSERT_TRUE(f.append({2}, {{3, 4}}).ok());
  EXPECT_EQ(f.manager->num_tokens(2), 5u);
  EXPECT_EQ(f.manager->block_table(2).size(), 2u);
  const auto plain = BlockHasher().hash_blocks(seq(0, 4), kBs, kRootBlockHash, {});
  ASSERT_TRUE(f.cache->lookup(plain[0]).has_value());
  EXPECT_EQ(f.cache->lookup(plain[0])->users, 1u);  // published by request 2, held by it
  f.manager->check_invariants();
  f.finish(2);
  EXPECT_EQ(f.admit(3, seq(0, 5)), 4);
  EXPECT_EQ(f.manager->stats().owned_blocks, 1u);
  f.manager->check_invariants();
}

TEST(RequestManager, AdmitUsesTheCallersDigestsWhenThereIsOnePerFullBlock) {
  Fixture f(64);
  const auto t = seq(0, 10);  // two full blocks and a partial one
  const BlockHashKey key{"tenant-a", ""};
  const auto digests = BlockHasher().hash_blocks(seq(0, 8), kBs, kRootBlockHash, key);
  AdmitRequest a{1, t, key};
  a.digests = digests;
  std::uint32_t cached = 0;
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&a, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  f.finish(1);
  // A request that lets the manager hash finds both blocks, so the given digests were the chain's.
  const AdmitRequest b{2, t, key};
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&b, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  EXPECT_EQ(cached, 2 * kBs);
  // Digests of the wrong count are ignored: the manager hashes the tokens itself.
  AdmitRequest c{3, t, key};
  c.digests = std::span<const BlockHash>(digests).first(1);
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&c, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  EXPECT_EQ(cached, 2 * kBs);
  f.manager->check_invariants();
}

TEST(RequestManager, BadInputChangesNothing) {
  Fixture f(16);
  ASSERT_EQ(f.admit(1, seq(0, 5)), 0);
  const auto before = f.manager->stats();
  EXPECT_EQ(code_of([&] { (void)f.admit(1, seq(0, 5)); }), ErrorCode::kInvalidArgument);  // running
  EXPECT_EQ(code_of([&] { (void)f.admit(2, {}); }), ErrorCode::kInvalidArgument);        // empty
  const auto t = seq(0, 5);
  const AdmitRequest twice[2] = {{3, t, {}}, {3, t, {}}};
  std::uint32_t cached[2];
  EXPECT_EQ(code_of([&] { (void)f.manager->admit(twice, cached); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { (void)f.append({7}, {{1}}); }), ErrorCode::kInvalidArgument);       // unknown
  EXPECT_EQ(code_of([&] { (void)f.append({1, 1}, {{1}, {2}}); }), ErrorCode::kInvalidArgument);  // repeated
  EXPECT_EQ(code_of([&] { (void)f.append({1}, {{}}); }), ErrorCode::kInvalidArgument);      // empty run
  EXPECT_EQ(code_of([&] { f.finish(9); }), ErrorCode::kInvalidArgument);
  const RequestId rep[2] = {1, 1};
  EXPECT_EQ(code_of([&] { f.manager->finish(rep); }), ErrorCode::kInvalidArgument);
  std::vector<BlockId> out(2);
  const RequestId one = 1;
  EXPECT_EQ(code_of([&] { (void)f.manager->block_tables(std::span<const RequestId>(&one, 1), out, 1); }),
            ErrorCode::kInvalidArgument);  // 2 blocks do not fit a row of 1
  const auto after = f.manager->stats();
  EXPECT_EQ(after.running, before.running);
  EXPECT_EQ(after.owned_blocks, before.owned_blocks);
  EXPECT_EQ(f.manager->num_tokens(1), 5u);
  f.manager->check_invariants();
}

TEST(RequestManager, BlockTablesPadsRows) {
  Fixture f(16);
  ASSERT_EQ(f.admit(1, seq(0, 5)), 0);
  ASSERT_EQ(f.admit(2, seq(50, 1)), 0);
  const RequestId ids[2] = {2, 1};
  std::vector<BlockId> out(8, 7);
  EXPECT_EQ(f.manager->block_tables(ids, out, 4), 2u);
  EXPECT_EQ(out[0], f.manager->block_table(2)[0]);
  EXPECT_EQ(out[1], -1);
  EXPECT_EQ(out[4], f.manager->block_table(1)[0]);
  EXPECT_EQ(out[5], f.manager->block_table(1)[1]);
  EXPECT_EQ(out[6], -1);
}

TEST(RequestManager, RejectsMismatchedCache) {
  BlockAllocator a(8), other(8);
  PrefixCacheOptions o;
  o.block_size = 8;
  PrefixCache c(o, &a);
  RequestManagerOptions mo;
  mo.block_size = 4;
  EXPECT_EQ(code_of([&] { RequestManager m(a, &c, mo); }), ErrorCode::kInvalidArgument);
  mo.block_size = 8;
  EXPECT_EQ(code_of([&] { RequestManager m(other, &c, mo); }), ErrorCode::kInvalidArgument);
  mo.block_size = 0;
  EXPECT_EQ(code_of([&] { RequestManager m(a, nullptr, mo); }), ErrorCode::kInvalidArgument);
}

TEST(RequestManager, DestructorReleasesRunningRequests) {
  BlockAllocator a(16);
  PrefixCacheOptions o;
  o.block_size = kBs;
  {
    PrefixCache c(o, &a);
    {
      RequestManagerOptions mo;
      mo.block_size = kBs;
      RequestManager m(a, &c, mo);
      const auto t = seq(0, 9);
      const AdmitRequest r{1, t, {}};
      std::uint32_t cached = 0;
      ASSERT_TRUE(m.admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1)).ok());
    }
    EXPECT_EQ(c.stats().in_use_blocks, 0u);
    EXPECT_EQ(a.num_allocated(), 2u);  // cached only
  }
  EXPECT_EQ(a.num_allocated(), 0u);
}

TEST(RequestManager, OpaqueReservationCountsTokensOnly) {
  Fixture f(8);
  AdmitRequest r{5, {}, {}, 20};
  std::uint32_t cached = 7;
  std::vector<BlockId> table;
  ASSERT_TRUE(f.manager->admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1), &table).ok());
  EXPECT_EQ(cached, 0u);
  EXPECT_EQ(table.size(), 5u);
  ASSERT_TRUE(f.append({5}, {seq(0, 4)}).ok());
  EXPECT_EQ(f.manager->num_tokens(5), 24u);
  EXPECT_EQ(f.cache->size(), 0u);  // nothing hashed or published
  f.manager->check_invariants();
  AdmitRequest huge{6, {}, {}, 1000};
  const BatchStatus st = f.manager->admit(std::span<const AdmitRequest>(&huge, 1), std::span<std::uint32_t>(&cached, 1));
  EXPECT_EQ(st.code, ErrorCode::kPoolFull);
  AdmitRequest none{7, {}, {}, 0};
  EXPECT_EQ(code_of([&] { (void)f.manager->admit(std::span<const AdmitRequest>(&none, 1), std::span<std::uint32_t>(&cached, 1)); }),
            ErrorCode::kInvalidArgument);
  f.finish(5);
  EXPECT_EQ(f.alloc.num_allocated(), 0u);
}

TEST(RequestManager, APublishThatThrowsAnythingLeavesTheBlocksPrivate) {
  // publish runs in noexcept code: an exception other than Error or bad_alloc out of the cache's
  // insert (here its clock) used to terminate the process.
  BlockAllocator alloc(16);
  PrefixCacheOptions o;
  o.block_size = kBs;
  bool clock_works = false;
  o.clock_ns = [&clock_works]() -> std::int64_t {
    if (!clock_works) throw std::runtime_error("clock unavailable");
    return 0;
  };
  PrefixCache cache(o, &alloc);
  RequestManagerOptions mo;
  mo.block_size = kBs;
  RequestManager manager(alloc, &cache, mo);
  const auto tokens = seq(0, 9);
  const AdmitRequest r{1, tokens, {}};
  std::uint32_t cached = 0;
  ASSERT_TRUE(manager.admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1)).ok());
  EXPECT_EQ(cache.size(), 0u);  // not published
  EXPECT_EQ(manager.stats().published_blocks, 0u);
  manager.check_invariants();
  clock_works = true;  // the next publish retries them
  const std::vector<RequestId> ids{1};
  const std::vector<std::int32_t> more = seq(100, 3);
  const std::vector<std::size_t> offsets{0, 3};
  std::vector<std::uint32_t> new_blocks(1);
  ASSERT_TRUE(manager.append(ids, more, offsets, new_blocks).ok());
  EXPECT_EQ(cache.size(), 3u);
  manager.finish(ids);
  EXPECT_EQ(alloc.num_allocated(), 3u);
  cache.check_invariants();
}

}  // namespace
}  // namespace sagellm::kv
