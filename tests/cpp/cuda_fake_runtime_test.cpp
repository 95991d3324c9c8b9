// The CUDA backend against a fake runtime (tests/cpp/fake_cudart): copies whose pitch exceeds the
// device's max pitch still work (the old code passed a K/V plane as the pitch of cudaMemcpy2D, which
// the runtime refuses above 2^31 - 1 bytes, here above 4 KiB), the caller's current device is
// restored after every call, and a SAGELLM_KV_CUDART that does not load is an error naming it.
// The same checks against a real GPU with a > 2 GiB plane are in kv_pool_test (label cuda).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "sagellm_kv/device.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/segment_sum.hpp"

namespace sagellm::kv {
namespace {

struct Fake {
  void* lib = nullptr;
  int (*set_device)(int) = nullptr;
  int (*get_device)(int*) = nullptr;
  int (*last_device)() = nullptr;
  long (*calls_2d)() = nullptr;
};

const Fake& fake() {
  static const Fake f = [] {
    Fake r;
    r.lib = ::dlopen(SAGELLM_KV_FAKE_CUDART, RTLD_NOW | RTLD_LOCAL);  // the handle the backend gets too
    if (r.lib == nullptr) return r;
    r.set_device = reinterpret_cast<int (*)(int)>(::dlsym(r.lib, "cudaSetDevice"));
    r.get_device = reinterpret_cast<int (*)(int*)>(::dlsym(r.lib, "cudaGetDevice"));
    r.last_device = reinterpret_cast<int (*)()>(::dlsym(r.lib, "fake_cudart_last_device"));
    r.calls_2d = reinterpret_cast<long (*)()>(::dlsym(r.lib, "fake_cudart_calls_2d"));
    return r;
  }();
  return f;
}

class FakeCuda : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ::setenv("SAGELLM_KV_CUDART", SAGELLM_KV_FAKE_CUDART, 1);
    ::setenv("FAKE_CUDART_MAX_PITCH", "4096", 1);
  }
  void SetUp() override { ASSERT_NE(fake().lib, nullptr) << ::dlerror(); }
};

KVCacheSpec spec() { return KVCacheSpec{3, 2, 8, DType::kFloat32, 4}; }  // 256-byte layer blocks

std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 31 + seed) % 251);
  return v;
}

TEST_F(FakeCuda, CopiesWithAPitchAboveTheDeviceLimitStillWork) {
  PoolOptions o;
  o.device = "cuda:0";
  PagedKVPool pool(spec(), 64, o);  // K/V plane: 64 * 256 bytes = 16 KiB > 4 KiB max pitch
  EXPECT_EQ(pool.memory_kind(), MemoryKind::kDevice);
  std::vector<BlockId> ids(5);
  pool.allocate(ids);
  const auto data = pattern(ids.size() * pool.block_bytes(), 7);
  pool.scatter(data, ids);
  std::vector<std::byte> back(data.size());
  pool.gather(ids, back);
  EXPECT_EQ(back, data);
  const std::vector<BlockId> src{ids[0], ids[1]};
  const std::vector<BlockId> dst{ids[3], ids[4]};
  pool.copy_blocks(src, dst);
  pool.gather(ids, back);
  EXPECT_TRUE(std::equal(back.begin() + 3 * static_cast<std::ptrdiff_t>(pool.block_bytes()), back.end(),
                         data.begin()));
}

TEST_F(FakeCuda, SummedGatherAndScatterOfADevicePoolCopyThenSum) {
  PoolOptions o;
  o.device = "cuda:0";
  PagedKVPool pool(spec(), 64, o);
  std::vector<BlockId> ids(40);  // 40 blocks of 1.5 KiB: 15 full segments and a tail
  pool.allocate(ids);
  const auto data = pattern(ids.size() * pool.block_bytes(), 11);
  std::vector<std::uint64_t> expected(segment_count(data.size()));
  segment_sums(data, expected);
  std::vector<std::uint64_t> sums(expected.size());
  pool.scatter_summed(data, ids, sums);
  EXPECT_EQ(sums, expected);
  std::vector<std::byte> back(data.size());
  std::fill(sums.begin(), sums.end(), 0);
  pool.gather_summed(ids, back, sums);
  EXPECT_EQ(back, data);
  EXPECT_EQ(sums, expected);
}

TEST_F(FakeCuda, SmallPitchesKeepTheStridedCopy) {
  PoolOptions o;
  o.device = "cuda:0";
  PagedKVPool pool(spec(), 8, o);  // plane: 2 KiB, within the limit
  std::vector<BlockId> ids(2);
  pool.allocate(ids);
  const long before = fake().calls_2d();
  const auto data = pattern(ids.size() * pool.block_bytes(), 3);
  pool.scatter(data, ids);
  EXPECT_EQ(fake().calls_2d() - before, 2);  // one strided copy per block
  std::vector<std::byte> back(data.size());
  pool.gather(ids, back);
  EXPECT_EQ(back, data);
}

TEST_F(FakeCuda, TheCallersCurrentDeviceIsRestored) {
  ASSERT_EQ(fake().set_device(1), 0);
  {
    PoolOptions o;
    o.device = "cuda:0";
    PagedKVPool pool(spec(), 8, o);
    EXPECT_EQ(fake().last_device(), 0);  // the work ran on cuda:0
    std::vector<BlockId> ids(1);
    pool.allocate(ids);
    std::vector<std::byte> out(pool.block_bytes());
    pool.gather(ids, out);
    int current = -1;
    ASSERT_EQ(fake().get_device(&current), 0);
    EXPECT_EQ(current, 1) << "the pool left the thread on another device";
  }  // the arena is freed here: on cuda:0, and the thread stays on cuda:1
  EXPECT_EQ(fake().last_device(), 0);
  int current = -1;
  ASSERT_EQ(fake().get_device(&current), 0);
  EXPECT_EQ(current, 1);
  ASSERT_EQ(fake().set_device(0), 0);
}

}  // namespace
}  // namespace sagellm::kv
