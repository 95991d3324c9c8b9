// Several threads allocate, release (also with bad and double releases), reset the peak and read
// stats at once, on a budget small enough that allocations are refused (bounded ids: for want of
// ids too) and, with overcommit, spread over segments. Afterwards no id was held twice, the
// counters balance and every id is free. Runs under TSan, in both modes.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "sagellm_kv/token_pool.hpp"

namespace sagellm::kv {
namespace {

constexpr std::uint64_t kMaxTokens = 2048;
constexpr std::uint32_t kBlockSize = 16;  // S = 128 ids per segment, up to 16 segments
constexpr int kThreads = 6;
constexpr int kRounds = 20000;

struct Held {
  std::uint64_t tokens;
  std::vector<BlockId> ids;
};

class TokenPoolStress : public ::testing::TestWithParam<bool> {};

TEST_P(TokenPoolStress, BudgetAndIdsStayConsistentUnderContention) {
  const bool overcommit = GetParam();
  TokenPool pool(kMaxTokens, kBlockSize, overcommit);
  std::vector<std::atomic<int>> owner(pool.max_block_ids());
  for (auto& o : owner) o.store(0);
  std::atomic<std::uint64_t> conflicts{0}, refused{0}, bad_accepted{0}, over_budget{0}, spread{0};

  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<std::uint32_t>(77 + tid));
    std::vector<Held> held;
    for (int round = 0; round < kRounds; ++round) {
      const unsigned action = rng() % 8;
      if (action < 4 || held.empty()) {
        // Mostly short allocations (partly filled blocks: past segment 0, or short of ids).
        const std::uint64_t tokens = action == 0 ? 1 + rng() % 200 : 1 + rng() % 9;
        std::vector<BlockId> ids(pool.blocks_for(tokens));
        const TokenGrant g = pool.allocate(tokens, ids);
        if (!g.ok()) {
          refused.fetch_add(1, std::memory_order_relaxed);
          if (g.code != ErrorCode::kBudgetExceeded) bad_accepted.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        for (BlockId id : ids) {
          int expected = 0;
          if (!owner[static_cast<std::size_t>(id)].compare_exchange_strong(expected, tid + 1)) {
            conflicts.fetch_add(1, std::memory_order_relaxed);
          }
        }
        held.push_back({tokens, std::move(ids)});
      } else if (action < 7) {
        const std::size_t pick = rng() % held.size();
        Held h = std::move(held[pick]);
        held.erase(held.begin() + static_cast<std::ptrdiff_t>(pick));
        for (BlockId id : h.ids) owner[static_cast<std::size_t>(id)].store(0);
        if (!pool.release(h.tokens, h.ids).ok()) bad_accepted.fetch_add(1, std::memory_order_relaxed);
        // Releasing the same ids again must be refused (they are free or someone else's now);
        // when another thread already took one of them, the refusal must still change nothing.
        std::vector<BlockId> twice = h.ids;
        twice.push_back(twice.front());
        if (pool.release(h.tokens + kBlockSize, twice).ok()) bad_accepted.fetch_add(1, std::memory_order_relaxed);
      } else {
        if (rng() % 2 == 0) pool.reset_peak();
        const TokenPoolStats s = pool.stats();
        const std::uint64_t free_ids = std::uint64_t{pool.max_block_ids()} - s.blocks_in_use;
        if (s.allocated_tokens > kMaxTokens || s.blocks_in_use > s.block_id_capacity ||
            s.blocks_peak < s.blocks_in_use || s.available_tokens > kMaxTokens - s.allocated_tokens ||
            s.available_tokens > free_ids * kBlockSize) {
          over_budget.fetch_add(1, std::memory_order_relaxed);
        }
        if (s.block_id_capacity > pool.segment_blocks()) spread.fetch_add(1, std::memory_order_relaxed);
      }
    }
    for (Held& h : held) {
      for (BlockId id : h.ids) owner[static_cast<std::size_t>(id)].store(0);
      if (!pool.release(h.tokens, h.ids).ok()) bad_accepted.fetch_add(1, std::memory_order_relaxed);
    }
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();

  EXPECT_EQ(conflicts.load(), 0u) << "an id was handed out while held";
  EXPECT_EQ(bad_accepted.load(), 0u) << "a bad release was accepted or a good one refused";
  EXPECT_EQ(over_budget.load(), 0u) << "a snapshot broke the budget or the id space";
  EXPECT_GT(refused.load(), 0u) << "the budget was never reached: the test lost its contention";
  if (overcommit) {
    EXPECT_GT(spread.load(), 0u) << "no allocation ever spread past segment 0";
  } else {
    EXPECT_EQ(spread.load(), 0u) << "bounded ids grew past segment 0";
  }
  const TokenPoolStats s = pool.stats();
  EXPECT_EQ(s.allocated_tokens, 0u);
  EXPECT_EQ(s.allocations, 0u);
  EXPECT_EQ(s.blocks_in_use, 0u);
  EXPECT_EQ(s.block_id_capacity, pool.segment_blocks());  // every spread segment was dropped again
  std::vector<BlockId> all(pool.blocks_for(kMaxTokens));
  EXPECT_TRUE(pool.allocate(kMaxTokens, all).ok());  // the whole budget in segment 0 again
}

INSTANTIATE_TEST_SUITE_P(Modes, TokenPoolStress, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& param) {
                           return param.param ? std::string("Overcommit") : std::string("Bounded");
                         });

}  // namespace
}  // namespace sagellm::kv
