// Several threads use one paged KV pool at once, as its header allows: allocate, free and share
// blocks (lock-free), scatter into the blocks they own, gather from the blocks they hold (several
// holders of a shared block read it at the same time), copy_blocks between their own blocks, and
// refused frees and increfs, while one thread moves the budget (often below the blocks in use).
// Each block's bytes are a pattern of the tag its writer chose; every holder checks the pattern
// before it lets go. A block handed to a second owner while held shows as a broken pattern, and
// under TSan a write that the allocator did not order after the previous holders' reads is a
// reported race. Fixed seeds and thread counts; runs under TSan in CI (label stress).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "sagellm_kv/error.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "test_support.hpp"

namespace sagellm::kv {
namespace {

using testing::kUnderTsan;
using testing::kSlowBuild;

constexpr std::uint32_t kBlocks = 192;
constexpr int kThreads = 4;
constexpr std::size_t kSlots = 8;  // mailbox entries per thread

// Byte i of a block written with `tag`.
std::byte pattern(std::uint32_t tag, std::size_t i) {
  return static_cast<std::byte>((tag * 131u + i * 7u) >> 3);
}

void fill(std::vector<std::byte>& staging, std::size_t block_bytes, std::span<const std::uint32_t> tags) {
  staging.resize(tags.size() * block_bytes);
  for (std::size_t b = 0; b < tags.size(); ++b) {
    for (std::size_t i = 0; i < block_bytes; ++i) staging[b * block_bytes + i] = pattern(tags[b], i);
  }
}

bool holds(std::span<const std::byte> bytes, std::uint32_t tag) {
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    if (bytes[i] != pattern(tag, i)) return false;
  }
  return true;
}

TEST(PagedKVPoolStress, OwnersWriteSharersReadAndBlocksPassOnlyThroughTheAllocator) {
  // 2 layers x K/V x 16 tokens x 2 heads x 8 dims x fp16: 2 KiB a block.
  PagedKVPool pool(KVCacheSpec{2, 2, 8, DType::kFloat16, 16}, kBlocks);
  const std::size_t bb = pool.block_bytes();
  const int rounds = kUnderTsan || kSlowBuild ? 6000 : 40000;
  std::array<std::array<std::atomic<std::uint64_t>, kSlots>, kThreads> mailbox{};  // id << 32 | tag
  std::atomic<std::uint64_t> broken{0}, refused{0}, shared{0}, copies{0};
  std::atomic<int> running{kThreads};

  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<std::uint32_t>(99 + tid));
    struct Held {
      BlockId id;
      std::uint32_t tag;
      bool shared;  // another thread may hold a reference too
    };
    struct Leave {  // counts the worker out once, also when a failed ASSERT returns early
      std::atomic<int>& running;
      bool left = false;
      void now() {
        if (!left) running.fetch_sub(1, std::memory_order_acq_rel);
        left = true;
      }
      ~Leave() { now(); }
    } leave{running};
    std::vector<Held> mine;
    std::vector<BlockId> ids;
    std::vector<std::uint32_t> tags;
    std::vector<std::byte> staging;
    std::uint32_t counter = 0;
    const auto next_tag = [&] { return (static_cast<std::uint32_t>(tid + 1) << 28) | (++counter & 0x0FFFFFFFu); };
    const auto read_mail = [&](bool check) {
      for (auto& slot : mailbox[static_cast<std::size_t>(tid)]) {
        const std::uint64_t got = slot.exchange(0, std::memory_order_acquire);
        if (got == 0) continue;
        const auto id = static_cast<BlockId>(got >> 32);
        if (check) {
          staging.resize(bb);
          pool.gather(std::span<const BlockId>(&id, 1), staging);  // other holders may read it meanwhile
          if (!holds(staging, static_cast<std::uint32_t>(got))) broken.fetch_add(1, std::memory_order_relaxed);
        }
        pool.free(std::span<const BlockId>(&id, 1));
      }
    };
    const auto drop = [&](std::size_t from) {  // gathers, checks and frees mine[from, end)
      ids.clear();
      for (std::size_t i = from; i < mine.size(); ++i) ids.push_back(mine[i].id);
      staging.resize(ids.size() * bb);
      pool.gather(ids, staging);
      for (std::size_t i = from; i < mine.size(); ++i) {
        if (!holds(std::span<const std::byte>(staging).subspan((i - from) * bb, bb), mine[i].tag)) {
          broken.fetch_add(1, std::memory_order_relaxed);
        }
      }
      mine.resize(from);
      pool.free(ids);
    };
    for (int round = 0; round < rounds; ++round) {
      read_mail(true);
      const auto action = static_cast<unsigned>(rng() % 12);
      if (action < 4 || mine.empty()) {
        ids.assign(1 + rng() % 8, -1);
        try {
          pool.allocate(ids);
        } catch (const Error& e) {
          ASSERT_EQ(e.code(), ErrorCode::kPoolFull);
          refused.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        tags.clear();
        for (std::size_t i = 0; i < ids.size(); ++i) tags.push_back(next_tag());
        fill(staging, bb, tags);
        pool.scatter(staging, ids);  // this owner's writes
        for (std::size_t i = 0; i < ids.size(); ++i) mine.push_back({ids[i], tags[i], false});
      } else if (action < 7) {
        drop(mine.size() - std::min<std::size_t>(mine.size(), 1 + rng() % 6));
      } else if (action == 7) {
        // Copy-on-write of the newest block into a fresh one of its own.
        BlockId fresh = -1;
        try {
          pool.allocate(std::span<BlockId>(&fresh, 1));
        } catch (const Error& e) {
          ASSERT_EQ(e.code(), ErrorCode::kPoolFull);
          refused.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        const Held src = mine.back();
        pool.copy_blocks(std::span<const BlockId>(&src.id, 1), std::span<const BlockId>(&fresh, 1));
        mine.push_back({fresh, src.tag, false});
        copies.fetch_add(1, std::memory_order_relaxed);
      } else if (action == 8) {
        // Share the newest block: one more reference, handed over by mailbox (the owner keeps reading
        // it too; nobody writes a shared block).
        Held& h = mine.back();
        h.shared = true;
        pool.incref(std::span<const BlockId>(&h.id, 1));
        const auto to = static_cast<std::size_t>((static_cast<unsigned>(tid) + 1 + rng() % (kThreads - 1)) % kThreads);
        std::uint64_t empty = 0;
        const std::uint64_t mail = (static_cast<std::uint64_t>(h.id) << 32) | h.tag;
        if (mailbox[to][rng() % kSlots].compare_exchange_strong(empty, mail, std::memory_order_release,
                                                                std::memory_order_relaxed)) {
          shared.fetch_add(1, std::memory_order_relaxed);
        } else {
          pool.free(std::span<const BlockId>(&h.id, 1));  // full: take the reference back
        }
      } else if (action == 9) {
        // Refused free: the held blocks, then one nobody else holds again. Nothing is freed.
        const auto solo = std::find_if(mine.begin(), mine.end(), [](const Held& h) { return !h.shared; });
        if (solo == mine.end()) continue;
        ids.clear();
        for (const Held& h : mine) ids.push_back(h.id);
        ids.push_back(solo->id);
        try {
          pool.free(ids);
          ADD_FAILURE() << "a double free was accepted";
        } catch (const Error& e) {
          ASSERT_EQ(e.code(), ErrorCode::kDoubleFree);
        }
        refused.fetch_add(1, std::memory_order_relaxed);
      } else if (action == 10) {
        // Refused incref: the held blocks, then an id out of range. No count changes.
        ids.clear();
        for (const Held& h : mine) ids.push_back(h.id);
        ids.push_back(static_cast<BlockId>(kBlocks + rng() % 4));
        try {
          pool.incref(ids);
          ADD_FAILURE() << "an incref of an id out of range was accepted";
        } catch (const Error& e) {
          ASSERT_EQ(e.code(), ErrorCode::kInvalidBlock);
        }
        refused.fetch_add(1, std::memory_order_relaxed);
      } else if (tid == 0) {
        pool.set_budget_blocks(kBlocks / 3 + static_cast<std::uint32_t>(rng() % (kBlocks - kBlocks / 3 + 1)));
      }
    }
    drop(0);
    leave.now();
    for (bool senders = true; senders;) {  // take the mail of every sender until all stopped
      senders = running.load(std::memory_order_acquire) != 0;
      read_mail(false);
      std::this_thread::yield();
    }
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  std::printf("[pool] %llu blocks shared, %llu copied, %llu refusals: %llu broken patterns\n",
              static_cast<unsigned long long>(shared.load()), static_cast<unsigned long long>(copies.load()),
              static_cast<unsigned long long>(refused.load()), static_cast<unsigned long long>(broken.load()));
  EXPECT_EQ(broken.load(), 0u) << "a block was written while a holder still had it";
  EXPECT_GT(shared.load(), 0u);
  EXPECT_GT(copies.load(), 0u);
  EXPECT_GT(refused.load(), 0u);
  pool.set_budget_blocks(kBlocks);
  EXPECT_EQ(pool.num_free_blocks(), kBlocks);
  EXPECT_EQ(pool.allocator().num_allocated(), 0u);
}

}  // namespace
}  // namespace sagellm::kv
