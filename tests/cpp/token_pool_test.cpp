#include "sagellm_kv/token_pool.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <vector>

#include "test_support.hpp"

namespace sagellm::kv {
namespace {

using testing::code_of;

std::vector<BlockId> take(TokenPool& pool, std::uint64_t tokens) {
  std::vector<BlockId> ids(pool.blocks_for(tokens));
  const TokenGrant g = pool.allocate(tokens, ids);
  EXPECT_TRUE(g.ok()) << "allocate(" << tokens << ") refused with code " << static_cast<int>(g.code);
  return ids;
}

TEST(TokenPool, GeometryAndConstructorChecks) {
  TokenPool pool(1000, 128, /*overcommit=*/true);
  EXPECT_EQ(pool.segment_blocks(), 8u);  // ceil(1000 / 128)
  EXPECT_EQ(pool.max_segments(), 125u);  // ceil(1000 / 8)
  EXPECT_EQ(pool.max_block_ids(), 1000u);
  TokenPool bounded(1000, 128);
  EXPECT_EQ(bounded.max_segments(), 1u);
  EXPECT_EQ(bounded.max_block_ids(), 8u);
  EXPECT_EQ(pool.blocks_for(1), 1u);
  EXPECT_EQ(pool.blocks_for(128), 1u);
  EXPECT_EQ(pool.blocks_for(129), 2u);
  EXPECT_EQ(code_of([] { TokenPool p(0, 16); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { TokenPool p(16, 0); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { TokenPool p(std::uint64_t{1} << 32, 1); }), ErrorCode::kInvalidArgument);
}

TEST(TokenPool, BudgetRefusalReportsWhatIsLeftAndTakesNothing) {
  TokenPool pool(256, 16, /*overcommit=*/true);
  const auto held = take(pool, 200);
  EXPECT_EQ(held, (std::vector<BlockId>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}));
  EXPECT_TRUE(pool.can_admit(56));
  EXPECT_FALSE(pool.can_admit(57));
  std::vector<BlockId> out(pool.blocks_for(100), -7);
  const TokenGrant g = pool.allocate(100, out);
  EXPECT_EQ(g.code, ErrorCode::kBudgetExceeded);
  EXPECT_EQ(g.available, 56u);
  const TokenPoolStats s = pool.stats();
  EXPECT_EQ(s.allocated_tokens, 200u);
  EXPECT_EQ(s.allocations, 1u);
  EXPECT_EQ(s.blocks_in_use, 13u);
  EXPECT_EQ(s.blocks_peak, 13u);
}

TEST(TokenPool, BadArgumentsAreRefusedWithoutChange) {
  TokenPool pool(64, 16);
  std::vector<BlockId> wrong(3);
  EXPECT_EQ(pool.allocate(0, {}).code, ErrorCode::kInvalidArgument);
  EXPECT_EQ(pool.allocate(16, wrong).code, ErrorCode::kInvalidArgument);  // 16 tokens need 1 id
  const auto ids = take(pool, 20);
  EXPECT_EQ(pool.release(20, std::span<const BlockId>(ids).first(1)).code, ErrorCode::kInvalidArgument);
  EXPECT_EQ(pool.release(0, {}).code, ErrorCode::kInvalidArgument);
  const std::vector<BlockId> foreign{ids[0], 3};
  EXPECT_EQ(pool.release(20, foreign).code, ErrorCode::kDoubleFree);  // id 3 is free
  const std::vector<BlockId> outside{ids[0], 99};
  EXPECT_EQ(pool.release(20, outside).code, ErrorCode::kInvalidBlock);
  EXPECT_EQ(pool.stats().allocated_tokens, 20u);
  EXPECT_TRUE(pool.release(20, ids).ok());
  EXPECT_EQ(pool.release(20, ids).code, ErrorCode::kInvalidArgument);  // no tokens left to return
  const auto again = take(pool, 20);
  const auto other = take(pool, 20);
  EXPECT_TRUE(pool.release(20, other).ok());
  EXPECT_EQ(pool.release(20, other).code, ErrorCode::kDoubleFree);  // tokens remain, the ids are free
  EXPECT_TRUE(pool.release(20, again).ok());
  EXPECT_EQ(pool.stats().allocated_tokens, 0u);
  EXPECT_EQ(pool.stats().blocks_in_use, 0u);
}

TEST(TokenPool, BoundedIdsAdmitWhatTheFreeIdsHold) {
  // Ids stay below S = 3 (a paged KV tensor of 3 blocks): 17 tokens take 2 of them, so 31 tokens
  // of budget are left but one id, and can_admit / available_tokens / allocate agree on 16.
  TokenPool pool(48, 16);
  const auto first = take(pool, 17);
  EXPECT_EQ(first, (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(pool.available_tokens(), 16u);
  EXPECT_TRUE(pool.can_admit(16));
  EXPECT_FALSE(pool.can_admit(17));
  std::vector<BlockId> two(2, -7);
  const TokenGrant g = pool.allocate(17, two);
  EXPECT_EQ(g.code, ErrorCode::kBudgetExceeded);
  EXPECT_EQ(g.available, 16u);
  EXPECT_EQ(two, (std::vector<BlockId>{-7, -7}));
  EXPECT_EQ(pool.stats().allocated_tokens, 17u);
  EXPECT_EQ(pool.stats().available_tokens, 16u);
  EXPECT_EQ(take(pool, 16), (std::vector<BlockId>{2}));
  EXPECT_EQ(pool.available_tokens(), 0u);  // 15 tokens of budget, no id
  EXPECT_FALSE(pool.can_admit(1));
  EXPECT_EQ(pool.stats().block_id_capacity, 3u);
  EXPECT_TRUE(pool.release(17, first).ok());
  EXPECT_EQ(pool.available_tokens(), 32u);
  // Full blocks: the token budget alone, as with overcommit.
  TokenPool full(256, 16);
  (void)take(full, 192);
  EXPECT_EQ(full.available_tokens(), 64u);
}

TEST(TokenPool, OvercommitRoundingNeverRefusesWhatTheBudgetAdmits) {
  TokenPool pool(256, 128, /*overcommit=*/true);  // 2 full blocks; 256 one-token allocations need 256 ids
  std::vector<std::vector<BlockId>> held;
  std::set<BlockId> seen;
  for (int i = 0; i < 256; ++i) {
    held.push_back(take(pool, 1));
    seen.insert(held.back()[0]);
  }
  EXPECT_EQ(seen.size(), 256u);
  EXPECT_LT(*seen.rbegin(), static_cast<BlockId>(pool.max_block_ids()));
  EXPECT_EQ(pool.stats().block_id_capacity, 256u);
  std::vector<BlockId> one(1);
  EXPECT_EQ(pool.allocate(1, one).code, ErrorCode::kBudgetExceeded);
  for (const auto& ids : held) EXPECT_TRUE(pool.release(1, ids).ok());
  EXPECT_EQ(pool.stats().block_id_capacity, 2u);  // trailing empty segments dropped
  auto full = take(pool, 256);
  std::sort(full.begin(), full.end());
  EXPECT_EQ(full, (std::vector<BlockId>{0, 1}));
  EXPECT_EQ(pool.stats().blocks_peak, 256u);
  pool.reset_peak();
  EXPECT_EQ(pool.stats().blocks_peak, 2u);
}

TEST(TokenPool, AllocationSpreadOverSegmentsIsReleasedAsOne) {
  TokenPool pool(64, 16, /*overcommit=*/true);  // S = 4, up to 16 segments
  std::vector<std::vector<BlockId>> singles;
  for (int i = 0; i < 3; ++i) singles.push_back(take(pool, 1));
  const auto spread = take(pool, 40);  // 3 ids: one from segment 0, two from segment 1
  EXPECT_EQ(spread, (std::vector<BlockId>{3, 4, 5}));
  // A release listing an id twice, or one of another allocation, changes nothing.
  const std::vector<BlockId> dup{3, 4, 4};
  EXPECT_EQ(pool.release(40, dup).code, ErrorCode::kDoubleFree);
  const BatchStatus st = pool.release(40, std::vector<BlockId>{3, 4, 6});
  EXPECT_EQ(st.code, ErrorCode::kDoubleFree);
  EXPECT_EQ(st.index, 2);
  EXPECT_EQ(st.id, 6);
  EXPECT_EQ(pool.stats().blocks_in_use, 6u);
  EXPECT_TRUE(pool.release(40, std::vector<BlockId>{5, 3, 4}).ok());  // any order
  EXPECT_EQ(pool.stats().block_id_capacity, 4u);
  for (const auto& ids : singles) EXPECT_TRUE(pool.release(1, ids).ok());
}

TEST(TokenPool, ResetDropsEverythingButThePeak) {
  TokenPool pool(64, 16);
  (void)take(pool, 64);
  pool.reset();
  const TokenPoolStats s = pool.stats();
  EXPECT_EQ(s.allocated_tokens, 0u);
  EXPECT_EQ(s.allocations, 0u);
  EXPECT_EQ(s.blocks_in_use, 0u);
  EXPECT_EQ(s.blocks_peak, 4u);
  EXPECT_EQ(take(pool, 64), (std::vector<BlockId>{0, 1, 2, 3}));
}

}  // namespace
}  // namespace sagellm::kv
