// Several threads run the scheduler's cycle against one prefix cache and one block allocator:
// hash a prompt, match (acquire), allocate and "compute" the missing blocks, insert, free their own
// references, release; plus on-demand eviction, invalidation, peeks and invariant checks. Fixed
// seeds and thread counts. Meant to run under TSan and ASan+UBSan as well.
//
// Each block's "KV content" is a plain (non-atomic) word written by the thread that allocated the
// block and read by every thread that matches it. If the cache ever let a held or cached block go
// back to the allocator, another thread would reallocate and overwrite it: the content check fails,
// and TSan reports the unsynchronised write.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"
#include "test_support.hpp"

namespace sagellm::kv {
namespace {

using testing::kUnderTsan;

constexpr std::uint32_t kBlockSize = 4;
constexpr std::uint32_t kPoolBlocks = 2048;
constexpr std::uint32_t kCapacity = 384;
constexpr int kThreads = 4;
constexpr int kIterations = 4000;
constexpr int kSharedPrefixes = 6;

std::uint64_t tag_of(const BlockHash& d) {
  std::uint64_t t = 0;
  std::memcpy(&t, d.bytes.data(), sizeof t);
  return t | 1;  // never 0, which marks "no content"
}

struct Request {
  std::vector<BlockHash> digests;
  std::uint32_t matched = 0;
};

struct Shared {
  BlockAllocator alloc{kPoolBlocks};
  std::unique_ptr<PrefixCache> cache;
  std::vector<std::uint64_t> content = std::vector<std::uint64_t>(kPoolBlocks, 0);
  std::atomic<int> failures{0};
};

void fail(Shared& s, const std::string& what) {
  if (s.failures.fetch_add(1, std::memory_order_relaxed) < 5) ADD_FAILURE() << what;
}

void worker(Shared& s, int thread_index) {
  std::mt19937 rng(0xC0FFEEu + static_cast<std::uint32_t>(thread_index));
  const auto next = [&rng] { return static_cast<std::uint32_t>(rng()); };
  const std::uint64_t owner = static_cast<std::uint64_t>(thread_index) + 1;
  std::deque<Request> held;  // up to two requests in flight per thread
  std::vector<std::int32_t> tokens;
  std::vector<BlockId> ids;
  std::vector<BlockId> fresh;
  for (int it = 0; it < kIterations && s.failures.load(std::memory_order_relaxed) == 0; ++it) {
    // Prompt: one of a few shared prefixes (0-8 blocks) + a tail that is private or popular.
    const auto prefix = static_cast<std::int32_t>(next() % kSharedPrefixes);
    const std::uint32_t shared_blocks = next() % 9;
    const std::uint32_t tail_blocks = 1 + next() % 4;
    const bool popular_tail = next() % 3 == 0;
    tokens.clear();
    for (std::uint32_t i = 0; i < shared_blocks * kBlockSize; ++i) tokens.push_back(prefix * 1000 + static_cast<std::int32_t>(i));
    for (std::uint32_t i = 0; i < tail_blocks * kBlockSize; ++i) {
      tokens.push_back(popular_tail ? static_cast<std::int32_t>(i) : static_cast<std::int32_t>(next() % 50000));
    }
    tokens.push_back(7);  // a partial block, never hashed
    Request req;
    req.digests.resize(num_full_blocks(tokens.size(), kBlockSize));
    const std::string salt = prefix % 2 == 0 ? "" : "tenant-odd";
    if (hash_blocks(HashAlgorithm::kSha256, tokens, kBlockSize, kRootBlockHash, {salt, ""}, req.digests) !=
        req.digests.size()) {
      fail(s, "hash count");
      return;
    }

    // Match: every matched block must still hold the content its digest was computed into.
    ids.assign(req.digests.size(), -1);
    req.matched = s.cache->match(req.digests, ids);
    for (std::uint32_t i = 0; i < req.matched; ++i) {
      const auto b = static_cast<std::uint32_t>(ids[i]);
      if (!s.alloc.is_allocated(ids[i])) fail(s, "matched block " + std::to_string(ids[i]) + " is free");
      if (s.content[b] != tag_of(req.digests[i])) fail(s, "matched block " + std::to_string(ids[i]) + " was overwritten");
    }

    // Allocate and "compute" the rest; make room in the cache when the pool is short.
    const std::size_t missing = req.digests.size() - req.matched;
    fresh.assign(missing, -1);
    bool got = s.alloc.allocate(fresh).ok();
    if (!got) {
      (void)s.cache->evict(static_cast<std::uint32_t>(missing) + 8);
      got = s.alloc.allocate(fresh).ok();
    }
    if (got) {
      for (std::size_t j = 0; j < missing; ++j) {
        s.content[static_cast<std::uint32_t>(fresh[j])] = tag_of(req.digests[req.matched + j]);
        ids[req.matched + j] = fresh[j];
      }
      InsertOptions io;
      io.owner = owner;
      io.priority = static_cast<std::int32_t>(next() % 4);
      io.token_ids = std::span<const std::int32_t>(tokens).first(req.digests.size() * kBlockSize);
      try {
        const InsertResult r = s.cache->insert(req.digests, ids, io);
        if (r.num_redundant < req.matched) fail(s, "insert did not see the matched prefix as cached");
      } catch (const Error& e) {
        fail(s, std::string("insert: ") + e.what());
      }
      // The request is done computing: drop its own references (cached blocks keep the cache's).
      if (!s.alloc.free(fresh).ok()) fail(s, "free of own blocks refused");
    }
    held.push_back(std::move(req));

    if (held.size() > 2 || next() % 2 == 0) {
      Request done = std::move(held.front());
      held.pop_front();
      try {
        s.cache->release(std::span<const BlockHash>(done.digests).first(done.matched));
      } catch (const Error& e) {
        fail(s, std::string("release: ") + e.what());
      }
    }

    switch (next() % 16) {
      case 0: (void)s.cache->evict(1 + next() % 16); break;
      case 1:
        if (next() % 8 == 0) (void)s.cache->invalidate(owner);
        break;
      case 2: {
        std::vector<BlockHash> probe(1);
        const std::int32_t t[kBlockSize] = {prefix * 1000, prefix * 1000 + 1, prefix * 1000 + 2, prefix * 1000 + 3};
        if (hash_blocks(HashAlgorithm::kSha256, t, kBlockSize, kRootBlockHash, {salt, ""}, probe) == 1) {
          (void)s.cache->peek(probe);
        }
        break;
      }
      case 3:
        try {
          s.cache->check_invariants();
        } catch (const Error& e) {
          fail(s, e.what());
        }
        break;
      case 4: (void)s.cache->drain_events(); break;
      case 5: (void)s.cache->stats(); break;
      case 6: {
        const std::vector<std::uint64_t> owners = s.cache->cached_owners();  // racing the invalidations
        if (!std::is_sorted(owners.begin(), owners.end())) fail(s, "cached_owners out of order");
        break;
      }
      default: break;
    }
  }
  for (const Request& r : held) s.cache->release(std::span<const BlockHash>(r.digests).first(r.matched));
}

class PrefixCacheStress : public ::testing::TestWithParam<EvictionPolicy> {};

TEST_P(PrefixCacheStress, ConcurrentMatchInsertReleaseEvictKeepsReferencesExact) {
  Shared s;
  PrefixCacheOptions o;
  o.block_size = kBlockSize;
  o.capacity_blocks = kCapacity;
  o.policy = GetParam();
  o.ttl_seconds = 0.002;
  o.event_queue_capacity = 128;
  s.cache = std::make_unique<PrefixCache>(o, &s.alloc);

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, std::ref(s), t);
  for (auto& th : threads) th.join();
  ASSERT_EQ(s.failures.load(), 0);

  // Quiescent: nothing is held, so every allocated block is exactly a cache holding.
  s.cache->check_invariants();
  const PrefixCacheStats st = s.cache->stats();
  EXPECT_EQ(st.in_use_blocks, 0u);
  EXPECT_LE(st.cached_blocks, kCapacity);
  EXPECT_GT(st.hit_blocks, 0u);
  EXPECT_GT(st.evictions, 0u);
  std::map<BlockId, std::uint32_t> holdings;
  for (BlockId b : s.cache->cached_block_ids()) ++holdings[b];
  for (const auto& [b, n] : holdings) EXPECT_EQ(n, 1u) << "block " << b << " cached twice";
  for (BlockId b = 0; b < static_cast<BlockId>(kPoolBlocks); ++b) {
    const auto it = holdings.find(b);
    const std::uint32_t expected = it == holdings.end() ? 0 : it->second;
    ASSERT_EQ(s.alloc.ref_count(b), expected) << "block " << b;
  }
  EXPECT_EQ(s.alloc.num_allocated(), holdings.size());

  EXPECT_EQ(s.cache->clear(), holdings.size());
  EXPECT_EQ(s.alloc.num_allocated(), 0u);
  s.cache.reset();
  EXPECT_EQ(s.alloc.num_allocated(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Policies, PrefixCacheStress,
                         ::testing::Values(EvictionPolicy::kLru, EvictionPolicy::kPriority, EvictionPolicy::kTtl),
                         [](const ::testing::TestParamInfo<EvictionPolicy>& param_info) {
                           return std::string(eviction_policy_name(param_info.param));
                         });

// A metadata-only cache (block ids are opaque numbers) under a seeded random mix of inserts whose
// ids are dense, far, negative or just freed, matches and releases, evictions (plain and detached),
// invalidations and clears. A model of which id caches which digest must agree with the cache after
// every step: each cached digest's node names its id, an id that caches something is refused by a
// new insert, and a free one is taken. The dense id table grows, is emptied by clear() and grows
// again, with the ids that sit in its map moved over.
TEST(PrefixCacheMetadataOnly, RandomIdsAgreeWithAModel) {
  for (const bool bounded : {false, true}) {
    SCOPED_TRACE(bounded);
    std::mt19937 rng(bounded ? 11u : 5u);
    const auto pick = [&](std::uint32_t n) { return static_cast<std::uint32_t>(rng() % n); };
    PrefixCacheOptions o;
    o.block_size = kBlockSize;
    if (bounded) o.capacity_blocks = 50;
    o.policy = bounded ? EvictionPolicy::kFifo : EvictionPolicy::kLru;
    o.event_queue_capacity = 16;
    PrefixCache cache(o);
    std::map<BlockId, BlockHash> model;  // id -> digest it caches
    std::vector<std::vector<BlockHash>> held;
    std::int32_t next_token = 0;
    const auto some_id = [&]() -> BlockId {
      switch (pick(5)) {
        case 0: return -static_cast<BlockId>(1 + pick(50));                // negative
        case 1: return static_cast<BlockId>(1000 + pick(4000));            // beyond the table at first
        case 2: return static_cast<BlockId>((1u << 24) + pick(1u << 20));  // far
        case 3:  // one that caches something now: the insert must be refused
          if (!model.empty()) return std::next(model.begin(), pick(static_cast<std::uint32_t>(model.size())))->first;
          return 0;
        default: return static_cast<BlockId>(pick(300));  // dense
      }
    };
    const auto resync = [&] {  // drop the model's entries the cache removed (eviction, clear)
      for (auto it = model.begin(); it != model.end();) {
        it = cache.contains(it->second) ? std::next(it) : model.erase(it);
      }
    };
    for (int step = 0; step < 4000; ++step) {
      const std::string where = "step " + std::to_string(step);
      const std::uint32_t op = pick(20);
      if (op < 9) {
        // A chain of 1-6 new blocks, from the root or under a cached digest.
        const std::uint32_t n = 1 + pick(6);
        std::vector<std::int32_t> tokens(n * kBlockSize);
        for (auto& t : tokens) t = next_token++;
        std::optional<BlockHash> parent;
        if (!model.empty() && pick(2) == 0) parent = std::next(model.begin(), pick(static_cast<std::uint32_t>(model.size())))->second;
        std::vector<BlockHash> d(n);
        (void)hash_blocks(HashAlgorithm::kSha256, tokens, kBlockSize, parent.value_or(kRootBlockHash), {}, d);
        std::vector<BlockId> ids(n);
        for (auto& b : ids) b = some_id();
        const bool clash = [&] {
          std::vector<BlockId> sorted = ids;
          std::sort(sorted.begin(), sorted.end());
          if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) return true;
          return std::any_of(ids.begin(), ids.end(), [&](BlockId b) { return model.contains(b); });
        }();
        InsertOptions io;
        io.parent = parent;
        io.acquire = pick(3) == 0;
        try {
          const InsertResult r = cache.insert(d, ids, io);
          ASSERT_FALSE(clash) << where << ": an insert of an id already caching something was taken";
          resync();  // a bounded insert may have evicted
          for (std::uint32_t j = 0; j < r.num_cached(); ++j) model[ids[j]] = d[j];
          if (io.acquire && r.num_cached() != 0) held.emplace_back(d.begin(), d.begin() + r.num_cached());
        } catch (const Error& e) {
          ASSERT_TRUE(clash) << where << ": " << e.what();
          ASSERT_EQ(e.code(), ErrorCode::kInvalidArgument) << where;
        }
      } else if (op < 11) {
        if (!model.empty()) {
          const BlockHash d = std::next(model.begin(), pick(static_cast<std::uint32_t>(model.size())))->second;
          const MatchResult m = cache.match(std::span(&d, 1));
          if (m.num_matched == 1) held.push_back({d});
        }
      } else if (op < 14) {
        if (!held.empty()) {
          const std::size_t at = pick(static_cast<std::uint32_t>(held.size()));
          cache.release(held[at]);
          held.erase(held.begin() + static_cast<std::ptrdiff_t>(at));
        }
      } else if (op < 16) {
        (void)cache.evict(1 + pick(8));
      } else if (op < 17) {
        std::vector<BlockHash> digests;
        std::vector<BlockId> ids;
        const std::uint32_t got = cache.evict_detached(1 + pick(4), digests, ids);
        ASSERT_EQ(ids.size(), got) << where;
        for (std::size_t j = 0; j < ids.size(); ++j) {
          ASSERT_TRUE(model.contains(ids[j])) << where;
          ASSERT_EQ(model.at(ids[j]), digests[j]) << where << ": detached id " << ids[j] << " cached another digest";
        }
      } else if (op < 18) {
        (void)cache.invalidate(0);
      } else if (op < 19 || held.empty()) {
        if (pick(2) == 0) {
          for (const auto& h : held) cache.release(h);
          held.clear();
        }
        (void)cache.clear();
      } else {
        (void)cache.drain_events();
      }
      resync();
      ASSERT_NO_THROW(cache.check_invariants()) << where;
      ASSERT_EQ(cache.size(), model.size()) << where;
      for (const auto& [b, d] : model) {
        const auto info = cache.lookup(d);
        ASSERT_TRUE(info.has_value()) << where;
        ASSERT_EQ(info->block_id, b) << where;
      }
      if (bounded) {
        ASSERT_LE(cache.size(), 50u) << where;
      }
    }
    for (const auto& h : held) cache.release(h);
    (void)cache.clear();
    ASSERT_EQ(cache.size(), 0u);
    ASSERT_NO_THROW(cache.check_invariants());
  }
}

// The cache returning its references (here: clear) while someone else frees one of them, breaking
// the ownership protocol. The allocator then applies every other id of the cache's batch and says
// so (kDoubleFree with `partial`); the cache used to answer any refusal by freeing each id of the
// batch again, one by one, which dropped a second reference on every other block: the test's own
// here, so blocks it still held went back to the free list. Only the offending id may be lost.
//
// The offending free comes from a timer signal on the clearing thread itself (a one-id free is a
// few atomics: safe in a handler), its delay swept over the trials so that it lands before, inside
// and after the cache's batch whatever the machine's load.
struct ReturnRace {
  BlockAllocator* alloc = nullptr;
  BlockId victim = -1;
  volatile std::sig_atomic_t fired = 0;
};
ReturnRace* g_return_race = nullptr;

void free_victim_on_alarm(int) {
  ReturnRace* r = g_return_race;
  if (r == nullptr || r->fired != 0) return;
  (void)r->alloc->free(std::span<const BlockId>(&r->victim, 1));  // the cache's reference, not ours
  r->fired = 1;
}

TEST(PrefixCacheRace, AReturnRacingAFreeOfACacheReferenceDropsNoOtherReference) {
#ifndef NDEBUG
  GTEST_SKIP() << "breaks the ownership protocol on purpose, which debug builds assert on";
#endif
  constexpr std::uint32_t kChain = 250;  // within the allocator's stack batch: one batch, no heap
  const int trials = kUnderTsan ? 1000 : 6000;
  BlockAllocator alloc(kChain);
  PrefixCacheOptions o;
  o.block_size = 1;
  PrefixCache cache(o, &alloc);
  std::vector<BlockHash> chain(kChain);
  std::vector<std::int32_t> tokens(kChain);
  for (std::uint32_t i = 0; i < kChain; ++i) tokens[i] = static_cast<std::int32_t>(i);
  ASSERT_EQ(hash_blocks(HashAlgorithm::kSha256, tokens, 1, kRootBlockHash, {}, chain), kChain);
  std::vector<BlockId> blocks(kChain);
  ReturnRace race;
  race.alloc = &alloc;
  struct sigaction act {};
  struct sigaction old {};
  act.sa_handler = free_victim_on_alarm;
  sigemptyset(&act.sa_mask);
  ASSERT_EQ(sigaction(SIGALRM, &act, &old), 0);
  g_return_race = &race;
  std::uint64_t lost = 0;
  for (int t = 0; t < trials && lost == 0; ++t) {
    ASSERT_TRUE(alloc.allocate(blocks).ok());
    ASSERT_EQ(cache.insert(chain, blocks).num_inserted, kChain);  // the cache's reference on each
    race.victim = blocks.back();
    ASSERT_TRUE(alloc.free(std::span<const BlockId>(&race.victim, 1)).ok());  // we keep the others
    race.fired = 0;
    itimerval timer{};
    timer.it_value.tv_usec = 1 + t % 40;
    ASSERT_EQ(setitimer(ITIMER_REAL, &timer, nullptr), 0);
    (void)cache.clear();
    // Wait in a call: TSan delivers a signal at one, not inside a bare spin.
    while (race.fired == 0) std::this_thread::sleep_for(std::chrono::microseconds(1));
    for (std::uint32_t i = 0; i + 1 < kChain; ++i) {
      if (alloc.ref_count(blocks[i]) != 1) ++lost;
      if (alloc.ref_count(blocks[i]) != 0) {
        ASSERT_TRUE(alloc.free(std::span<const BlockId>(&blocks[i], 1)).ok());
      }
    }
    ASSERT_EQ(alloc.num_available(), kChain) << "trial " << t;
  }
  g_return_race = nullptr;
  sigaction(SIGALRM, &old, nullptr);
  EXPECT_EQ(lost, 0u) << "a reference the test held was dropped by the cache";
}

}  // namespace
}  // namespace sagellm::kv
