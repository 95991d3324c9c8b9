#include "sagellm_kv/prefix_cache.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/error.hpp"
#include "test_support.hpp"
#include "sagellm_kv/hashing.hpp"

namespace sagellm::kv {
namespace {

// A well-spread digest per integer; the cache never looks inside digests, so chains are just lists.
BlockHash D(std::int32_t v) {
  static BlockHasher hasher;
  const std::int32_t t[1] = {v};
  return hasher.hash_blocks(std::span<const std::int32_t>(t), 1)[0];
}

std::vector<BlockHash> chain(std::int32_t base, std::int32_t n) {
  std::vector<BlockHash> v;
  for (std::int32_t i = 0; i < n; ++i) v.push_back(D(base + i));
  return v;
}

std::vector<BlockId> ids(std::initializer_list<BlockId> l) { return l; }

PrefixCacheOptions opts(EvictionPolicy policy = EvictionPolicy::kLru, std::optional<std::uint32_t> capacity = {}) {
  PrefixCacheOptions o;
  o.block_size = 4;
  o.policy = policy;
  o.capacity_blocks = capacity;
  return o;
}

using testing::code_of;

InsertResult insert(PrefixCache& c, const std::vector<BlockHash>& d, const std::vector<BlockId>& b,
                    InsertOptions o = {}) {
  return c.insert(d, b, o);
}

// Matches and immediately releases: a "use" of the prefix.
void use(PrefixCache& c, const std::vector<BlockHash>& d) {
  const MatchResult r = c.match(d);
  c.release(std::span<const BlockHash>(d).first(r.num_matched));
}

std::vector<BlockHash> drain_removed(PrefixCache& c) {
  std::vector<BlockHash> out;
  for (auto& e : c.drain_events()) {
    if (e.type == PrefixCacheEvent::Type::kRemoved) out.insert(out.end(), e.digests.begin(), e.digests.end());
  }
  return out;
}

TEST(PrefixCache, PolicyNamesAndOptionValidation) {
  EXPECT_EQ(parse_eviction_policy("priority"), EvictionPolicy::kPriority);
  EXPECT_EQ(eviction_policy_name(EvictionPolicy::kTtl), "ttl");
  try {
    (void)parse_eviction_policy("LRU2");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("LRU2"), std::string::npos);
  }
  auto o = opts();
  o.block_size = 0;
  EXPECT_EQ(code_of([&] { PrefixCache c(o); }), ErrorCode::kInvalidArgument);
  o = opts(EvictionPolicy::kLru, 0u);
  EXPECT_EQ(code_of([&] { PrefixCache c(o); }), ErrorCode::kInvalidArgument);
  o = opts(EvictionPolicy::kTtl);
  o.ttl_seconds = 0;
  EXPECT_EQ(code_of([&] { PrefixCache c(o); }), ErrorCode::kInvalidArgument);
  o.ttl_seconds = std::numeric_limits<double>::infinity();
  EXPECT_EQ(code_of([&] { PrefixCache c(o); }), ErrorCode::kInvalidArgument);
  o = opts();
  o.ttl_seconds = std::nan("");
  EXPECT_EQ(code_of([&] { PrefixCache c(o); }), ErrorCode::kInvalidArgument);
  o.ttl_seconds = 0;  // ignored outside the ttl policy
  EXPECT_EQ(code_of([&] { PrefixCache c(o); }), ErrorCode::kOk);
}

TEST(PrefixCache, MissInsertHitRelease) {
  PrefixCache c(opts());
  const auto a = chain(100, 4);
  MatchResult r = c.match(a);
  EXPECT_EQ(r.num_matched, 0u);
  EXPECT_TRUE(r.block_ids.empty());

  const InsertResult ins = insert(c, a, ids({10, 11, 12, 13}));
  EXPECT_EQ(ins.num_redundant, 0u);
  EXPECT_EQ(ins.num_inserted, 4u);
  EXPECT_EQ(ins.num_cached(), 4u);
  EXPECT_EQ(c.size(), 4u);

  r = c.match(a);
  EXPECT_EQ(r.num_matched, 4u);
  EXPECT_EQ(r.block_ids, ids({10, 11, 12, 13}));
  for (const auto& d : a) EXPECT_EQ(c.lookup(d)->users, 1u);
  EXPECT_EQ(c.stats().in_use_blocks, 4u);
  EXPECT_EQ(c.stats().evictable_blocks, 0u);
  c.release(a);
  for (const auto& d : a) EXPECT_EQ(c.lookup(d)->users, 0u);
  EXPECT_EQ(c.stats().evictable_blocks, 1u);  // the leaf only
  c.check_invariants();
}

TEST(PrefixCache, LongestPrefixStopsAtFirstMissOrForeignParent) {
  PrefixCache c(opts());
  const auto a = chain(100, 4);
  (void)insert(c, a, ids({0, 1, 2, 3}));
  auto q = a;
  q[2] = D(999);
  MatchResult r = c.match(q);
  EXPECT_EQ(r.num_matched, 2u);
  EXPECT_EQ(r.block_ids, ids({0, 1}));
  c.release(std::span<const BlockHash>(q).first(2));

  // a[1] is cached, but as a child of a[0], not of the root: no match.
  const std::vector<BlockHash> skip{a[1], a[2]};
  EXPECT_EQ(c.match(skip).num_matched, 0u);
  EXPECT_EQ(c.peek(skip), 0u);
  c.check_invariants();
}

TEST(PrefixCache, PeekNeitherAcquiresNorCounts) {
  PrefixCache c(opts());
  const auto a = chain(100, 3);
  (void)insert(c, a, ids({5, 6, 7}));
  const auto before = c.stats();
  std::vector<BlockId> out(3, -1);
  EXPECT_EQ(c.peek(a, out), 3u);
  EXPECT_EQ(out, ids({5, 6, 7}));
  EXPECT_EQ(c.peek(a), 3u);
  const auto after = c.stats();
  EXPECT_EQ(after.lookups, before.lookups);
  EXPECT_EQ(after.in_use_blocks, 0u);
  std::vector<BlockId> small(2);
  EXPECT_EQ(code_of([&] { (void)c.peek(a, small); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { (void)c.match(a, small); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(c.stats().lookups, before.lookups);
}

TEST(PrefixCache, ProbeCountsAndRenewsWithoutHolding) {
  PrefixCache c(opts());
  const auto a = chain(100, 3);
  const auto b = chain(200, 3);
  (void)insert(c, a, ids({1, 2, 3}));
  (void)insert(c, b, ids({4, 5, 6}));
  const auto before = c.stats();
  std::vector<BlockId> out(3, -1);
  EXPECT_EQ(c.probe(a, out), 3u);  // a is now the most recently used chain
  EXPECT_EQ(out, ids({1, 2, 3}));
  const auto after = c.stats();
  EXPECT_EQ(after.lookups, before.lookups + 1);
  EXPECT_EQ(after.hit_blocks, before.hit_blocks + 3);
  EXPECT_EQ(after.in_use_blocks, 0u);  // nothing held: all of it stays evictable
  EXPECT_EQ(c.evict(3), 3u);
  EXPECT_EQ(c.peek(b), 0u);  // the older chain went first
  EXPECT_EQ(c.peek(a), 3u);
  std::vector<BlockId> small(2);
  EXPECT_EQ(code_of([&] { (void)c.probe(a, small); }), ErrorCode::kInvalidArgument);
}

TEST(PrefixCache, TrustedChainInsertEqualsCheckedInsert) {
  PrefixCache checked(opts(EvictionPolicy::kLru, 5));
  PrefixCache trusted(opts(EvictionPolicy::kLru, 5));
  const auto a = chain(100, 4);
  InsertOptions t;
  t.trusted_chain = true;
  for (PrefixCache* c : {&checked, &trusted}) {
    const InsertOptions o = c == &trusted ? t : InsertOptions{};
    EXPECT_EQ(c->insert(std::span<const BlockHash>(a).first(2), ids({1, 2}), o).num_inserted, 2u);
    InsertOptions cont = o;
    cont.parent = a[1];
    const auto rest = std::span<const BlockHash>(a).subspan(2);
    EXPECT_EQ(c->insert(rest, ids({3, 4}), cont).num_inserted, 2u);
    const auto b = chain(300, 3);  // over capacity: the LRU leaves make room
    EXPECT_EQ(c->insert(b, ids({7, 8, 9}), o).num_cached(), 3u);
  }
  EXPECT_EQ(checked.peek(a), trusted.peek(a));
  EXPECT_EQ(checked.stats().cached_blocks, trusted.stats().cached_blocks);
  EXPECT_EQ(checked.stats().evictions, trusted.stats().evictions);
}

TEST(PrefixCache, InsertRefusesRepeatedDigestsOrBlocksAndChangesNothing) {
  BlockAllocator alloc(16);
  std::vector<BlockId> blocks(4);
  ASSERT_TRUE(alloc.allocate(blocks).ok());
  PrefixCache c(opts(), &alloc);
  const auto refused = [&](const std::vector<BlockHash>& d, const std::vector<BlockId>& b) {
    try {
      (void)c.insert(d, b);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  auto d = chain(100, 4);
  d[3] = d[1];  // a digest twice
  EXPECT_NE(refused(d, blocks).find("appears at positions 1 and 3"), std::string::npos);
  const std::vector<BlockId> repeated = {blocks[0], blocks[2], blocks[1], blocks[2]};
  EXPECT_NE(refused(chain(200, 4), repeated).find("appears at positions 1 and 3"), std::string::npos);
  EXPECT_EQ(c.stats().cached_blocks, 0u);
  for (BlockId b : blocks) EXPECT_EQ(alloc.ref_count(b), 1u);  // no reference taken
  EXPECT_EQ(c.insert(chain(200, 4), blocks).num_inserted, 4u);
}

// Repeats are looked for by a linear hash pass first; keys piled on one slot (digests that share
// their first 8 bytes) exhaust its probes, and the sort decides as it does for any repeat it finds.
TEST(PrefixCache, InsertFindsRepeatsAmongPiledDigestsAndLongBatches) {
  const auto piled = [](std::int32_t n) {
    std::vector<BlockHash> v = chain(1000, n);
    for (BlockHash& h : v) std::fill(h.bytes.begin(), h.bytes.begin() + 8, std::uint8_t{0x5a});
    return v;
  };
  std::vector<BlockId> many(300);
  for (std::size_t i = 0; i < many.size(); ++i) many[i] = static_cast<BlockId>(7 * i);
  const auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  {
    PrefixCache c(opts());
    auto d = piled(300);
    d[250] = d[5];
    EXPECT_NE(message([&] { (void)c.insert(d, many); }).find("appears at positions 5 and 250"), std::string::npos);
    auto ids_twice = many;
    ids_twice[290] = ids_twice[7];
    EXPECT_NE(message([&] { (void)c.insert(chain(5000, 300), ids_twice); })
                  .find("block id 49 appears at positions 7 and 290"),
              std::string::npos);
    EXPECT_EQ(c.stats().cached_blocks, 0u);
    EXPECT_EQ(c.insert(piled(300), many).num_inserted, 300u);  // distinct past their first 8 bytes
    EXPECT_EQ(c.peek(piled(300)), 300u);
  }
  PrefixCache big(opts());  // past the linear pass's batch limit: the sort alone
  const std::int32_t n = (1 << 16) + 2;
  auto d = chain(100000, n);
  std::vector<BlockId> b(static_cast<std::size_t>(n));
  for (std::int32_t i = 0; i < n; ++i) b[static_cast<std::size_t>(i)] = i;
  d[static_cast<std::size_t>(n - 1)] = d[3];
  EXPECT_NE(message([&] { (void)big.insert(d, b); }).find("appears at positions 3 and " + std::to_string(n - 1)),
            std::string::npos);
  d[static_cast<std::size_t>(n - 1)] = D(-1);
  EXPECT_EQ(big.insert(d, b).num_inserted, static_cast<std::uint32_t>(n));
}

TEST(PrefixCache, ReleaseIsAllOrNothing) {
  PrefixCache c(opts());
  const auto a = chain(100, 3);
  (void)insert(c, a, ids({0, 1, 2}));
  EXPECT_EQ(c.match(std::span<const BlockHash>(a).first(2)).num_matched, 2u);

  // a[2] is cached but not held; D(5) is not cached at all.
  try {
    c.release(a);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kRefCountUnderflow);
    EXPECT_NE(std::string(e.what()).find("position 2"), std::string::npos) << e.what();
  }
  EXPECT_EQ(c.lookup(a[0])->users, 1u);
  EXPECT_EQ(c.lookup(a[1])->users, 1u);
  const std::vector<BlockHash> foreign{a[0], D(5)};
  EXPECT_EQ(code_of([&] { c.release(foreign); }), ErrorCode::kRefCountUnderflow);
  EXPECT_EQ(c.lookup(a[0])->users, 1u);
  // Releasing twice what was taken once is refused as a whole.
  const std::vector<BlockHash> twice{a[0], a[0]};
  EXPECT_EQ(code_of([&] { c.release(twice); }), ErrorCode::kRefCountUnderflow);
  EXPECT_EQ(c.lookup(a[0])->users, 1u);
  c.check_invariants();

  // Taken twice, released twice in one call.
  EXPECT_EQ(c.match(std::span<const BlockHash>(a).first(1)).num_matched, 1u);
  c.release(twice);
  EXPECT_EQ(c.lookup(a[0])->users, 0u);
  c.release(std::span<const BlockHash>(a).subspan(1, 1));
  EXPECT_EQ(c.stats().in_use_blocks, 0u);
  c.check_invariants();
}

TEST(PrefixCache, ReleaseOfAnyRunOfTheChain) {
  PrefixCache c(opts());
  const auto a = chain(100, 4);
  (void)insert(c, a, ids({0, 1, 2, 3}));
  ASSERT_EQ(c.match(a).num_matched, 4u);
  ASSERT_EQ(c.match(a).num_matched, 4u);
  // A middle run, then the rest in another order than the chain's: both are accepted.
  c.release(std::span<const BlockHash>(a).subspan(1, 2));
  c.release(std::vector<BlockHash>{a[3], a[0]});
  for (const auto& d : a) EXPECT_EQ(c.lookup(d)->users, 1u);
  c.release(a);
  EXPECT_EQ(c.stats().in_use_blocks, 0u);
  EXPECT_EQ(c.stats().evictable_blocks, 1u);
  c.release(std::span<const BlockHash>{});  // nothing to do
  c.check_invariants();
}

TEST(PrefixCache, ExplicitRootParentMeansTheRoot) {
  PrefixCache c(opts());
  InsertOptions o;
  o.parent = kRootBlockHash;
  EXPECT_EQ(insert(c, chain(100, 2), ids({0, 1}), o).num_inserted, 2u);
  EXPECT_FALSE(c.lookup(D(100))->parent.has_value());
  EXPECT_EQ(c.peek(chain(100, 2)), 2u);
}

TEST(PrefixCache, InsertReusesCachedPrefixAndReportsRedundantPositions) {
  PrefixCache c(opts());
  const auto a = chain(100, 4);
  (void)insert(c, {a[0], a[1]}, ids({0, 1}));
  const InsertResult r = insert(c, a, ids({20, 21, 2, 3}));
  EXPECT_EQ(r.num_redundant, 2u);  // positions 0 and 1: the caller's 20 and 21 are duplicates
  EXPECT_EQ(r.num_inserted, 2u);
  EXPECT_EQ(c.size(), 4u);
  EXPECT_EQ(c.lookup(a[0])->block_id, 0);
  EXPECT_EQ(c.lookup(a[2])->block_id, 2);
  EXPECT_EQ(c.lookup(a[2])->parent, a[1]);
  EXPECT_EQ(c.lookup(a[1])->num_children, 1u);

  // Everything cached already: all redundant, nothing changes.
  const InsertResult again = insert(c, a, ids({30, 31, 32, 33}));
  EXPECT_EQ(again.num_redundant, 4u);
  EXPECT_EQ(again.num_inserted, 0u);
  EXPECT_EQ(c.stats().inserts, 4u);
  c.check_invariants();
}

TEST(PrefixCache, InsertUnderCachedParent) {
  PrefixCache c(opts());
  const auto a = chain(100, 4);
  (void)insert(c, {a[0], a[1]}, ids({0, 1}));
  InsertOptions o;
  o.parent = a[1];
  const InsertResult r = insert(c, {a[2], a[3]}, ids({2, 3}), o);
  EXPECT_EQ(r.num_inserted, 2u);
  EXPECT_EQ(c.match(a).num_matched, 4u);
  c.release(a);

  // A second branch under a[0].
  o.parent = a[0];
  (void)insert(c, {D(7)}, ids({7}), o);
  EXPECT_EQ(c.lookup(a[0])->num_children, 2u);
  c.check_invariants();
}

TEST(PrefixCache, ReserveInsertShowsNothingAndRefusesIdsOutsideThePool) {
  BlockAllocator alloc(16);
  PrefixCache c(opts(), &alloc);
  std::vector<BlockId> blocks(4);
  ASSERT_TRUE(alloc.allocate(blocks).ok());
  const std::size_t before = c.metadata_bytes();
  c.reserve_insert(blocks);
  EXPECT_GE(c.metadata_bytes(), before);  // room, nothing else
  EXPECT_EQ(c.size(), 0u);
  EXPECT_EQ(c.stats().inserts, 0u);
  for (BlockId b : blocks) EXPECT_EQ(alloc.ref_count(b), 1u);
  c.check_invariants();
  const std::vector<BlockId> high{blocks[0], 16};
  const std::vector<BlockId> negative{-1, blocks[1]};
  for (const auto& bad : {high, negative}) {
    try {
      c.reserve_insert(bad);
      ADD_FAILURE() << "expected a refusal";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidBlock);
      EXPECT_NE(std::string(e.what()).find(std::to_string(bad[0] == -1 ? -1 : 16)), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(insert(c, chain(0, 4), blocks).num_inserted, 4u);
  c.check_invariants();
  PrefixCache metadata_only(opts());  // opaque ids: any value
  metadata_only.reserve_insert(std::vector<BlockId>{-5, 1 << 30});
  EXPECT_EQ(insert(metadata_only, chain(0, 2), {-5, 1 << 30}).num_inserted, 2u);
}

TEST(PrefixCache, BadInsertChangesNothing) {
  BlockAllocator alloc(32);
  std::vector<BlockId> blocks(8);
  ASSERT_TRUE(alloc.allocate(blocks).ok());  // 0..7
  PrefixCacheOptions o = opts();
  o.event_queue_capacity = 16;
  PrefixCache c(o, &alloc);
  const auto a = chain(100, 4);
  (void)insert(c, {a[0], a[1]}, ids({0, 1}));
  (void)c.drain_events();
  const auto snapshot = [&] {
    std::vector<std::uint32_t> refs;
    for (BlockId b = 0; b < 32; ++b) refs.push_back(alloc.ref_count(b));
    return refs;
  };
  const auto refs = snapshot();
  const auto stats = c.stats();

  const auto expect_refused = [&](ErrorCode code, const std::function<void()>& f, const char* what) {
    EXPECT_EQ(code_of(f), code) << what;
    EXPECT_EQ(c.size(), 2u) << what;
    EXPECT_EQ(snapshot(), refs) << what;
    EXPECT_EQ(c.stats().inserts, stats.inserts) << what;
    EXPECT_TRUE(c.drain_events().empty()) << what;
    c.check_invariants();
  };
  expect_refused(ErrorCode::kInvalidArgument, [&] { (void)insert(c, a, ids({0, 1, 2})); }, "length");
  expect_refused(ErrorCode::kInvalidArgument, [&] {
    InsertOptions io;
    const std::vector<std::int32_t> toks(5, 1);
    io.token_ids = toks;
    (void)insert(c, a, ids({0, 1, 2, 3}), io);
  }, "token ids length");
  expect_refused(ErrorCode::kInvalidArgument, [&] { (void)insert(c, {a[0], a[1], a[2], a[2]}, ids({0, 1, 2, 3})); },
                 "repeated digest");
  expect_refused(ErrorCode::kInvalidArgument, [&] { (void)insert(c, {a[0], a[2], a[1]}, ids({0, 2, 3})); },
                 "digest under a different parent");
  expect_refused(ErrorCode::kInvalidArgument, [&] { (void)insert(c, {a[1]}, ids({2})); }, "child as root");
  expect_refused(ErrorCode::kInvalidArgument, [&] { (void)insert(c, a, ids({0, 1, 2, 0})); },
                 "block already caches another digest");
  expect_refused(ErrorCode::kInvalidArgument, [&] { (void)insert(c, a, ids({0, 1, 2, 2})); }, "repeated block");
  expect_refused(ErrorCode::kInvalidBlock, [&] { (void)insert(c, a, ids({0, 1, 2, 20})); }, "unallocated block");
  expect_refused(ErrorCode::kInvalidBlock, [&] { (void)insert(c, a, ids({0, 1, 2, 99})); }, "out of range");
  expect_refused(ErrorCode::kCacheMiss, [&] {
    InsertOptions io;
    io.parent = D(12345);
    (void)insert(c, {a[2]}, ids({2}), io);
  }, "parent not cached");
  // The good insert still works afterwards.
  EXPECT_EQ(insert(c, a, ids({0, 1, 2, 3})).num_inserted, 2u);
}

TEST(PrefixCache, MetadataOnlyCacheRefusesBlockOwnedByAnotherDigest) {
  PrefixCache c(opts());
  (void)insert(c, {D(1)}, ids({-5}));  // ids are opaque without an allocator
  EXPECT_EQ(code_of([&] { (void)insert(c, {D(2)}, ids({-5})); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(c.evict(1), 1u);
  EXPECT_EQ(insert(c, {D(2)}, ids({-5})).num_inserted, 1u);  // free again after eviction
  c.check_invariants();
}

TEST(PrefixCache, MetadataOnlyCacheFindsDenseFarAndNegativeIdsAcrossTableGrowth) {
  // Ids counted up from 0 go to a dense table, far and negative ones to a map; the table's growth past
  // a far id moves it over. Every id stays owned exactly once.
  PrefixCache c(opts());
  (void)insert(c, {D(-1)}, ids({3000}));
  (void)insert(c, {D(-2)}, ids({-7}));
  std::int32_t next = 0;
  for (std::int32_t p = 0; p < 40; ++p) {
    std::vector<BlockId> run(64);
    for (BlockId& b : run) b = next++;
    ASSERT_EQ(insert(c, chain(1000 * (p + 1), 64), run).num_inserted, 64u);
  }
  c.check_invariants();
  EXPECT_EQ(c.size(), 2u + 40u * 64u);
  for (const BlockId taken : {3000, -7, 0, 2559}) {
    EXPECT_EQ(code_of([&] { (void)insert(c, {D(-3)}, ids({taken})); }), ErrorCode::kInvalidArgument) << taken;
  }
  EXPECT_EQ(c.evict(10000), 2u + 40u * 64u);
  c.check_invariants();
  EXPECT_EQ(insert(c, {D(-3), D(-4)}, ids({3000, 5})).num_inserted, 2u);  // free again
  EXPECT_EQ(c.clear(), 2u);
  c.check_invariants();
  EXPECT_EQ(insert(c, {D(-5)}, ids({3000})).num_inserted, 1u);
  c.check_invariants();
}

TEST(PrefixCache, LruEvictsLeastRecentlyUsedLeafThenItsParent) {
  PrefixCacheOptions o = opts();
  o.event_queue_capacity = 64;
  PrefixCache c(o);
  const auto a = chain(100, 2), b = chain(200, 2), d = chain(300, 2);
  (void)insert(c, a, ids({0, 1}));
  (void)insert(c, b, ids({2, 3}));
  (void)insert(c, d, ids({4, 5}));
  use(c, a);  // a becomes the most recent
  (void)c.drain_events();
  std::vector<BlockHash> order;
  for (int i = 0; i < 6; ++i) {
    ASSERT_EQ(c.evict(1), 1u);
    const auto r = drain_removed(c);
    ASSERT_EQ(r.size(), 1u);
    order.push_back(r[0]);
    c.check_invariants();
  }
  EXPECT_EQ(order, (std::vector<BlockHash>{b[1], b[0], d[1], d[0], a[1], a[0]}));
  EXPECT_EQ(c.evict(1), 0u);
  EXPECT_EQ(c.stats().evictions, 6u);
}

TEST(PrefixCache, OnlyUnusedLeavesAreEvicted) {
  PrefixCache c(opts());
  const auto a = chain(100, 3), b = chain(200, 2);
  (void)insert(c, a, ids({0, 1, 2}));
  (void)insert(c, b, ids({3, 4}));
  const MatchResult held = c.match(std::span<const BlockHash>(a).first(2));
  ASSERT_EQ(held.num_matched, 2u);
  // a[2] (leaf, unused) and all of b go; a[0], a[1] are held.
  EXPECT_EQ(c.evict(100), 3u);
  EXPECT_TRUE(c.contains(a[0]));
  EXPECT_TRUE(c.contains(a[1]));
  EXPECT_FALSE(c.contains(a[2]));
  EXPECT_EQ(c.evict(100), 0u);
  c.release(std::span<const BlockHash>(a).first(2));
  EXPECT_EQ(c.evict(100), 2u);
  EXPECT_EQ(c.size(), 0u);
  c.check_invariants();
}

TEST(PrefixCache, InnerNodeWaitsForItsChildren) {
  PrefixCache c(opts());
  const auto a = chain(100, 2);
  (void)insert(c, a, ids({0, 1}));
  InsertOptions o;
  o.parent = a[0];
  (void)insert(c, {D(50)}, ids({2}), o);  // a[0] now has two children
  // Hold one branch: a[0] stays however much is asked.
  const std::vector<BlockHash> branch{a[0], D(50)};
  ASSERT_EQ(c.match(branch).num_matched, 2u);
  EXPECT_EQ(c.evict(10), 1u);  // a[1] only
  EXPECT_TRUE(c.contains(a[0]));
  c.release(branch);
  EXPECT_EQ(c.evict(10), 2u);
}

TEST(PrefixCache, FifoEvictsOldestInsertionRegardlessOfUse) {
  PrefixCacheOptions o = opts(EvictionPolicy::kFifo);
  o.event_queue_capacity = 64;
  PrefixCache c(o);
  const auto a = chain(100, 2), b = chain(200, 1);
  (void)insert(c, a, ids({0, 1}));
  (void)insert(c, b, ids({2}));
  use(c, a);
  (void)c.drain_events();
  ASSERT_EQ(c.evict(3), 3u);
  EXPECT_EQ(drain_removed(c), (std::vector<BlockHash>{a[1], a[0], b[0]}));
}

TEST(PrefixCache, PriorityEvictsLowestFirstWithLruTieBreak) {
  PrefixCacheOptions o = opts(EvictionPolicy::kPriority);
  o.event_queue_capacity = 64;
  PrefixCache c(o);
  const auto a = chain(100, 1), b = chain(200, 1), d = chain(300, 1), e = chain(400, 1);
  InsertOptions io;
  io.priority = 5;
  (void)insert(c, a, ids({0}), io);
  io.priority = 1;
  (void)insert(c, b, ids({1}), io);
  io.priority = 5;
  (void)insert(c, d, ids({2}), io);
  io.priority = -3;
  (void)insert(c, e, ids({3}), io);
  use(c, a);  // among the priority-5 pair, d is now least recently used
  // Re-inserting b with a higher priority raises it (the max of the two).
  io.priority = 9;
  EXPECT_EQ(insert(c, b, ids({1}), io).num_redundant, 1u);
  EXPECT_EQ(c.lookup(b[0])->priority, 9);
  (void)c.drain_events();
  ASSERT_EQ(c.evict(4), 4u);
  EXPECT_EQ(drain_removed(c), (std::vector<BlockHash>{e[0], d[0], a[0], b[0]}));
}

TEST(PrefixCache, TtlEvictsExpiredByAgeThenLru) {
  std::int64_t now = 0;
  PrefixCacheOptions o = opts(EvictionPolicy::kTtl);
  o.ttl_seconds = 10;
  o.event_queue_capacity = 64;
  o.clock_ns = [&now] { return now; };
  const std::int64_t s = 1'000'000'000;
  PrefixCache c(o);
  const auto a = chain(100, 2), b = chain(200, 1), d = chain(300, 1);
  now = 0;
  (void)insert(c, a, ids({0, 1}));
  now = 1 * s;
  (void)insert(c, d, ids({2}));
  now = 5 * s;
  (void)insert(c, b, ids({3}));
  now = 11 * s;
  use(c, d);  // recently used, but inserted 11 s ago: expired all the same

  // At t = 3 s nothing has expired: plain LRU (a[1] was used least recently).
  now = 3 * s;
  ASSERT_EQ(c.evict(1), 1u);
  EXPECT_EQ(drain_removed(c), (std::vector<BlockHash>{a[1]}));

  now = 12 * s;  // a[0] (t=0) and d (t=1) expired; b (t=5) not
  ASSERT_EQ(c.evict(1), 1u);
  ASSERT_EQ(c.evict(1), 1u);
  EXPECT_EQ(drain_removed(c), (std::vector<BlockHash>{a[0], d[0]}));
  ASSERT_EQ(c.evict(1), 1u);  // LRU fallback
  EXPECT_EQ(drain_removed(c), (std::vector<BlockHash>{b[0]}));
  c.check_invariants();
}

TEST(PrefixCache, CapacityEvictsBeforeInserting) {
  PrefixCache c(opts(EvictionPolicy::kLru, 4u));
  const auto a = chain(100, 3), b = chain(200, 3);
  EXPECT_EQ(insert(c, a, ids({0, 1, 2})).num_inserted, 3u);
  const InsertResult r = insert(c, b, ids({3, 4, 5}));
  EXPECT_EQ(r.num_inserted, 3u);
  EXPECT_EQ(c.size(), 4u);
  EXPECT_EQ(c.stats().evictions, 2u);
  EXPECT_TRUE(c.contains(a[0]));
  EXPECT_FALSE(c.contains(a[1]));
  c.check_invariants();
}

TEST(PrefixCache, CapacityCachesOnlyWhatFitsWhenNothingIsEvictable) {
  BlockAllocator alloc(16);
  std::vector<BlockId> blocks(7);
  ASSERT_TRUE(alloc.allocate(blocks).ok());  // 0..6, ref 1 each (the "caller's")
  PrefixCache c(opts(EvictionPolicy::kLru, 4u), &alloc);
  const auto a = chain(100, 1), b = chain(200, 3), d = chain(300, 3);
  (void)insert(c, a, ids({0}));
  (void)insert(c, b, ids({1, 2, 3}));
  ASSERT_EQ(c.match(b).num_matched, 3u);  // b is in use: only a[0] may go
  const InsertResult r = insert(c, d, ids({4, 5, 6}));
  EXPECT_EQ(r.num_redundant, 0u);
  EXPECT_EQ(r.num_inserted, 1u);  // a[0] evicted, room for d[0] only
  EXPECT_EQ(c.size(), 4u);
  EXPECT_TRUE(c.contains(d[0]));
  EXPECT_FALSE(c.contains(d[1]));
  EXPECT_EQ(alloc.ref_count(0), 1u);  // evicted: back to the caller's reference only
  EXPECT_EQ(alloc.ref_count(4), 2u);  // cached
  EXPECT_EQ(alloc.ref_count(5), 1u);  // did not fit: the cache took no reference
  EXPECT_EQ(alloc.ref_count(6), 1u);
  c.release(b);
  c.check_invariants();
}

TEST(PrefixCache, CapacityNeverEvictsTheAttachmentPoint) {
  PrefixCache c(opts(EvictionPolicy::kLru, 2u));
  const auto a = chain(100, 3);
  (void)insert(c, {a[0], a[1]}, ids({0, 1}));
  InsertOptions o;
  o.parent = a[1];  // a[1] is an unused leaf: the only candidate, but it is where a[2] hangs
  const InsertResult r = insert(c, {a[2]}, ids({2}), o);
  EXPECT_EQ(r.num_inserted, 0u);
  EXPECT_TRUE(c.contains(a[1]));
  EXPECT_EQ(c.stats().evictable_blocks, 1u);
  c.check_invariants();
}

TEST(PrefixCache, InvalidateRemovesOwnersSubtreesExceptWhatIsInUse) {
  PrefixCacheOptions o = opts();
  o.event_queue_capacity = 64;
  PrefixCache c(o);
  const auto a = chain(100, 3), b = chain(200, 2);
  InsertOptions io;
  io.owner = 1;
  (void)insert(c, a, ids({0, 1, 2}), io);
  io.owner = 2;
  io.parent = a[2];
  (void)insert(c, {D(150)}, ids({3}), io);  // owner 2 extends owner 1's chain
  io.parent.reset();
  (void)insert(c, b, ids({4, 5}), io);

  EXPECT_EQ(c.cached_owners(), (std::vector<std::uint64_t>{1, 2}));

  // Hold a[0..1]: they (and nothing below them that is unused) stay.
  ASSERT_EQ(c.match(std::span<const BlockHash>(a).first(2)).num_matched, 2u);
  (void)c.drain_events();
  EXPECT_EQ(c.invalidate(1), 2u);  // a[2] and its child D(150)
  auto removed = drain_removed(c);
  std::sort(removed.begin(), removed.end());
  std::vector<BlockHash> want{a[2], D(150)};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(removed, want);
  EXPECT_TRUE(c.contains(a[0]));
  EXPECT_TRUE(c.contains(a[1]));
  EXPECT_EQ(c.lookup(a[1])->num_children, 0u);
  EXPECT_TRUE(c.contains(b[0]));
  c.check_invariants();

  c.release(std::span<const BlockHash>(a).first(2));
  EXPECT_EQ(c.cached_owners(), (std::vector<std::uint64_t>{1, 2}));  // owner 1's held blocks stayed
  EXPECT_EQ(c.invalidate(1), 2u);
  EXPECT_EQ(c.invalidate(1), 0u);
  EXPECT_EQ(c.cached_owners(), (std::vector<std::uint64_t>{2}));
  EXPECT_EQ(c.invalidate(2), 2u);
  EXPECT_EQ(c.size(), 0u);
  EXPECT_TRUE(c.cached_owners().empty());
  EXPECT_EQ(c.stats().removals, 6u);
  EXPECT_EQ(c.stats().evictions, 0u);
  c.check_invariants();
}

TEST(PrefixCache, ClearKeepsOnlyChainsInUse) {
  PrefixCacheOptions o = opts();
  o.event_queue_capacity = 64;
  PrefixCache c(o);
  const auto a = chain(100, 3), b = chain(200, 2);
  (void)insert(c, a, ids({0, 1, 2}));
  (void)insert(c, b, ids({3, 4}));
  ASSERT_EQ(c.match(std::span<const BlockHash>(a).first(2)).num_matched, 2u);
  (void)c.drain_events();
  EXPECT_EQ(c.clear(), 3u);
  auto ev = c.drain_events();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].type, PrefixCacheEvent::Type::kRemoved);
  EXPECT_EQ(c.size(), 2u);
  c.release(std::span<const BlockHash>(a).first(2));
  EXPECT_EQ(c.clear(), 2u);
  ev = c.drain_events();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].type, PrefixCacheEvent::Type::kCleared);
  EXPECT_TRUE(ev[0].digests.empty());
  c.check_invariants();
  // Usable after a clear.
  EXPECT_EQ(insert(c, a, ids({0, 1, 2})).num_inserted, 3u);
  EXPECT_EQ(c.match(a).num_matched, 3u);
  c.release(a);
  c.check_invariants();
}

TEST(PrefixCache, InsertRefusesNegativeTokenIdsForEvents) {
  // Stored events carry token ids that routers read as unsigned 32-bit: a negative one is refused
  // before anything changes.
  PrefixCacheOptions o = opts(EvictionPolicy::kLru, 8u);
  o.event_queue_capacity = 8;
  PrefixCache c(o);
  const auto a = chain(300, 2);
  std::vector<std::int32_t> tokens{1, 2, 3, 4, 5, 6, -7, 8};
  InsertOptions io;
  io.token_ids = tokens;
  EXPECT_EQ(code_of([&] { (void)insert(c, a, ids({0, 1}), io); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(c.size(), 0u);
  EXPECT_TRUE(c.drain_events().empty());
  tokens[6] = 7;
  EXPECT_EQ(insert(c, a, ids({0, 1}), io).num_inserted, 2u);
  c.check_invariants();
}

TEST(PrefixCache, EventsDescribeStoredAndRemovedBlocks) {
  PrefixCacheOptions o = opts(EvictionPolicy::kLru, 3u);
  o.event_queue_capacity = 8;
  PrefixCache c(o);
  const auto a = chain(100, 4);
  const std::vector<std::int32_t> tokens{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
  InsertOptions io;
  io.token_ids = std::span<const std::int32_t>(tokens).first(8);
  io.extra_key = "lora-3";
  io.cache_salt = "tenant-a";
  (void)insert(c, {a[0], a[1]}, ids({0, 1}), io);
  io.token_ids = tokens;
  io.extra_key.reset();
  io.cache_salt.reset();
  // a[0], a[1] redundant; a[2] fits; a[3] would need a[1] evicted, but a[1] is the attachment point.
  const InsertResult r = insert(c, a, ids({0, 1, 2, 3}), io);
  EXPECT_EQ(r.num_redundant, 2u);
  EXPECT_EQ(r.num_inserted, 1u);

  auto ev = c.drain_events();
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].type, PrefixCacheEvent::Type::kStored);
  EXPECT_EQ(ev[0].digests, (std::vector<BlockHash>{a[0], a[1]}));
  EXPECT_FALSE(ev[0].parent.has_value());
  EXPECT_EQ(ev[0].token_ids, (std::vector<std::int32_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(ev[0].block_size, 4u);
  EXPECT_EQ(ev[0].extra_key, std::optional<std::string>("lora-3"));
  EXPECT_EQ(ev[0].cache_salt, std::optional<std::string>("tenant-a"));
  EXPECT_EQ(ev[1].type, PrefixCacheEvent::Type::kStored);
  EXPECT_EQ(ev[1].digests, (std::vector<BlockHash>{a[2]}));
  EXPECT_EQ(ev[1].parent, a[1]);
  EXPECT_EQ(ev[1].token_ids, (std::vector<std::int32_t>{9, 10, 11, 12}));
  EXPECT_FALSE(ev[1].extra_key.has_value());
  EXPECT_FALSE(ev[1].cache_salt.has_value());

  // Capacity eviction shows up as a removed event before the stored one.
  const auto b = chain(200, 1);
  (void)insert(c, b, ids({7}));
  ev = c.drain_events();
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[0].type, PrefixCacheEvent::Type::kRemoved);
  EXPECT_EQ(ev[0].digests, (std::vector<BlockHash>{a[2]}));
  EXPECT_EQ(ev[1].type, PrefixCacheEvent::Type::kStored);
  EXPECT_TRUE(ev[1].token_ids.empty());
  EXPECT_TRUE(c.drain_events().empty());
}

TEST(PrefixCache, EventQueueDropsOldestAndMarksTheLoss) {
  PrefixCacheOptions o = opts();
  o.event_queue_capacity = 3;
  PrefixCache c(o);
  for (std::int32_t i = 0; i < 5; ++i) (void)insert(c, {D(i)}, ids({i}));
  const auto ev = c.drain_events();
  ASSERT_EQ(ev.size(), 4u);
  EXPECT_EQ(ev[0].type, PrefixCacheEvent::Type::kCleared);  // the consumer must forget its view
  EXPECT_TRUE(ev[0].events_lost);
  EXPECT_EQ(ev[1].digests[0], D(2));
  EXPECT_EQ(ev[3].digests[0], D(4));
  EXPECT_EQ(c.stats().events_dropped, 2u);
  EXPECT_EQ(c.stats().cached_blocks, 5u);  // the mark clears no block
  (void)insert(c, {D(5)}, ids({5}));
  const auto next = c.drain_events();  // no loss since: no mark
  ASSERT_EQ(next.size(), 1u);
  EXPECT_EQ(next[0].type, PrefixCacheEvent::Type::kStored);
  c.clear();
  const auto cleared = c.drain_events();  // a real clear is not a loss
  ASSERT_EQ(cleared.size(), 1u);
  EXPECT_FALSE(cleared[0].events_lost);
}

TEST(PrefixCache, EventsOffByDefault) {
  PrefixCache c(opts());
  (void)insert(c, {D(1)}, ids({1}));
  (void)c.evict(1);
  EXPECT_TRUE(c.drain_events().empty());
  EXPECT_EQ(c.stats().events_dropped, 0u);
}

TEST(PrefixCache, StatsCountBlocksAndTokens) {
  PrefixCache c(opts());  // block size 4
  const auto a = chain(100, 4);
  (void)insert(c, {a[0], a[1]}, ids({0, 1}));
  (void)c.match(a);          // 2 of 4
  (void)c.match(chain(500, 3));  // 0 of 3
  const auto st = c.stats();
  EXPECT_EQ(st.lookups, 2u);
  EXPECT_EQ(st.hit_lookups, 1u);
  EXPECT_EQ(st.queried_blocks, 7u);
  EXPECT_EQ(st.hit_blocks, 2u);
  EXPECT_EQ(st.queried_tokens, 28u);
  EXPECT_EQ(st.hit_tokens, 8u);
  EXPECT_EQ(st.inserts, 2u);
  EXPECT_EQ(st.cached_blocks, 2u);
  EXPECT_EQ(st.in_use_blocks, 2u);
  EXPECT_EQ(st.evictable_blocks, 0u);
  c.release(std::vector<BlockHash>{a[0], a[1]});
}

TEST(PrefixCache, AllocatorReferencesFollowTheProtocol) {
  BlockAllocator alloc(64);
  {
    PrefixCache c(opts(), &alloc);
    // Request 1: allocates 4 blocks, computes them, caches them, finishes.
    std::vector<BlockId> r1(4);
    ASSERT_TRUE(alloc.allocate(r1).ok());
    const auto a = chain(100, 4);
    EXPECT_EQ(c.insert(a, r1).num_inserted, 4u);
    for (BlockId b : r1) EXPECT_EQ(alloc.ref_count(b), 2u);
    ASSERT_TRUE(alloc.free(r1).ok());
    for (BlockId b : r1) EXPECT_EQ(alloc.ref_count(b), 1u);

    // Request 2: shares 3 blocks, computes 2 more (a duplicate of a[3] and a new one).
    auto q = a;
    q.push_back(D(104));
    const MatchResult m = c.match(std::span<const BlockHash>(q).first(3));
    ASSERT_EQ(m.num_matched, 3u);
    std::vector<BlockId> r2(2);
    ASSERT_TRUE(alloc.allocate(r2).ok());
    std::vector<BlockId> all(m.block_ids);
    all.insert(all.end(), r2.begin(), r2.end());
    const InsertResult ins = c.insert(q, all);
    EXPECT_EQ(ins.num_redundant, 4u);  // q[3] == a[3] was cached: r2[0] is a duplicate
    EXPECT_EQ(ins.num_inserted, 1u);
    EXPECT_EQ(alloc.ref_count(r2[0]), 1u);
    EXPECT_EQ(alloc.ref_count(r2[1]), 2u);
    ASSERT_TRUE(alloc.free(r2).ok());
    c.release(std::span<const BlockHash>(q).first(3));
    EXPECT_EQ(alloc.ref_count(r2[0]), 0u);  // the duplicate went straight back
    EXPECT_EQ(alloc.num_allocated(), 5u);   // exactly the cache's holdings
    EXPECT_EQ(c.cached_block_ids().size(), 5u);

    EXPECT_EQ(c.evict(100), 5u);
    EXPECT_EQ(alloc.num_allocated(), 0u);
    c.check_invariants();

    // The destructor returns what is still cached.
    std::vector<BlockId> r3(2);
    ASSERT_TRUE(alloc.allocate(r3).ok());
    (void)c.insert(chain(300, 2), r3);
    ASSERT_TRUE(alloc.free(r3).ok());
    EXPECT_EQ(alloc.num_allocated(), 2u);
  }
  EXPECT_EQ(alloc.num_allocated(), 0u);
}

TEST(PrefixCache, NodeMetadataSize) {
  // 1,000 prompts of 10 blocks in a pool of 16,384 blocks, in a cache bounded at exactly that size
  // (records reserved up front) and in an unbounded one (records grown geometrically).
  constexpr std::int32_t kChains = 1000, kLen = 10;
  for (const bool bounded : {true, false}) {
    BlockAllocator alloc(1 << 14);
    PrefixCacheOptions o = opts();
    if (bounded) o.capacity_blocks = kChains * kLen;
    PrefixCache c(o, &alloc);
    for (std::int32_t i = 0; i < kChains; ++i) {
      std::vector<BlockId> b(kLen);
      ASSERT_TRUE(alloc.allocate(b).ok());
      ASSERT_EQ(c.insert(chain(i * kLen, kLen), b).num_inserted, static_cast<std::uint32_t>(kLen));
      ASSERT_TRUE(alloc.free(b).ok());
    }
    ASSERT_EQ(c.size(), static_cast<std::uint32_t>(kChains * kLen));
    const double per_node = static_cast<double>(c.metadata_bytes()) / c.size();
    std::cout << "[ metadata ] node record " << PrefixCache::node_bytes() << " bytes (" << kBlockHashBytes
              << " of them the digest); all structures " << per_node << " bytes per cached block ("
              << (bounded ? "bounded, reserved" : "unbounded, grown") << ", " << c.size() << " blocks)\n";
    EXPECT_LE(PrefixCache::node_bytes() - kBlockHashBytes, 128u);
    if (bounded) {
      EXPECT_LE(per_node, 128.0 + kBlockHashBytes);
    }
    c.check_invariants();
  }
}

TEST(PrefixCache, InsertWithAcquireHoldsEveryCachedPosition) {
  BlockAllocator a(16);
  PrefixCache c(opts(EvictionPolicy::kLru, 3), &a);
  const auto d = chain(600, 4);
  std::vector<BlockId> b(4);
  ASSERT_TRUE(a.allocate(b).ok());
  ASSERT_EQ(insert(c, {d[0]}, {b[0]}).num_inserted, 1u);  // reused below
  InsertOptions o;
  o.acquire = true;
  const InsertResult r = c.insert(d, b, o);
  EXPECT_EQ(r.num_redundant, 1u);
  EXPECT_EQ(r.num_inserted, 2u);  // capacity 3
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(c.lookup(d[i])->users, 1u) << i;
  EXPECT_EQ(c.stats().in_use_blocks, 3u);
  EXPECT_EQ(c.stats().evictable_blocks, 0u);
  EXPECT_EQ(c.evict(3), 0u);  // held: nothing goes
  c.check_invariants();
  c.release(std::vector<BlockHash>(d.begin(), d.begin() + 3));
  EXPECT_EQ(c.stats().evictable_blocks, 1u);
  ASSERT_TRUE(a.free(b).ok());
  EXPECT_EQ(c.evict(3), 3u);
  EXPECT_EQ(a.num_allocated(), 0u);
  c.check_invariants();
}

TEST(PrefixCache, InsertWithAdoptTakesOverTheCallersReferences) {
  BlockAllocator a(16);
  PrefixCache c(opts(EvictionPolicy::kLru, 3), &a);
  const auto d = chain(700, 4);
  const BlockId other = a.allocate_one();
  ASSERT_EQ(insert(c, {d[0]}, {other}).num_inserted, 1u);
  ASSERT_TRUE(a.free(std::vector<BlockId>{other}).ok());  // now only the cache's
  std::vector<BlockId> b(4);
  ASSERT_TRUE(a.allocate(b).ok());
  InsertOptions o;
  o.acquire = true;
  o.adopt = true;
  const InsertResult r = c.insert(d, b, o);
  EXPECT_EQ(r.num_redundant, 1u);
  EXPECT_EQ(r.num_inserted, 2u);  // capacity 3: position 3 is cut off
  // No reference was added: b[1], b[2] are the cache's now, b[0] and b[3] still the caller's.
  for (BlockId id : b) EXPECT_EQ(a.ref_count(id), 1u) << id;
  EXPECT_EQ(a.num_allocated(), 5u);
  c.check_invariants();
  ASSERT_TRUE(a.free(std::vector<BlockId>{b[0], b[3]}).ok());
  c.release(std::vector<BlockHash>(d.begin(), d.begin() + 3));
  EXPECT_EQ(c.evict(3), 3u);
  EXPECT_EQ(a.num_allocated(), 0u);
  c.check_invariants();
}

}  // namespace
}  // namespace sagellm::kv
