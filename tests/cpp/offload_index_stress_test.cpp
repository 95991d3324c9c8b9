// Several threads drive one OffloadIndex the way concurrent schedulers would: reserve (evicting),
// commit or abandon, pin / unpin, touch, stats; one thread checks the invariants now and then.
// Each thread owns the slots it reserved and the pins it took, so every call is valid. Fixed seeds
// and thread counts; meant to run under TSan.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "sagellm_kv/error.hpp"
#include "sagellm_kv/offload_index.hpp"

namespace sagellm::kv {
namespace {

constexpr int kThreads = 4;
constexpr int kIterations = 3000;
constexpr std::uint32_t kSlots = 256;

TEST(OffloadIndexStress, ConcurrentStoresLoadsAndEvictions) {
  OffloadIndexOptions o;
  o.num_slots = kSlots;
  OffloadIndex idx(o);
  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> evicted_total{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<std::uint32_t>(100 + t));
      std::vector<BlockId> pending;
      for (int i = 0; i < kIterations; ++i) {
        // a request: reserve a chain of new chunks, then complete (or fail) it
        const std::size_t n = 1 + rng() % 8;
        std::vector<BlockId> call(n, OffloadIndex::kNoSlot);
        std::vector<BlockId> out(n);
        std::vector<BlockId> evicted;
        if (idx.reserve(call, OffloadIndex::kNoSlot, out, evicted)) {
          evicted_total.fetch_add(evicted.size(), std::memory_order_relaxed);
          if (rng() % 10 == 0) {
            idx.abandon(out);
          } else {
            idx.commit(out);
            // a load of what it just stored, while other threads evict around it: it may be gone
            try {
              idx.pin(out);
            } catch (const Error& e) {
              ASSERT_EQ(e.code(), ErrorCode::kCacheMiss);
              continue;
            }
            for (BlockId s : out) ASSERT_EQ(idx.state(s), SlotState::kResident);
            idx.touch(out);
            idx.unpin(out);
          }
        }
        (void)idx.stats();
      }
    });
  }
  std::thread checker([&] {
    while (!done.load(std::memory_order_acquire)) {
      idx.check_invariants();
      std::this_thread::yield();
    }
  });
  for (auto& th : threads) th.join();
  done.store(true, std::memory_order_release);
  checker.join();
  idx.check_invariants();
  const auto st = idx.stats();
  EXPECT_EQ(st.pending_slots, 0u);
  EXPECT_EQ(st.trie.in_use_blocks, 0u);
  EXPECT_GT(evicted_total.load(), 0u);
}

}  // namespace
}  // namespace sagellm::kv
