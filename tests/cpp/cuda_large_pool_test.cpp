// On a real GPU: a pool whose K/V layer plane exceeds 2 GiB (above cudaDevAttrMaxPitch on current
// GPUs) gathers, scatters and copies blocks correctly. Skips without a usable CUDA device or when
// the device lacks the ~4 GiB it needs. Label cuda.
#include <gtest/gtest.h>

#include <vector>

#include "sagellm_kv/error.hpp"
#include "sagellm_kv/kv_pool.hpp"

namespace sagellm::kv {
namespace {

TEST(CudaLargePool, PlaneAboveTwoGiBCopiesCorrectly) {
  // 1 layer, 8 heads x 128 dims x 16 tokens fp16: 32 KiB per block and plane; 65,600 blocks make
  // each plane 2.0 GiB + 3 MiB (> 2^31 - 1 bytes) and the pool 4 GiB.
  const KVCacheSpec spec{1, 8, 128, DType::kFloat16, 16};
  constexpr std::uint32_t kBlocks = 65600;
  ASSERT_GT(spec.layer_block_bytes() * kBlocks, std::size_t{2147483647});
  PoolOptions o;
  o.device = "cuda:0";
  o.zero_fill = false;
  std::unique_ptr<PagedKVPool> pool;
  try {
    pool = std::make_unique<PagedKVPool>(spec, kBlocks, o);
  } catch (const Error& e) {
    GTEST_SKIP() << "no usable CUDA device with 4 GiB free: " << e.what();
  }
  std::vector<BlockId> all(kBlocks);
  pool->allocate(all);
  // Blocks at both ends of the planes: the V plane starts beyond 2 GiB.
  const std::vector<BlockId> ids{0, 1, static_cast<BlockId>(kBlocks - 2), static_cast<BlockId>(kBlocks - 1)};
  std::vector<std::byte> data(ids.size() * pool->block_bytes());
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>((i * 131 + 17) % 253);
  pool->scatter(data, ids);
  std::vector<std::byte> back(data.size());
  pool->gather(ids, back);
  EXPECT_EQ(back, data);
  const std::vector<BlockId> src{0, static_cast<BlockId>(kBlocks - 1)};
  const std::vector<BlockId> dst{5, 6};
  pool->copy_blocks(src, dst);
  std::vector<std::byte> copied(2 * pool->block_bytes());
  pool->gather(dst, copied);
  const std::size_t b = pool->block_bytes();
  EXPECT_TRUE(std::equal(copied.begin(), copied.begin() + static_cast<std::ptrdiff_t>(b), data.begin()));
  EXPECT_TRUE(std::equal(copied.begin() + static_cast<std::ptrdiff_t>(b), copied.end(),
                         data.begin() + static_cast<std::ptrdiff_t>(3 * b)));
  pool->free(all);
}

}  // namespace
}  // namespace sagellm::kv
