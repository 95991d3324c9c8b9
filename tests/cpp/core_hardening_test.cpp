// Regression tests of the core hardening: an insert that fails at any point changes nothing (no
// leaked allocator reference, no node live but unindexed, clear() still terminates); copy_blocks
// and scatter refuse order-dependent id lists; a CPU pool is host memory; register_backend flushes
// only its own type.
#include <gtest/gtest.h>

#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "device/backends.hpp"
#include "prefix/fault_injection.hpp"
#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/device.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/prefix_cache.hpp"
#include "test_support.hpp"

namespace sagellm::kv {
namespace {

std::vector<BlockHash> digests(std::int32_t base, std::int32_t n) {
  static BlockHasher hasher;
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(n));
  for (std::int32_t i = 0; i < n; ++i) tokens[static_cast<std::size_t>(i)] = base + i;
  return hasher.hash_blocks(tokens, 1);
}

// The site the hook fails at, and what it throws.
const char* g_fail_site = nullptr;
bool g_throw_bad_alloc = false;

void failing_hook(const char* site) {
  if (g_fail_site != nullptr && std::strcmp(site, g_fail_site) == 0) {
    if (g_throw_bad_alloc) throw std::bad_alloc();
    throw Error(ErrorCode::kInternal, std::string("injected failure at ") + site);
  }
}

class InsertFaults : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { detail::set_prefix_fault_hook(&failing_hook); }
  void TearDown() override {
    detail::set_prefix_fault_hook(nullptr);
    g_fail_site = nullptr;
    g_throw_bad_alloc = false;
  }
};

TEST_P(InsertFaults, AFailedInsertChangesNothing) {
  for (const bool bad_alloc : {false, true}) {
    for (const bool bounded : {false, true}) {
      BlockAllocator alloc(64);
      PrefixCacheOptions o;
      o.block_size = 1;
      o.policy = EvictionPolicy::kTtl;
      o.ttl_seconds = 1.0;
      o.event_queue_capacity = 16;
      if (bounded) o.capacity_blocks = 6;
      std::int64_t now = 0;
      o.clock_ns = [&now] { return now; };
      PrefixCache cache(o, &alloc);
      // Something cached already, so a bounded insert has to evict.
      std::vector<BlockId> first(4);
      ASSERT_TRUE(alloc.allocate(first).ok());
      const auto d0 = digests(0, 4);
      ASSERT_EQ(cache.insert(d0, first).num_inserted, 4u);
      ASSERT_TRUE(alloc.free(first).ok());  // the cache's references remain
      (void)cache.drain_events();

      std::vector<BlockId> blocks(5);
      ASSERT_TRUE(alloc.allocate(blocks).ok());
      const auto d1 = digests(100, 5);
      g_fail_site = GetParam();
      g_throw_bad_alloc = bad_alloc;
      const std::uint32_t available = alloc.num_available();
      EXPECT_ANY_THROW((void)cache.insert(d1, blocks)) << GetParam();
      g_fail_site = nullptr;
      // Nothing changed: no reference taken, nothing cached, no event, invariants hold.
      for (BlockId b : blocks) EXPECT_EQ(alloc.ref_count(b), 1u) << GetParam();
      EXPECT_EQ(alloc.num_available(), available);
      EXPECT_EQ(cache.size(), 4u);
      for (const auto& d : d1) EXPECT_FALSE(cache.contains(d));
      EXPECT_TRUE(cache.drain_events().empty());
      cache.check_invariants();
      // And the cache still works: the same insert now succeeds, and clear() returns everything.
      EXPECT_EQ(cache.insert(d1, blocks).num_cached(), 5u);
      cache.check_invariants();
      ASSERT_TRUE(alloc.free(blocks).ok());
      const std::uint32_t cached = cache.size();
      EXPECT_EQ(cache.clear(), cached);
      EXPECT_EQ(alloc.num_available(), 64u);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sites, InsertFaults, ::testing::Values("clock", "reserve", "event", "prepared"));

TEST(InsertFaultsEmit, AnEventTheQueueCannotTakeIsCountedAsDropped) {
  detail::set_prefix_fault_hook(&failing_hook);
  g_fail_site = "emit";
  BlockAllocator alloc(8);
  PrefixCacheOptions o;
  o.block_size = 1;
  o.event_queue_capacity = 4;
  PrefixCache cache(o, &alloc);
  std::vector<BlockId> blocks(2);
  ASSERT_TRUE(alloc.allocate(blocks).ok());
  EXPECT_EQ(cache.insert(digests(0, 2), blocks).num_inserted, 2u);  // the insert itself succeeds
  g_fail_site = nullptr;
  detail::set_prefix_fault_hook(nullptr);
  const auto events = cache.drain_events();  // only the mark that the stored event was lost
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].type, PrefixCacheEvent::Type::kCleared);
  EXPECT_TRUE(events[0].events_lost);
  EXPECT_EQ(cache.stats().events_dropped, 1u);
  cache.check_invariants();
  ASSERT_TRUE(alloc.free(blocks).ok());
}

TEST(InsertFaultsClock, AThrowingClockLeaksNoReference) {
  // The public injection point: a user clock that throws (no test hook involved).
  BlockAllocator alloc(8);
  PrefixCacheOptions o;
  o.block_size = 1;
  o.policy = EvictionPolicy::kTtl;
  bool fail = true;
  o.clock_ns = [&fail]() -> std::int64_t {
    if (fail) throw std::runtime_error("clock unavailable");
    return 0;
  };
  PrefixCache cache(o, &alloc);
  std::vector<BlockId> blocks(3);
  ASSERT_TRUE(alloc.allocate(blocks).ok());
  EXPECT_THROW((void)cache.insert(digests(0, 3), blocks), std::runtime_error);
  for (BlockId b : blocks) EXPECT_EQ(alloc.ref_count(b), 1u);
  EXPECT_EQ(cache.size(), 0u);
  cache.check_invariants();
  fail = false;
  EXPECT_EQ(cache.insert(digests(0, 3), blocks).num_inserted, 3u);
  ASSERT_TRUE(alloc.free(blocks).ok());
  EXPECT_EQ(cache.clear(), 3u);
  EXPECT_EQ(alloc.num_available(), 8u);
}

TEST(InsertArguments, MetadataOnlyFailureLeavesNoPlaceholder) {
  detail::set_prefix_fault_hook(&failing_hook);
  g_fail_site = "prepared";
  PrefixCacheOptions o;
  o.block_size = 1;
  PrefixCache cache(o);
  const std::vector<BlockId> blocks{1000, 2000};
  EXPECT_ANY_THROW((void)cache.insert(digests(0, 2), blocks));
  g_fail_site = nullptr;
  detail::set_prefix_fault_hook(nullptr);
  cache.check_invariants();  // the block map holds exactly the live nodes
  EXPECT_EQ(cache.insert(digests(0, 2), blocks).num_inserted, 2u);
  cache.check_invariants();
}

// The caller's token ids change while insert runs (as another thread could change them: the hook
// runs inside the call, under the cache's lock, just before the stored event is built). insert
// checked the ids before taking the lock and then copied them again into the event, so a negative
// id reached the event stream (which routers read as unsigned 32-bit ids). What goes into the event
// is what is checked now: the insert is refused and changes nothing.
std::vector<std::int32_t>* g_changed_tokens = nullptr;
void change_tokens_hook(const char* site) {
  if (std::strcmp(site, "event") == 0 && g_changed_tokens != nullptr) (*g_changed_tokens)[1] = -5;
}

TEST(InsertArguments, TokenIdsChangedDuringTheCallNeverReachAnEvent) {
  BlockAllocator alloc(8);
  PrefixCacheOptions o;
  o.block_size = 1;
  o.event_queue_capacity = 16;
  PrefixCache cache(o, &alloc);
  std::vector<BlockId> blocks(2);
  ASSERT_TRUE(alloc.allocate(blocks).ok());
  std::vector<std::int32_t> tokens{7, 8};
  InsertOptions io;
  io.token_ids = tokens;
  g_changed_tokens = &tokens;
  detail::set_prefix_fault_hook(&change_tokens_hook);
  const ErrorCode code = testing::code_of([&] { (void)cache.insert(digests(0, 2), blocks, io); });
  detail::set_prefix_fault_hook(nullptr);
  g_changed_tokens = nullptr;
  EXPECT_EQ(code, ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache.size(), 0u);
  for (const PrefixCacheEvent& ev : cache.drain_events()) {
    for (const std::int32_t t : ev.token_ids) EXPECT_GE(t, 0) << "a negative token id reached an event";
  }
  for (BlockId b : blocks) EXPECT_EQ(alloc.ref_count(b), 1u);
  cache.check_invariants();
  ASSERT_TRUE(alloc.free(blocks).ok());
}

KVCacheSpec tiny_spec() { return KVCacheSpec{2, 1, 4, DType::kFloat32, 2}; }

std::vector<std::byte> read_block(const PagedKVPool& pool, BlockId id) {
  std::vector<std::byte> out(pool.block_bytes());
  const std::vector<BlockId> one{id};
  pool.gather(one, out);
  return out;
}

TEST(PoolSemantics, CopyBlocksRefusesOrderDependentPairs) {
  PagedKVPool pool(tiny_spec(), 8);
  std::vector<BlockId> ids(4);
  pool.allocate(ids);
  for (BlockId id : ids) {
    std::vector<std::byte> fill(pool.block_bytes(), static_cast<std::byte>(id + 1));
    const std::vector<BlockId> one{id};
    pool.scatter(fill, one);
  }
  const auto before = read_block(pool, ids[2]);
  const auto code = [&](std::vector<BlockId> src, std::vector<BlockId> dst) {
    try {
      pool.copy_blocks(src, dst);
    } catch (const Error& e) {
      return e.code();
    }
    return ErrorCode::kOk;
  };
  // A chain: block 1 is written and read. Refused before anything is copied.
  EXPECT_EQ(code({ids[0], ids[1]}, {ids[1], ids[2]}), ErrorCode::kInvalidArgument);
  EXPECT_EQ(read_block(pool, ids[2]), before);
  // A destination written twice.
  EXPECT_EQ(code({ids[0], ids[1]}, {ids[3], ids[3]}), ErrorCode::kInvalidArgument);
  // A swap is order-dependent too.
  EXPECT_EQ(code({ids[0], ids[1]}, {ids[1], ids[0]}), ErrorCode::kInvalidArgument);
  // Self pairs are no-ops; independent pairs copy; several pairs may read one source.
  EXPECT_EQ(code({ids[0], ids[0], ids[0]}, {ids[0], ids[2], ids[3]}), ErrorCode::kOk);
  EXPECT_EQ(read_block(pool, ids[2]), read_block(pool, ids[0]));
  EXPECT_EQ(read_block(pool, ids[3]), read_block(pool, ids[0]));
}

TEST(PoolSemantics, ScatterRefusesRepeatedIds) {
  PagedKVPool pool(tiny_spec(), 8);
  std::vector<BlockId> ids(2);
  pool.allocate(ids);
  std::vector<std::byte> data(2 * pool.block_bytes(), std::byte{7});
  const std::vector<BlockId> twice{ids[0], ids[0]};
  try {
    pool.scatter(data, twice);
    FAIL() << "scatter with a repeated id was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("positions 0 and 1"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_block(pool, ids[0]), std::vector<std::byte>(pool.block_bytes(), std::byte{0}));
  // Gather may read a block twice.
  std::vector<std::byte> out(2 * pool.block_bytes());
  pool.gather(twice, out);
}

TEST(PoolSemantics, CpuPoolIsHostMemory) {
  PagedKVPool pool(tiny_spec(), 4);
  EXPECT_EQ(pool.memory_kind(), MemoryKind::kHost);
}

TEST(PoolSemantics, BatchErrorsNameTheIdAsRead) {
  PagedKVPool pool(tiny_spec(), 4);
  std::vector<BlockId> ids(1);
  pool.allocate(ids);
  const std::vector<BlockId> bad{ids[0], 3};
  try {
    pool.free(bad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDoubleFree);
    EXPECT_NE(std::string(e.what()).find("block id 3 at position 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("nothing was freed"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(pool.allocator().is_allocated(ids[0]));
}

// A "device" whose memory is never touched: it hands out a placeholder address of any size and
// counts the copies it is asked for instead of making them.
class UntouchedMemory final : public DeviceAllocator {
 public:
  explicit UntouchedMemory(DeviceId id) : id_(std::move(id)) {}
  const DeviceId& device() const noexcept override { return id_; }
  void copy(void*, const void*, std::size_t, CopyKind) override { ++copies; }
  void copy_2d(void*, std::size_t, const void*, std::size_t, std::size_t, std::size_t, CopyKind) override { ++copies; }
  void zero(void*, std::size_t, MemoryKind) override {}
  std::size_t copies = 0;

 protected:
  void* do_allocate(const AllocationRequest&) override { return placeholder_; }
  void do_deallocate(void*, std::size_t, MemoryKind) noexcept override {}

 private:
  DeviceId id_;
  alignas(256) std::byte placeholder_[256] = {};
};

// The staging size ids.size() * block_bytes() must not wrap: 2^24 ids of a 1 TiB block (the
// largest block a spec may describe) make exactly 2^64 bytes, which wrapped to 0, so an empty
// buffer passed the size check and every block was copied through it. (scatter cannot get there:
// its ids are distinct, so they fit the pool.)
TEST(PoolSemantics, StagingSizeThatOverflowsIsRefusedBeforeAnyCopy) {
  auto memory = std::make_shared<UntouchedMemory>(DeviceId{"untouched", 0});
  register_backend("untouched", [memory](const DeviceId&) { return memory; });
  KVCacheSpec spec;
  spec.num_layers = 4;
  spec.num_kv_heads = 4096;
  spec.head_dim = 8192;
  spec.block_size = 4096;
  spec.dtype = DType::kInt8;
  PagedKVPool pool(spec, 1, PoolOptions{"untouched", false, false, false});
  ASSERT_EQ(pool.block_bytes(), std::size_t{1} << 40);
  const std::vector<BlockId> ids(std::size_t{1} << 24, 0);
  std::byte none[1] = {};
  const std::span<std::byte> empty(none, 0);
  std::vector<std::uint64_t> no_sums;
  const auto refused = [](auto&& call) {
    try {
      call();
    } catch (const Error& e) {
      return e.code() == ErrorCode::kInvalidArgument;
    }
    return false;
  };
  EXPECT_TRUE(refused([&] { pool.gather(ids, empty); }));
  EXPECT_TRUE(refused([&] { pool.gather_summed(ids, empty, no_sums); }));
  EXPECT_EQ(memory->copies, 0u);
}

// A backend that counts how often it was asked for an allocator.
int g_made = 0;
std::shared_ptr<DeviceAllocator> counting_cpu(const DeviceId& id) {
  ++g_made;
  return detail::make_cpu_allocator(DeviceId{id.type, 0});
}

TEST(Registry, RegisteringATypeFlushesOnlyThatType) {
  const auto cpu_before = allocator_for("cpu");
  register_backend("c", counting_cpu);  // a name that is a prefix of "cpu" and "cuda"
  EXPECT_EQ(allocator_for("cpu"), cpu_before) << "registering 'c' flushed the cpu allocator";
  register_backend("hardening_test", counting_cpu);
  (void)allocator_for("hardening_test:0");
  (void)allocator_for("hardening_test:0");
  EXPECT_EQ(g_made, 1);
  register_backend("hardening_test", counting_cpu);  // replaces the factory and flushes its devices
  (void)allocator_for("hardening_test:0");
  EXPECT_EQ(g_made, 2);
}

}  // namespace
}  // namespace sagellm::kv
