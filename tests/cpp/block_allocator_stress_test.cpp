// Several threads allocate, share and free blocks at once; afterwards no id was ever held by two
// owners at the same time and every block is back on the free list. Runs under TSan in CI.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"

namespace sagellm::kv {
namespace {

constexpr std::uint32_t kBlocks = 4096;
constexpr int kThreads = 8;
constexpr int kRounds = 20000;

TEST(BlockAllocatorStress, NoBlockIsHandedOutTwiceAndNoneIsLost) {
  BlockAllocator allocator(kBlocks);
  // owner[id] == 0 when the block is free; a thread that gets an id from allocate() claims it with
  // a CAS from 0. A failed claim means another owner holds a block the allocator handed out again.
  std::vector<std::atomic<int>> owner(kBlocks);
  for (auto& o : owner) o.store(0);
  std::atomic<std::uint64_t> double_handouts{0};
  std::atomic<std::uint64_t> allocations{0};

  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<std::uint32_t>(1234 + tid));
    std::uniform_int_distribution<int> batch(1, 64);
    std::vector<std::vector<BlockId>> held;
    for (int round = 0; round < kRounds; ++round) {
      const int action = static_cast<int>(rng() % 4);
      if (action <= 1 || held.empty()) {
        std::vector<BlockId> ids(static_cast<std::size_t>(batch(rng)));
        if (!allocator.allocate(ids).ok()) continue;
        allocations.fetch_add(ids.size(), std::memory_order_relaxed);
        for (BlockId id : ids) {
          int expected = 0;
          if (!owner[static_cast<std::size_t>(id)].compare_exchange_strong(expected, tid + 1)) {
            double_handouts.fetch_add(1);
          }
        }
        held.push_back(std::move(ids));
      } else if (action == 2) {
        // Share: take another reference and release it again, racing with other threads' frees.
        auto& ids = held[rng() % held.size()];
        ASSERT_TRUE(allocator.incref(ids).ok());
        ASSERT_TRUE(allocator.free(ids).ok());
      } else {
        const std::size_t pick = rng() % held.size();
        std::vector<BlockId> ids = std::move(held[pick]);
        held.erase(held.begin() + static_cast<std::ptrdiff_t>(pick));
        for (BlockId id : ids) owner[static_cast<std::size_t>(id)].store(0);
        ASSERT_TRUE(allocator.free(ids).ok());
      }
    }
    for (auto& ids : held) {
      for (BlockId id : ids) owner[static_cast<std::size_t>(id)].store(0);
      ASSERT_TRUE(allocator.free(ids).ok());
    }
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();

  EXPECT_EQ(double_handouts.load(), 0u);
  EXPECT_GT(allocations.load(), 0u);
  EXPECT_EQ(allocator.num_available(), kBlocks);
  EXPECT_EQ(allocator.num_allocated(), 0u);
  // Every id comes back exactly once.
  std::vector<BlockId> all(kBlocks);
  ASSERT_TRUE(allocator.allocate(all).ok());
  std::vector<bool> seen(kBlocks, false);
  for (BlockId id : all) {
    ASSERT_FALSE(seen[static_cast<std::size_t>(id)]) << "id " << id << " on the free list twice";
    seen[static_cast<std::size_t>(id)] = true;
  }
}

}  // namespace
}  // namespace sagellm::kv
