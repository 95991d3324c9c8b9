#include "sagellm_kv/kv_pool.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <span>
#include <vector>

#include "sagellm_kv/segment_sum.hpp"

namespace sagellm::kv {
namespace {

KVCacheSpec small_spec(DType dtype = DType::kFloat16) {
  return KVCacheSpec{2, 4, 8, dtype, 16};
}

TEST(KVCacheSpec, SizesAndValidation) {
  const KVCacheSpec s = small_spec();
  EXPECT_EQ(s.layer_block_bytes(), 16u * 4 * 8 * 2);
  EXPECT_EQ(s.block_bytes(), s.layer_block_bytes() * 2 * 2);
  KVCacheSpec bad = s;
  bad.head_dim = 0;
  try {
    bad.validate();
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("head_dim"), std::string::npos);
  }
}

TEST(DTypes, NamesRoundTrip) {
  for (const char* name : {"fp32", "fp16", "bf16", "fp8", "int8"}) {
    EXPECT_EQ(dtype_name(parse_dtype(name)), name);
  }
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBFloat16);
  EXPECT_EQ(dtype_size(DType::kFloat8E4M3), 1u);
  EXPECT_THROW((void)parse_dtype("fp64"), Error);
  EXPECT_THROW((void)parse_dtype(""), Error);
}

TEST(PagedKVPool, LayoutMapsBlocksToDisjointMemory) {
  PagedKVPool pool(small_spec(), 8);
  EXPECT_EQ(pool.total_bytes(), pool.block_bytes() * 8);
  const std::size_t lb = pool.spec().layer_block_bytes();
  EXPECT_EQ(pool.block_data(0, false, 1) - pool.block_data(0, false, 0), static_cast<std::ptrdiff_t>(lb));
  EXPECT_EQ(pool.layer_data(0, true) - pool.layer_data(0, false), static_cast<std::ptrdiff_t>(lb * 8));
  EXPECT_EQ(pool.layer_data(1, false) - pool.layer_data(0, false), static_cast<std::ptrdiff_t>(lb * 16));
  EXPECT_THROW((void)pool.layer_data(2, false), Error);
}

void fill_block(PagedKVPool& pool, BlockId id, unsigned char seed) {
  for (std::uint32_t layer = 0; layer < pool.spec().num_layers; ++layer) {
    for (bool value : {false, true}) {
      auto* p = pool.block_data(layer, value, id);
      for (std::size_t i = 0; i < pool.spec().layer_block_bytes(); ++i) {
        p[i] = static_cast<std::byte>(seed + layer * 7 + (value ? 3 : 0) + i % 251);
      }
    }
  }
}

bool same_block(const PagedKVPool& pool, BlockId a, BlockId b) {
  for (std::uint32_t layer = 0; layer < pool.spec().num_layers; ++layer) {
    for (bool value : {false, true}) {
      if (std::memcmp(pool.block_data(layer, value, a), pool.block_data(layer, value, b),
                      pool.spec().layer_block_bytes()) != 0) {
        return false;
      }
    }
  }
  return true;
}

TEST(PagedKVPool, GatherScatterRoundTripIsByteExact) {
  PagedKVPool pool(small_spec(DType::kBFloat16), 16);
  std::vector<BlockId> src(5), dst(5);
  pool.allocate(src);
  pool.allocate(dst);
  for (std::size_t i = 0; i < src.size(); ++i) fill_block(pool, src[i], static_cast<unsigned char>(i * 13));
  std::vector<std::byte> staging(src.size() * pool.block_bytes());
  pool.gather(src, staging);
  pool.scatter(staging, dst);
  for (std::size_t i = 0; i < src.size(); ++i) EXPECT_TRUE(same_block(pool, src[i], dst[i]));
  // Staging layout: block-major, then layer, then K|V.
  EXPECT_EQ(std::memcmp(staging.data() + pool.block_bytes() + pool.spec().layer_block_bytes(),
                        pool.block_data(0, true, src[1]), pool.spec().layer_block_bytes()),
            0);
}

TEST(PagedKVPool, CopyBlocksCopiesEveryLayer) {
  PagedKVPool pool(small_spec(), 4);
  std::vector<BlockId> ids(2);
  pool.allocate(ids);
  fill_block(pool, ids[0], 42);
  const std::vector<BlockId> src{ids[0]}, dst{ids[1]};
  pool.copy_blocks(src, dst);
  EXPECT_TRUE(same_block(pool, ids[0], ids[1]));
}

TEST(PagedKVPool, BadIdsAreRejectedBeforeAnyCopy) {
  PagedKVPool pool(small_spec(), 4);
  std::vector<BlockId> ids(2);
  pool.allocate(ids);
  fill_block(pool, ids[0], 1);
  fill_block(pool, ids[1], 2);
  const std::vector<BlockId> src{ids[0], ids[0]}, dst{ids[1], 3};  // 3 is not allocated
  EXPECT_THROW(pool.copy_blocks(src, dst), Error);
  EXPECT_FALSE(same_block(pool, ids[0], ids[1]));
  const std::vector<BlockId> out_of_range{9};
  std::vector<std::byte> staging(pool.block_bytes());
  EXPECT_THROW(pool.gather(out_of_range, staging), Error);
  std::vector<std::byte> wrong_size(pool.block_bytes() - 1);
  const std::vector<BlockId> one{ids[0]};
  EXPECT_THROW(pool.gather(one, wrong_size), Error);
}

TEST(PagedKVPool, StagingInsideTheArenaIsRefused) {
  PagedKVPool pool(small_spec(), 4);
  std::vector<BlockId> ids(4);
  pool.allocate(ids);
  for (BlockId id : ids) fill_block(pool, id, static_cast<unsigned char>(id + 1));
  const std::vector<BlockId> two{ids[1], ids[0]};
  // The first layer's K and V planes (4 blocks each) hold two staged blocks of 2 layers x K|V.
  const std::span<std::byte> arena(pool.layer_data(0, false), 2 * pool.block_bytes());
  EXPECT_THROW(pool.gather(two, arena), Error);
  EXPECT_THROW(pool.scatter(arena, two), Error);
  std::vector<std::byte*> outs{pool.layer_data(1, true)};
  EXPECT_THROW(pool.gather_each(std::span<const BlockId>(ids.data(), 1), outs), Error);
  std::vector<std::byte> staging(2 * pool.block_bytes());
  std::vector<std::uint64_t> sums(segment_count(staging.size()));
  const std::span<std::uint64_t> sums_in_staging(reinterpret_cast<std::uint64_t*>(staging.data()), sums.size());
  EXPECT_THROW(pool.gather_summed(two, staging, sums_in_staging), Error);
  for (BlockId id : ids) {
    for (BlockId other : ids) EXPECT_EQ(same_block(pool, id, other), id == other);
  }
}

TEST(PagedKVPool, AllocateFreeAndBudget) {
  PagedKVPool pool(small_spec(), 8);
  std::vector<BlockId> ids(8);
  pool.allocate(ids);
  std::vector<BlockId> one(1);
  EXPECT_THROW(pool.allocate(one), Error);
  pool.free(ids);
  EXPECT_EQ(pool.num_free_blocks(), 8u);
  EXPECT_THROW(pool.free(ids), Error);  // double free
  EXPECT_EQ(pool.num_free_blocks(), 8u);
  pool.set_budget_bytes(pool.block_bytes() * 3 + 1);
  EXPECT_EQ(pool.budget_blocks(), 3u);
  EXPECT_TRUE(pool.can_admit_tokens(48));
  EXPECT_FALSE(pool.can_admit_tokens(49));
  EXPECT_THROW(pool.set_budget_bytes(pool.block_bytes() * 9), Error);
}

TEST(PagedKVPool, RejectsBadConstruction) {
  EXPECT_THROW(PagedKVPool(small_spec(), 0), Error);
  KVCacheSpec bad = small_spec();
  bad.num_layers = 0;
  EXPECT_THROW(PagedKVPool(bad, 4), Error);
  PoolOptions opts;
  opts.device = "nonsense";
  EXPECT_THROW(PagedKVPool(small_spec(), 4, opts), Error);
}

}  // namespace
}  // namespace sagellm::kv

namespace sagellm::kv {
namespace {

TEST(PagedKVPoolCuda, DevicePoolRoundTripsThroughHostStaging) {
  PoolOptions opts;
  opts.device = "cuda:0";
  std::unique_ptr<PagedKVPool> pool;
  try {
    pool = std::make_unique<PagedKVPool>(small_spec(DType::kBFloat16), 64, opts);
  } catch (const Error& e) {
    ASSERT_EQ(e.code(), ErrorCode::kBackendUnavailable) << e.what();
    GTEST_SKIP() << "no usable CUDA device: " << e.what();
  }
  std::vector<BlockId> ids(6);
  pool->allocate(ids);
  std::vector<std::byte> in(ids.size() * pool->block_bytes());
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<std::byte>((i * 131 + 7) % 251);
  pool->scatter(in, ids);
  std::vector<std::byte> out(in.size());
  pool->gather(ids, out);
  EXPECT_EQ(in, out);
  // copy_blocks on the device, then read the copy back.
  const std::vector<BlockId> src{ids[0]}, dst{ids[5]};
  pool->copy_blocks(src, dst);
  std::vector<std::byte> one(pool->block_bytes());
  pool->gather(dst, one);
  EXPECT_TRUE(std::equal(one.begin(), one.end(), in.begin()));
  pool->free(ids);
  EXPECT_EQ(pool->num_free_blocks(), 64u);
}

}  // namespace
}  // namespace sagellm::kv
