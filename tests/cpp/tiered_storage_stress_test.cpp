// evict_detached racing inserts, matches and releases from other threads: every victim handed over
// exactly once, still allocated, and every block accounted for at the end (run under TSan in CI).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace sagellm::kv {
namespace {

TEST(EvictDetachedStress, VictimsAreHandedOverOnceWhileOthersInsertAndMatch) {
  constexpr std::uint32_t kBlocks = 256;
  constexpr int kWriters = 3;
  constexpr int kRounds = 3000;
  BlockAllocator alloc(kBlocks);
  PrefixCacheOptions o;
  o.block_size = 1;
  PrefixCache cache(o, &alloc);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> handed{0};
  std::vector<std::uint8_t> seen(kBlocks, 0);  // only the evicting thread touches it

  auto writer = [&](int seed) {
    std::mt19937 rng(static_cast<std::uint32_t>(seed));
    BlockHasher hasher;
    // At least kRounds, and on until the evictor has had its share (it may start late).
    for (int r = 0; r < kRounds || !stop.load(std::memory_order_acquire); ++r) {
      const std::int32_t base = static_cast<std::int32_t>(rng() % 64) * 8;
      std::vector<std::int32_t> tokens(4);
      for (std::int32_t i = 0; i < 4; ++i) tokens[static_cast<std::size_t>(i)] = base + i;
      const auto digests = hasher.hash_blocks(std::span<const std::int32_t>(tokens), 1);
      const MatchResult m = cache.match(digests);
      const std::size_t missing = digests.size() - m.num_matched;
      std::vector<BlockId> fresh(missing);
      if (missing != 0 && alloc.allocate(fresh).ok()) {
        InsertOptions io;
        if (m.num_matched != 0) io.parent = digests[m.num_matched - 1];
        (void)cache.insert(std::span(digests).subspan(m.num_matched), fresh, io);
        ASSERT_TRUE(alloc.free(fresh).ok());
      }
      cache.release(std::span(digests).first(m.num_matched));
    }
  };

  std::thread evictor([&] {
    std::vector<BlockHash> digests;
    std::vector<BlockId> victims;
    for (int it = 0; it < 1'000'000 && handed.load(std::memory_order_relaxed) < 300; ++it) {
      digests.clear();
      victims.clear();
      (void)cache.evict_detached(3, digests, victims);
      for (BlockId v : victims) {
        // Still allocated: the cache's reference is now ours (an inserting writer may still hold its own).
        EXPECT_GE(alloc.ref_count(v), 1u);
        EXPECT_EQ(seen[static_cast<std::size_t>(v)], 0) << "block " << v << " handed over twice";
        ++seen[static_cast<std::size_t>(v)];
      }
      handed.fetch_add(victims.size(), std::memory_order_relaxed);
      EXPECT_TRUE(alloc.free(victims).ok());
      for (BlockId v : victims) --seen[static_cast<std::size_t>(v)];
      std::this_thread::yield();
    }
    stop.store(true, std::memory_order_release);
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kWriters; ++t) writers.emplace_back(writer, t + 1);
  evictor.join();
  for (auto& t : writers) t.join();

  cache.check_invariants();
  EXPECT_GE(handed.load(), 300u);
  EXPECT_EQ(alloc.num_allocated(), cache.size()) << "every allocated block is a cached one";
}

}  // namespace
}  // namespace sagellm::kv
