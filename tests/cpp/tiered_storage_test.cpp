// The tiered store's native parts: PrefixCache::evict_detached (victims handed over still
// allocated), the slot checksum and the host slab.
#include "sagellm_kv/tier_storage.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/error.hpp"
#include "test_support.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace sagellm::kv {
namespace {

std::vector<BlockHash> chain(std::int32_t n) {
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(n));
  for (std::int32_t i = 0; i < n; ++i) tokens[static_cast<std::size_t>(i)] = i;
  BlockHasher hasher;
  return hasher.hash_blocks(std::span<const std::int32_t>(tokens), 1);
}

using testing::code_of;

TEST(EvictDetached, HandsOverVictimsStillAllocatedInPolicyOrder) {
  BlockAllocator alloc(8);
  PrefixCacheOptions o;
  o.block_size = 1;
  o.event_queue_capacity = 16;
  PrefixCache cache(o, &alloc);
  const auto d = chain(4);
  std::vector<BlockId> b(4);
  ASSERT_TRUE(alloc.allocate(b).ok());
  ASSERT_EQ(cache.insert(d, b).num_inserted, 4u);
  ASSERT_TRUE(alloc.free(b).ok());  // only the cache's references remain
  (void)cache.drain_events();

  std::vector<BlockHash> digests;
  std::vector<BlockId> victims;
  EXPECT_EQ(cache.evict_detached(3, digests, victims), 3u);
  // A chain evicts from its leaf up.
  ASSERT_EQ(digests.size(), 3u);
  EXPECT_EQ(digests[0], d[3]);
  EXPECT_EQ(digests[1], d[2]);
  EXPECT_EQ(digests[2], d[1]);
  EXPECT_EQ(victims, (std::vector<BlockId>{b[3], b[2], b[1]}));
  for (BlockId v : victims) EXPECT_EQ(alloc.ref_count(v), 1u) << "the caller now owns the reference";
  EXPECT_EQ(cache.size(), 1u);
  EXPECT_FALSE(cache.contains(d[3]));
  const auto events = cache.drain_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, PrefixCacheEvent::Type::kRemoved);
  EXPECT_EQ(events[0].digests.size(), 3u);
  cache.check_invariants();
  ASSERT_TRUE(alloc.free(victims).ok());
  EXPECT_EQ(alloc.num_allocated(), 1u);
  EXPECT_EQ(cache.stats().evictions, 3u);
}

TEST(EvictDetached, InUseBlocksAreNotVictimsAndZeroIsANoOp) {
  BlockAllocator alloc(4);
  PrefixCacheOptions o;
  o.block_size = 1;
  PrefixCache cache(o, &alloc);
  const auto d = chain(2);
  std::vector<BlockId> b(2);
  ASSERT_TRUE(alloc.allocate(b).ok());
  ASSERT_EQ(cache.insert(d, b).num_inserted, 2u);
  ASSERT_TRUE(alloc.free(b).ok());
  std::vector<BlockHash> digests;
  std::vector<BlockId> victims;
  EXPECT_EQ(cache.evict_detached(0, digests, victims), 0u);
  EXPECT_EQ(cache.match(d).num_matched, 2u);
  EXPECT_EQ(cache.evict_detached(5, digests, victims), 0u);
  EXPECT_TRUE(digests.empty());
  cache.release(d);
  EXPECT_EQ(cache.evict_detached(5, digests, victims), 2u);
  EXPECT_EQ(cache.size(), 0u);
  ASSERT_TRUE(alloc.free(victims).ok());
  EXPECT_EQ(alloc.num_allocated(), 0u);
}

TEST(EvictDetached, MetadataOnlyCacheReturnsItsOpaqueIds) {
  PrefixCacheOptions o;
  o.block_size = 1;
  PrefixCache cache(o);
  const auto d = chain(2);
  const std::vector<BlockId> b = {70, 71};
  ASSERT_EQ(cache.insert(d, b).num_inserted, 2u);
  std::vector<BlockHash> digests;
  std::vector<BlockId> victims;
  EXPECT_EQ(cache.evict_detached(2, digests, victims), 2u);
  EXPECT_EQ(victims, (std::vector<BlockId>{71, 70}));
  cache.check_invariants();
}

TEST(BlockChecksum, DetectsAnyFlippedByteAndTheLength) {
  std::vector<std::byte> data(4099);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 131 + 7);
  const std::uint64_t base = block_checksum(data);
  EXPECT_EQ(block_checksum(data), base);
  for (std::size_t pos : {std::size_t{0}, std::size_t{31}, std::size_t{2048}, data.size() - 1}) {
    auto copy = data;
    copy[pos] ^= std::byte{1};
    EXPECT_NE(block_checksum(copy), base) << pos;
  }
  EXPECT_NE(block_checksum(std::span<const std::byte>(data).first(data.size() - 1)), base);
  EXPECT_FALSE(block_checksum_algorithm().empty());
}

TEST(HostSlab, SlotsAreAlignedAndDisjoint) {
  HostSlab slab(3, 5000, "cpu", true);
  EXPECT_EQ(slab.slot_stride(), 8192u);
  EXPECT_FALSE(slab.pinned());
  for (std::uint32_t i = 0; i < 3; ++i) {
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(slab.slot(i)) % kSlotAlignment, 0u);
    std::memset(slab.slot(i), static_cast<int>(i + 1), slab.slot_bytes());
  }
  EXPECT_EQ(static_cast<int>(slab.slot(1)[0]), 2);
  EXPECT_EQ(static_cast<int>(slab.slot(0)[4999]), 1);
  EXPECT_EQ(code_of([&] { (void)slab.slot(3); }), ErrorCode::kInvalidBlock);
}

TEST(HostSlab, BadSizesAndDevicesAreTypedErrors) {
  EXPECT_EQ(code_of([] { HostSlab s(0, 16); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { HostSlab s(1, 0); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { HostSlab s(4'000'000'000u, std::size_t{1} << 20); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { HostSlab s(1, 16, "tpu:0"); }), ErrorCode::kUnknownDevice);
  // A device that does not exist is refused as the registry refuses it, "cpu:1" included (it was
  // served as "cpu": the slab took only the device type into account).
  EXPECT_EQ(code_of([] { HostSlab s(1, 16, "cpu:1"); }), ErrorCode::kUnknownDevice);
  EXPECT_FALSE(HostSlab(1, 16, "cpu:0").pinned());
}

TEST(PoolToSlots, GatherEachAndScatterEachRoundTripThroughScatteredSlots) {
  PagedKVPool pool(KVCacheSpec{2, 4, 8, DType::kFloat16, 16}, 8);
  std::vector<BlockId> ids(3);
  pool.allocate(ids);
  const std::size_t nb = pool.block_bytes();
  std::vector<std::byte> data(3 * nb);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 7 + 3);
  pool.scatter(data, ids);
  HostSlab slab(4, nb);
  std::vector<std::byte*> outs = {slab.slot(3), slab.slot(0), slab.slot(2)};
  pool.gather_each(ids, outs);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(std::memcmp(outs[i], data.data() + i * nb, nb), 0) << i;
  std::vector<BlockId> back(3);
  pool.allocate(back);
  std::vector<const std::byte*> ins(outs.begin(), outs.end());
  pool.scatter_each(ins, back);
  std::vector<std::byte> round(3 * nb);
  pool.gather(back, round);
  EXPECT_EQ(round, data);
  // Bad input changes nothing: lengths, null buffers, ids out of range, repeated destinations.
  EXPECT_EQ(code_of([&] { pool.gather_each(ids, std::span<std::byte* const>(outs).first(2)); }),
            ErrorCode::kInvalidArgument);
  std::vector<std::byte*> with_null = {slab.slot(1), nullptr, slab.slot(2)};
  EXPECT_EQ(code_of([&] { pool.gather_each(ids, with_null); }), ErrorCode::kInvalidArgument);
  const std::vector<BlockId> out_of_range = {0, 99, 1};
  EXPECT_EQ(code_of([&] { pool.gather_each(out_of_range, outs); }), ErrorCode::kInvalidBlock);
  const std::vector<BlockId> repeated = {back[0], back[0], back[1]};
  EXPECT_EQ(code_of([&] { pool.scatter_each(ins, repeated); }), ErrorCode::kInvalidArgument);
  pool.gather(back, round);
  EXPECT_EQ(round, data);
}

}  // namespace
}  // namespace sagellm::kv
