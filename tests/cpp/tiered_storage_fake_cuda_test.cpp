// The host tier of a CUDA device pool: pinned memory from the CUDA backend, and block copies between
// device blocks and host slots. Runs against the fake CUDA runtime (host memory behind the CUDA API),
// so it checks the calls and the bytes, not DMA speed.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/tier_storage.hpp"

namespace sagellm::kv {
namespace {

class FakeCudaTier : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { ::setenv("SAGELLM_KV_CUDART", SAGELLM_KV_FAKE_CUDART, 1); }
};

TEST_F(FakeCudaTier, HostSlabIsPinnedAndRoundTripsDeviceBlocks) {
  PoolOptions o;
  o.device = "cuda:0";
  PagedKVPool pool(KVCacheSpec{2, 2, 8, DType::kFloat32, 4}, 16, o);
  ASSERT_EQ(pool.memory_kind(), MemoryKind::kDevice);
  HostSlab slab(4, pool.block_bytes(), "cuda:0");
  EXPECT_TRUE(slab.pinned());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(slab.slot(1)) % kSlotAlignment, 0u);

  std::vector<BlockId> ids(3);
  pool.allocate(ids);
  std::vector<std::byte> data(3 * pool.block_bytes());
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 13 + 1);
  pool.scatter(data, ids);
  std::vector<std::byte*> slots = {slab.slot(2), slab.slot(0), slab.slot(3)};
  pool.gather_each(ids, slots);  // device -> pinned host
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(std::memcmp(slots[i], data.data() + i * pool.block_bytes(), pool.block_bytes()), 0);
  }
  std::vector<BlockId> back(3);
  pool.allocate(back);
  std::vector<const std::byte*> ins(slots.begin(), slots.end());
  pool.scatter_each(ins, back);  // pinned host -> device
  std::vector<std::byte> round(data.size());
  pool.gather(back, round);
  EXPECT_EQ(round, data);
}

}  // namespace
}  // namespace sagellm::kv
