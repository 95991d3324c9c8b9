#include "sagellm_kv/block_allocator.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace sagellm::kv {
namespace {

TEST(BlockAllocator, RejectsZeroOrHugeSizes) {
  EXPECT_THROW(BlockAllocator(0), Error);
  try {
    BlockAllocator a(0);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("got 0"), std::string::npos);
  }
  EXPECT_THROW(BlockAllocator(BlockAllocator::kMaxBlocks + 1u), Error);
}

TEST(BlockAllocator, FreshAllocatorHandsOutAscendingIds) {
  BlockAllocator a(8);
  std::vector<BlockId> ids(5);
  ASSERT_TRUE(a.allocate(ids).ok());
  EXPECT_EQ(ids, (std::vector<BlockId>{0, 1, 2, 3, 4}));
  EXPECT_EQ(a.num_available(), 3u);
  EXPECT_EQ(a.num_allocated(), 5u);
  for (BlockId id : ids) EXPECT_EQ(a.ref_count(id), 1u);
}

TEST(BlockAllocator, BatchIsAllOrNothing) {
  BlockAllocator a(4);
  std::vector<BlockId> three(3), two(2);
  ASSERT_TRUE(a.allocate(three).ok());
  const BatchStatus st = a.allocate(two);
  EXPECT_EQ(st.code, ErrorCode::kPoolFull);
  EXPECT_EQ(a.num_available(), 1u);
  EXPECT_EQ(a.allocate_one(), 3);
  EXPECT_EQ(a.allocate_one(), -1);
}

TEST(BlockAllocator, EmptyBatchesSucceed) {
  BlockAllocator a(1);
  std::vector<BlockId> none;
  EXPECT_TRUE(a.allocate(none).ok());
  EXPECT_TRUE(a.free(none).ok());
  EXPECT_EQ(a.num_available(), 1u);
}

TEST(BlockAllocator, FreedBlocksAreReused) {
  BlockAllocator a(2);
  std::vector<BlockId> ids(2);
  ASSERT_TRUE(a.allocate(ids).ok());
  ASSERT_TRUE(a.free(ids).ok());
  EXPECT_EQ(a.num_available(), 2u);
  std::vector<BlockId> again(2);
  ASSERT_TRUE(a.allocate(again).ok());
  std::sort(again.begin(), again.end());
  EXPECT_EQ(again, (std::vector<BlockId>{0, 1}));
}

TEST(BlockAllocator, RefCountsKeepSharedBlocks) {
  BlockAllocator a(4);
  const BlockId id = a.allocate_one();
  const std::vector<BlockId> one{id};
  ASSERT_TRUE(a.incref(one).ok());
  EXPECT_EQ(a.ref_count(id), 2u);
  ASSERT_TRUE(a.free(one).ok());
  EXPECT_TRUE(a.is_allocated(id));
  EXPECT_EQ(a.num_available(), 3u);
  ASSERT_TRUE(a.free(one).ok());
  EXPECT_FALSE(a.is_allocated(id));
  EXPECT_EQ(a.num_available(), 4u);
}

TEST(BlockAllocator, DuplicateIdsInOneFreeDropOneReferenceEach) {
  BlockAllocator a(4);
  const BlockId id = a.allocate_one();
  const std::vector<BlockId> one{id};
  ASSERT_TRUE(a.incref(one).ok());
  const std::vector<BlockId> twice{id, id};
  ASSERT_TRUE(a.free(twice).ok());
  EXPECT_EQ(a.num_available(), 4u);
}

TEST(BlockAllocator, DoubleFreeIsReportedAndChangesNothing) {
  BlockAllocator a(4);
  std::vector<BlockId> ids(2);
  ASSERT_TRUE(a.allocate(ids).ok());
  const std::vector<BlockId> bad{ids[0], ids[0]};  // second appearance has no reference left
  const BatchStatus st = a.free(bad);
  EXPECT_EQ(st.code, ErrorCode::kDoubleFree);
  EXPECT_EQ(st.index, 1);
  EXPECT_EQ(a.ref_count(ids[0]), 1u);
  EXPECT_EQ(a.num_available(), 2u);
  const std::vector<BlockId> never{3};
  EXPECT_EQ(a.free(never).code, ErrorCode::kDoubleFree);
  EXPECT_EQ(a.num_available(), 2u);
}

TEST(BlockAllocator, OutOfRangeIdsAreReportedAndChangeNothing) {
  BlockAllocator a(4);
  std::vector<BlockId> ids(2);
  ASSERT_TRUE(a.allocate(ids).ok());
  const std::vector<BlockId> bad{ids[0], 7};
  const BatchStatus st = a.free(bad);
  EXPECT_EQ(st.code, ErrorCode::kInvalidBlock);
  EXPECT_EQ(st.index, 1);
  EXPECT_EQ(a.ref_count(ids[0]), 1u);
  const std::vector<BlockId> negative{-1};
  EXPECT_EQ(a.incref(negative).code, ErrorCode::kInvalidBlock);
  EXPECT_THROW((void)a.ref_count(9), Error);
}

TEST(BlockAllocator, IncrefOfFreeBlockIsRefusedAndRolledBack) {
  BlockAllocator a(4);
  const BlockId id = a.allocate_one();
  const std::vector<BlockId> mixed{id, 3};
  EXPECT_EQ(a.incref(mixed).code, ErrorCode::kInvalidBlock);
  EXPECT_EQ(a.ref_count(id), 1u);
  EXPECT_EQ(a.ref_count(3), 0u);
}

TEST(BlockAllocator, LimitCapsAllocation) {
  BlockAllocator a(8);
  a.set_limit(3);
  EXPECT_EQ(a.num_available(), 3u);
  std::vector<BlockId> four(4);
  EXPECT_EQ(a.allocate(four).code, ErrorCode::kPoolFull);
  std::vector<BlockId> three(3);
  ASSERT_TRUE(a.allocate(three).ok());
  a.set_limit(1);  // below what is in use: refuse until enough are freed
  EXPECT_EQ(a.num_available(), 0u);
  EXPECT_EQ(a.allocate_one(), -1);
  ASSERT_TRUE(a.free(three).ok());
  EXPECT_EQ(a.num_available(), 1u);
  a.set_limit(8);
  EXPECT_EQ(a.num_available(), 8u);
  EXPECT_THROW(a.set_limit(9), Error);
}

TEST(BlockAllocator, MetadataIsAtMostSixteenBytesPerBlock) {
  EXPECT_LE(BlockAllocator::metadata_bytes_per_block(), 16u);
}

}  // namespace
}  // namespace sagellm::kv

namespace sagellm::kv {
namespace {

TEST(BlockAllocatorBatch, RefusalNamesThePositionAndTheIdAsRead) {
  BlockAllocator a(8);
  std::vector<BlockId> ids(3);
  ASSERT_TRUE(a.allocate(ids).ok());
  const std::vector<BlockId> bad{ids[0], ids[1], ids[1], ids[2]};
  const BatchStatus st = a.free(bad);
  EXPECT_EQ(st.code, ErrorCode::kDoubleFree);
  EXPECT_EQ(st.index, 2);
  EXPECT_EQ(st.id, ids[1]);
  EXPECT_FALSE(st.partial);
  for (BlockId id : ids) EXPECT_EQ(a.ref_count(id), 1u);  // nothing changed
  EXPECT_EQ(a.num_available(), 5u);
}

TEST(BlockAllocatorBatch, LongBatchesCheckRepeatsExactly) {
  // Above the filter's size the check sorts a copy: still exact, still all or nothing.
  constexpr std::uint32_t kN = 1000;
  BlockAllocator a(kN);
  std::vector<BlockId> ids(600);
  ASSERT_TRUE(a.allocate(ids).ok());
  ASSERT_TRUE(a.incref(std::span<const BlockId>(ids).first(10)).ok());  // 10 blocks with 2 refs
  std::vector<BlockId> batch(ids);
  batch.insert(batch.end(), ids.begin(), ids.begin() + 10);  // each second appearance is covered
  batch.push_back(ids[500]);                                  // this one is not
  const BatchStatus st = a.free(batch);
  EXPECT_EQ(st.code, ErrorCode::kDoubleFree);
  EXPECT_EQ(st.index, 610);
  EXPECT_EQ(st.id, ids[500]);
  EXPECT_EQ(a.ref_count(ids[0]), 2u);
  EXPECT_EQ(a.num_available(), kN - 600);
  batch.pop_back();
  ASSERT_TRUE(a.free(batch).ok());
  EXPECT_EQ(a.num_available(), kN);
}

TEST(BlockAllocatorBatch, FilterCollisionsAreCountedExactly) {
  // Ids 4096 apart share a filter bit: the exact count must tell them apart.
  BlockAllocator a(3 * 4096);
  std::vector<BlockId> all(3 * 4096);
  ASSERT_TRUE(a.allocate(all).ok());
  const std::vector<BlockId> distinct{5, 4096 + 5, 2 * 4096 + 5};
  ASSERT_TRUE(a.free(distinct).ok());
  EXPECT_EQ(a.num_available(), 3u);
  const std::vector<BlockId> repeat{7, 4096 + 7, 7};
  EXPECT_EQ(a.free(repeat).code, ErrorCode::kDoubleFree);
  EXPECT_EQ(a.ref_count(7), 1u);
}

TEST(BlockAllocatorBatch, IncrefRefusalDropsOnlyWhatItAdded) {
  BlockAllocator a(8);
  std::vector<BlockId> ids(2);
  ASSERT_TRUE(a.allocate(ids).ok());
  const std::vector<BlockId> batch{ids[0], ids[0], ids[1], 7};  // 7 is free
  const BatchStatus st = a.incref(batch);
  EXPECT_EQ(st.code, ErrorCode::kInvalidBlock);
  EXPECT_EQ(st.index, 3);
  EXPECT_EQ(st.id, 7);
  EXPECT_EQ(a.ref_count(ids[0]), 1u);
  EXPECT_EQ(a.ref_count(ids[1]), 1u);
  EXPECT_EQ(a.num_available(), 6u);
}

TEST(BlockAllocatorBatch, LimitIsConsistentAfterManyChanges) {
  BlockAllocator a(16);
  std::vector<BlockId> ids(4);
  ASSERT_TRUE(a.allocate(ids).ok());
  for (std::uint32_t l : {0u, 16u, 3u, 10u}) a.set_limit(l);
  EXPECT_EQ(a.limit(), 10u);
  EXPECT_EQ(a.num_available(), 6u);
  EXPECT_EQ(a.num_allocated(), 4u);
  EXPECT_THROW(a.set_limit(17), Error);
}

}  // namespace
}  // namespace sagellm::kv
