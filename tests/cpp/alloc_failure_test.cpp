// Every heap allocation of PrefixCache::insert may fail with std::bad_alloc. The call then
// changes nothing (no block reference or use taken, no node added, no event). This binary replaces the global operator new so that a test
// can fail the k-th allocation of one call, for every k until the call makes no more allocations.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace {

thread_local long t_fail_countdown = -1;  // -1: off; 0: the next allocation of this thread fails
thread_local bool t_failed = false;       // an allocation was failed on purpose

void* counted_malloc(std::size_t n) {
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
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace sagellm::kv {
namespace {

constexpr std::uint32_t kBs = 4;
constexpr std::uint32_t kBlocks = 12;

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

TEST(PrefixCacheAllocFailure, InsertChangesNothingWhenAnAllocationFails) {
  // 20 new nodes under a cached prefix of 3: the digest index, node table, heaps and event all grow.
  const auto digests = chain(0, 23);
  bool completed = false;
  long injected = 0;
  for (long k = 0; k < 10000 && !completed; ++k) {
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
    t_failed = false;
    t_fail_countdown = k;
    std::optional<InsertResult> res;
    try {
      res = cache.insert(digests, blocks, io);
    } catch (const std::bad_alloc&) {
    }
    t_fail_countdown = -1;
    injected += t_failed ? 1 : 0;
    const std::string where = "allocation " + std::to_string(k);
    cache.check_invariants();
    if (!res) {
      ASSERT_EQ(cache.size(), 3u) << where;
      ASSERT_EQ(cache.stats().in_use_blocks, 0u) << where;
      for (std::size_t i = 0; i < digests.size(); ++i) ASSERT_EQ(cache.contains(digests[i]), i < 3) << where;
      for (std::size_t i = 0; i < blocks.size(); ++i) ASSERT_EQ(alloc.ref_count(blocks[i]), i < 3 ? 2u : 1u) << where;
      ASSERT_TRUE(cache.drain_events().empty()) << where;
      continue;
    }
    ASSERT_EQ(res->num_cached(), 23u) << where;
    completed = !t_failed;
    ASSERT_EQ(cache.stats().in_use_blocks, 23u) << where;
    cache.release(digests);
    ASSERT_TRUE(alloc.free(blocks).ok());
  }
  EXPECT_TRUE(completed);
  EXPECT_GE(injected, 5);  // the sweep did fail allocations inside the call
  std::printf("%ld allocations failed in turn\n", injected);
}

}  // namespace
}  // namespace sagellm::kv
