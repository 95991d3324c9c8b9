// Failing paths of the block allocator racing legitimate calls: refused batches against frees of
// shared blocks, concurrent limit changes against allocation, a long mixed stress that counts
// every block handed out while some holder still had it, and block contents handed from owner to
// owner with nothing but the allocator's memory orders between them. Runs under TSan in CI (label
// stress).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "test_support.hpp"

namespace sagellm::kv {
namespace {

using testing::kUnderTsan;
using testing::kSlowBuild;

// The scenario, widened: blocks x[0..k) held by A and B (ref 2 each); A frees {x..., d}
// with d already free (a double free), while B frees each x[i] on its own. A's batch must be
// refused without touching any x, so each keeps A's reference and stays off the free list; no
// later allocation may return one. (The old rollback re-added A's references with a blind
// fetch_add after B had already sent a block to the free list.)
TEST(BlockAllocatorRace, RefusedFreeRacingALegitimateFreeNeverFreesTheSharedBlock) {
  constexpr std::size_t kShared = 32;
  const int trials = kUnderTsan ? 4000 : 50000;
  // Two long-lived threads, released together for each trial by a generation counter they spin on.
  BlockAllocator a(kShared + 8);
  std::atomic<int> go{0};
  std::atomic<int> done{0};
  std::vector<BlockId> batch_a(kShared + 1);  // x..., d
  BatchStatus sa;
  bool b_ok = true;
  constexpr int kStop = -1;
  const auto wait_for = [&go](int t) {
    // Spin briefly (the release is usually imminent), then yield: on a machine with few cores a
    // pure spin would starve the thread that prepares the next trial.
    for (int spins = 0;; ++spins) {
      const int g = go.load(std::memory_order_acquire);
      if (g == t) return true;
      if (g == kStop) return false;
      if (spins > 2000) std::this_thread::yield();
    }
  };
  std::thread ta([&] {
    for (int t = 1; wait_for(t); ++t) {
      sa = a.free(batch_a);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  });
  std::thread tb([&] {
    for (int t = 1; wait_for(t); ++t) {
      for (std::size_t i = kShared; i-- > 0;) {
        b_ok = a.free(std::span<const BlockId>(&batch_a[i], 1)).ok() && b_ok;
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  });
  std::uint64_t handed_out_twice = 0;
  for (int t = 1; t <= trials && handed_out_twice == 0; ++t) {
    ASSERT_TRUE(a.allocate(batch_a).ok());
    const std::span<const BlockId> xs = std::span<const BlockId>(batch_a).first(kShared);
    ASSERT_TRUE(a.incref(xs).ok());                                           // A and B hold each x
    ASSERT_TRUE(a.free(std::span<const BlockId>(&batch_a[kShared], 1)).ok());  // d is free
    go.store(t, std::memory_order_release);
    while (done.load(std::memory_order_acquire) != 2 * t) std::this_thread::yield();
    ASSERT_EQ(sa.code, ErrorCode::kDoubleFree);
    EXPECT_FALSE(sa.partial);
    EXPECT_EQ(sa.index, static_cast<std::int64_t>(kShared));
    ASSERT_TRUE(b_ok);
    // A's references survived the refusal; nothing allocatable now may be one of its blocks.
    for (BlockId x : xs) handed_out_twice += a.ref_count(x) != 1 ? 1u : 0u;
    std::vector<BlockId> rest(a.num_available());
    ASSERT_TRUE(a.allocate(rest).ok());
    for (BlockId id : rest) handed_out_twice += std::count(xs.begin(), xs.end(), id) != 0 ? 1u : 0u;
    ASSERT_TRUE(a.free(rest).ok());
    if (handed_out_twice == 0) {
      ASSERT_TRUE(a.free(xs).ok());  // A lets go
    }
  }
  go.store(kStop, std::memory_order_release);
  ta.join();
  tb.join();
  EXPECT_EQ(handed_out_twice, 0u) << "of " << trials << " trials";
}

// Two threads flip the limit between 0 and N while a third allocates: the available count must
// never exceed N (it once did when two deltas applied out of order, and allocate(N + 1) then
// reserved and spun forever).
TEST(BlockAllocatorRace, ConcurrentLimitChangesNeverOvercommit) {
  constexpr std::uint32_t kBlocks = 64;
  const int rounds = kUnderTsan ? 20000 : 200000;
  BlockAllocator a(kBlocks);
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> overcommits{0};
  std::atomic<std::uint64_t> oversize_successes{0};
  std::thread low([&] {
    for (int i = 0; i < rounds; ++i) a.set_limit(i % 2 == 0 ? 0 : kBlocks);
  });
  std::thread high([&] {
    for (int i = 0; i < rounds; ++i) a.set_limit(i % 2 == 0 ? kBlocks : 0);
  });
  std::thread monitor([&] {
    std::vector<BlockId> too_many(kBlocks + 1);
    std::vector<BlockId> some(8);
    while (!stop.load(std::memory_order_acquire)) {
      if (a.num_available() > kBlocks) overcommits.fetch_add(1);
      if (a.allocate(too_many).ok()) oversize_successes.fetch_add(1);  // would spin on the old code
      if (a.allocate(some).ok()) {
        ASSERT_TRUE(a.free(some).ok());
      }
    }
  });
  low.join();
  high.join();
  stop.store(true, std::memory_order_release);
  monitor.join();
  EXPECT_EQ(overcommits.load(), 0u);
  EXPECT_EQ(oversize_successes.load(), 0u);
  a.set_limit(kBlocks);
  EXPECT_EQ(a.num_available(), kBlocks);
  EXPECT_EQ(a.num_allocated(), 0u);
}

// A stale free (a double free of an id the caller no longer holds) landing inside a batch
// allocation longer than 256 ids. Such a free can steal the reference of whoever holds the block
// now; that is all it may do. The long batch once gave each block its reference before reading the
// block's link to the next one on the chain it had taken, so a stale free landing in between pushed
// the block and rewrote that link: the allocation then walked on along the free stack (handing out
// ids that stayed on it, and the end marker past the slot array) and lost the rest of its chain.
//
// The race, made deterministic: the allocation writes its ids into a read-only page, so its first
// write (right after block 0, the first it takes, got its reference) faults; the fault handler is
// the stale free of block 0, then makes the page writable and the write resumes.
struct StaleFreeInFault {
  BlockAllocator* allocator = nullptr;
  BlockId victim = -1;
  void* page = nullptr;
  std::size_t bytes = 0;
  bool landed = false;
};
StaleFreeInFault* g_stale_free = nullptr;

void stale_free_on_fault(int, siginfo_t* info, void*) {
  StaleFreeInFault* s = g_stale_free;
  const auto* at = static_cast<const char*>(info->si_addr);
  const auto* page = static_cast<const char*>(s != nullptr ? s->page : nullptr);
  if (s == nullptr || s->landed || at < page || at >= page + s->bytes) {
    std::signal(SIGSEGV, SIG_DFL);  // a real fault: crash on return, as without this handler
    return;
  }
  // One id: no scratch memory, only atomics (signal-safe on lock-free atomics).
  s->landed = s->allocator->free(std::span<const BlockId>(&s->victim, 1)).ok();
  mprotect(s->page, s->bytes, PROT_READ | PROT_WRITE);
}

// num_allocated() reads the limit and the available count separately: a reader between
// set_limit's two stores saw the new limit with the old count, and with every block in use under a
// limit of 0 (available -N) that read as 2N blocks allocated. It must never exceed the capacity.
TEST(BlockAllocatorRace, AllocatedCountNeverExceedsCapacityDuringLimitChanges) {
  constexpr std::uint32_t kBlocks = 64;
  BlockAllocator alloc(kBlocks);
  std::vector<BlockId> all(kBlocks);
  ASSERT_TRUE(alloc.allocate(all).ok());
  std::atomic<bool> stop{false};
  std::thread toggler([&] {
    for (int i = 0; i < (kUnderTsan ? 20000 : 200000); ++i) alloc.set_limit(i % 2 == 0 ? 0 : kBlocks);
    stop.store(true, std::memory_order_release);
  });
  std::uint32_t most = 0;
  while (!stop.load(std::memory_order_acquire)) most = std::max(most, alloc.num_allocated());
  toggler.join();
  EXPECT_LE(most, kBlocks);
  EXPECT_EQ(alloc.num_allocated(), kBlocks);
  ASSERT_TRUE(alloc.free(all).ok());
}

TEST(BlockAllocatorRace, StaleFreeInsideALongAllocationOnlyStealsThatBlock) {
  constexpr std::uint32_t kBlocks = 320;
  constexpr std::size_t kBatch = 300;  // above the 256 ids pop_chain keeps on its stack
  const auto bytes = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  ASSERT_GE(bytes, kBatch * sizeof(BlockId));
  void* page = mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(page, MAP_FAILED);
  BlockAllocator a(kBlocks);  // fresh: hands out 0, 1, 2, ... so block 0 is taken first
  StaleFreeInFault steal{&a, 0, page, bytes, false};
  struct sigaction act {};
  struct sigaction old {};
  act.sa_sigaction = stale_free_on_fault;
  act.sa_flags = SA_SIGINFO;
  sigemptyset(&act.sa_mask);
  ASSERT_EQ(sigaction(SIGSEGV, &act, &old), 0);
  g_stale_free = &steal;
  const std::span<BlockId> out(static_cast<BlockId*>(page), kBatch);
  const bool ok = a.allocate(out).ok();
  g_stale_free = nullptr;
  sigaction(SIGSEGV, &old, nullptr);
  ASSERT_TRUE(ok);
  ASSERT_TRUE(steal.landed) << "the stale free did not run inside the allocation";
  std::vector<BlockId> got(out.begin(), out.end());
  munmap(page, bytes);
  // The allocation took blocks 0..299, and the stale free put block 0 back: that block alone.
  for (std::size_t i = 0; i < kBatch; ++i) ASSERT_EQ(got[i], static_cast<BlockId>(i)) << "position " << i;
  EXPECT_EQ(a.ref_count(0), 0u);
  EXPECT_EQ(a.num_available(), kBlocks - kBatch + 1);
  std::vector<BlockId> rest(a.num_available());
  ASSERT_TRUE(a.allocate(rest).ok());
  std::sort(rest.begin(), rest.end());
  std::vector<BlockId> expected{0};
  for (BlockId id = kBatch; id < static_cast<BlockId>(kBlocks); ++id) expected.push_back(id);
  EXPECT_EQ(rest, expected) << "the free stack lost or repeated blocks";
  EXPECT_EQ(a.num_available(), 0u);
}

// The mixed stress: threads allocate, share references with each other through an exchange,
// free, and submit refused batches (a double free of an exclusively held block after shared ids,
// an out-of-range id, an incref naming an id out of range) while others free the same shared
// blocks. `holders[id]` counts the references the test believes exist; an allocation that finds
// it non-zero is a block handed out while still owned.
TEST(BlockAllocatorRace, MixedStressNeverHandsOutAnOwnedBlock) {
  constexpr std::uint32_t kBlocks = 2048;
  constexpr int kThreads = 4;
  constexpr int rounds = 250000;  // allocator calls per thread: 10^6 in all, under TSan too
  constexpr std::size_t kExchangeSlots = 64;
  BlockAllocator a(kBlocks);
  std::vector<std::atomic<std::uint32_t>> holders(kBlocks);
  for (auto& h : holders) h.store(0);
  std::array<std::atomic<BlockId>, kExchangeSlots> exchange;
  for (auto& e : exchange) e.store(-1);
  std::atomic<std::uint64_t> owned_twice{0}, ops{0}, refused{0}, blocks_allocated{0};

  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<std::uint32_t>(77 + tid));
    std::vector<BlockId> shared;     // references possibly shared with other threads
    std::vector<BlockId> exclusive;  // blocks only this thread holds (count 1)
    std::vector<BlockId> batch;
    const auto release = [&](std::span<const BlockId> ids) {
      for (BlockId id : ids) holders[static_cast<std::size_t>(id)].fetch_sub(1);
      ASSERT_TRUE(a.free(ids).ok());
    };
    int calls = 0;  // allocator calls made (a round whose precondition fails makes none)
    while (calls < rounds) {
      const unsigned action = rng() % 8;
      ++calls;
      if ((action <= 1 && exclusive.size() < 64) || exclusive.size() + shared.size() < 4) {
        std::vector<BlockId> ids(1 + rng() % 16);
        if (!a.allocate(ids).ok()) continue;
        blocks_allocated.fetch_add(ids.size(), std::memory_order_relaxed);
        for (BlockId id : ids) {
          if (holders[static_cast<std::size_t>(id)].fetch_add(1) != 0) owned_twice.fetch_add(1);
          exclusive.push_back(id);
        }
      } else if (action == 2 && !exclusive.empty()) {
        // Share: one more reference, handed to whoever takes the exchange slot next.
        const BlockId id = exclusive.back();
        exclusive.pop_back();
        holders[static_cast<std::size_t>(id)].fetch_add(1);
        ASSERT_TRUE(a.incref(std::span<const BlockId>(&id, 1)).ok());
        shared.push_back(id);
        const BlockId got = exchange[rng() % kExchangeSlots].exchange(id);
        if (got >= 0) shared.push_back(got);
      } else if (action == 3 && !shared.empty()) {
        batch.assign(shared.begin(), shared.begin() + static_cast<std::ptrdiff_t>(std::min<std::size_t>(shared.size(), 4)));
        shared.erase(shared.begin(), shared.begin() + static_cast<std::ptrdiff_t>(batch.size()));
        release(batch);
      } else if (action == 4 && !exclusive.empty()) {
        batch.assign(exclusive.end() - static_cast<std::ptrdiff_t>(std::min<std::size_t>(exclusive.size(), 8)),
                     exclusive.end());
        exclusive.resize(exclusive.size() - batch.size());
        release(batch);
      } else if (action == 5 && !exclusive.empty()) {
        // Refused free: shared ids first (the old rollback re-added them), then a double free.
        batch.assign(shared.begin(), shared.begin() + static_cast<std::ptrdiff_t>(std::min<std::size_t>(shared.size(), 3)));
        batch.push_back(exclusive.back());
        batch.push_back(exclusive.back());
        const BatchStatus st = a.free(batch);
        ASSERT_EQ(st.code, ErrorCode::kDoubleFree);
        ASSERT_FALSE(st.partial);
        refused.fetch_add(1, std::memory_order_relaxed);
      } else if (action == 6) {
        // Refused free and incref with an id out of range after valid ones.
        batch.assign(shared.begin(), shared.begin() + static_cast<std::ptrdiff_t>(std::min<std::size_t>(shared.size(), 3)));
        batch.push_back(static_cast<BlockId>(kBlocks + rng() % 4));
        ASSERT_EQ(a.free(batch).code, ErrorCode::kInvalidBlock);
        ASSERT_EQ(a.incref(batch).code, ErrorCode::kInvalidBlock);
        refused.fetch_add(2, std::memory_order_relaxed);
        ++calls;
      } else {
        // Take a shared reference from the exchange (racing its other holders' frees) and drop it.
        const BlockId got = exchange[rng() % kExchangeSlots].exchange(-1);
        if (got >= 0) {
          release(std::span<const BlockId>(&got, 1));
        } else {
          --calls;
        }
      }
    }
    ops.fetch_add(static_cast<std::uint64_t>(calls), std::memory_order_relaxed);
    release(shared);
    release(exclusive);
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  for (auto& e : exchange) {
    const BlockId got = e.exchange(-1);
    if (got >= 0) {
      holders[static_cast<std::size_t>(got)].fetch_sub(1);
      ASSERT_TRUE(a.free(std::span<const BlockId>(&got, 1)).ok());
    }
  }
  std::printf("[stress] %d threads, %llu operations (%llu refused batches, %llu blocks allocated): "
              "%llu blocks handed out while owned\n",
              kThreads, static_cast<unsigned long long>(ops.load()), static_cast<unsigned long long>(refused.load()),
              static_cast<unsigned long long>(blocks_allocated.load()),
              static_cast<unsigned long long>(owned_twice.load()));
  RecordProperty("operations", std::to_string(ops.load()));
  RecordProperty("owned_twice", std::to_string(owned_twice.load()));
  EXPECT_EQ(owned_twice.load(), 0u);
  EXPECT_GT(refused.load(), 0u);
  EXPECT_EQ(a.num_available(), kBlocks);
  for (std::uint32_t i = 0; i < kBlocks; ++i) ASSERT_EQ(holders[i].load(), 0u) << "block " << i;
  std::vector<BlockId> all(kBlocks);
  ASSERT_TRUE(a.allocate(all).ok());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::adjacent_find(all.begin(), all.end()), all.end()) << "an id is on the free list twice";
}

// Block contents pass from one owner to the next through the allocator alone. Each block's
// "memory" is a plain word: the thread that allocates a block writes its tag there, every holder
// reads it back before it lets go, and the next owner overwrites it. Holders that share a block
// meet through a mailbox (that hand-off is theirs to synchronise), but nothing else orders the last
// holder's reads before the next owner's write: only the reference count's acq_rel decrement, the
// release push onto the free stack and the acquire pop. Without them TSan reports the write as a
// race with the reads (the other tests here synchronise their owners through sequentially
// consistent atomics of their own, which hides a missing order), and a block handed to two owners
// at once shows as a tag overwritten under its holder, TSan or not. Long batches (over 256 ids: the
// heap copy, the sorted check and the long pop), refused frees and increfs, and limit changes
// that refuse allocations run meanwhile.
TEST(BlockAllocatorRace, BlockContentsPassBetweenOwnersThroughTheAllocatorAlone) {
  constexpr std::uint32_t kBlocks = 2048;
  constexpr int kThreads = 4;
  constexpr std::size_t kLong = 300;  // above kStackBatch and the 256 ids pop_chain walks on its stack
  const int rounds = kUnderTsan || kSlowBuild ? 40000 : 200000;
  BlockAllocator a(kBlocks);
  std::vector<std::uint64_t> content(kBlocks, 0);  // plain memory: the blocks' contents
  // mailbox[t][k]: a block shared with thread t (id << 32 | its tag), or 0 when empty.
  constexpr std::size_t kSlots = 8;
  std::array<std::array<std::atomic<std::uint64_t>, kSlots>, kThreads> mailbox{};
  std::atomic<std::uint64_t> overwritten{0}, refused{0}, long_batches{0}, shared{0};
  std::atomic<int> running{kThreads};

  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<std::uint32_t>(4242 + tid));
    struct Held {
      BlockId id;
      std::uint64_t tag;
      bool shared;  // another thread may hold a reference too
    };
    // Counts this worker out of `running` once: at the end of its rounds, or when a failed ASSERT
    // returns early (then the others must not wait for its mail forever).
    struct Leave {
      std::atomic<int>& running;
      bool left = false;
      void now() {
        if (!left) running.fetch_sub(1, std::memory_order_acq_rel);
        left = true;
      }
      ~Leave() { now(); }
    } leave{running};
    std::vector<Held> mine;  // blocks this thread holds one reference on, with the tag they should hold
    std::vector<BlockId> batch;
    // Tags fit 32 bits (a mailbox entry carries one): the thread above bit 28, a counter below. Never 0.
    std::uint32_t counter = 0;
    const auto next_tag = [&] {
      return (std::uint64_t{static_cast<std::uint32_t>(tid) + 1} << 28) | (++counter & 0x0FFFFFFFu);
    };
    const auto check = [&](const Held& h) {
      if (content[static_cast<std::size_t>(h.id)] != h.tag) overwritten.fetch_add(1, std::memory_order_relaxed);
    };
    const auto drop = [&](std::size_t from) {  // verifies and frees mine[from, end)
      batch.clear();
      for (std::size_t i = from; i < mine.size(); ++i) {
        check(mine[i]);
        batch.push_back(mine[i].id);
      }
      mine.resize(from);
      ASSERT_TRUE(a.free(batch).ok());
    };
    for (int round = 0; round < rounds; ++round) {
      // Mail first: shared blocks, read and let go (this may be their last reference).
      for (auto& slot : mailbox[static_cast<std::size_t>(tid)]) {
        const std::uint64_t got = slot.exchange(0, std::memory_order_acquire);
        if (got == 0) continue;
        const auto id = static_cast<BlockId>(got >> 32);
        if (content[static_cast<std::size_t>(id)] != (got & 0xFFFFFFFFu)) {
          overwritten.fetch_add(1, std::memory_order_relaxed);
        }
        ASSERT_TRUE(a.free(std::span<const BlockId>(&id, 1)).ok());
      }
      const unsigned action = rng() % 16;
      if (action < 6 || mine.empty()) {
        const bool long_batch = action == 0 && mine.size() < kBlocks / 4;
        std::vector<BlockId> ids(long_batch ? kLong + rng() % 64 : 1 + rng() % 16);
        if (!a.allocate(ids).ok()) {
          refused.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        if (long_batch) long_batches.fetch_add(1, std::memory_order_relaxed);
        for (BlockId id : ids) {
          const std::uint64_t tag = next_tag();
          content[static_cast<std::size_t>(id)] = tag;  // this owner's write
          mine.push_back({id, tag, false});
        }
      } else if (action < 10) {
        // Let go of the newest few, or of everything when holding a long run.
        drop(mine.size() > kLong ? 0 : mine.size() - std::min<std::size_t>(mine.size(), 1 + rng() % 8));
      } else if (action == 10 || action == 15) {
        // Share the newest block with another thread: one more reference, handed over by mailbox.
        Held& h = mine.back();
        h.shared = true;
        const auto to = static_cast<std::size_t>((static_cast<unsigned>(tid) + 1 + rng() % (kThreads - 1)) % kThreads);
        ASSERT_TRUE(a.incref(std::span<const BlockId>(&h.id, 1)).ok());
        std::uint64_t empty = 0;
        const std::uint64_t mail = (static_cast<std::uint64_t>(h.id) << 32) | h.tag;
        if (mailbox[to][rng() % kSlots].compare_exchange_strong(empty, mail, std::memory_order_release,
                                                                std::memory_order_relaxed)) {
          shared.fetch_add(1, std::memory_order_relaxed);
        } else {
          ASSERT_TRUE(a.free(std::span<const BlockId>(&h.id, 1)).ok());  // full: take the reference back
        }
      } else if (action == 11) {
        // Refused free: the held blocks (a long batch when there are enough), then one of them again,
        // one nobody else holds (a second reference would hide the double free: see the header).
        const auto solo = std::find_if(mine.begin(), mine.end(), [](const Held& h) { return !h.shared; });
        if (solo == mine.end()) continue;
        batch.clear();
        for (const Held& h : mine) batch.push_back(h.id);
        batch.push_back(solo->id);
        const BatchStatus st = a.free(batch);
        ASSERT_EQ(st.code, ErrorCode::kDoubleFree);
        ASSERT_FALSE(st.partial);
        refused.fetch_add(1, std::memory_order_relaxed);
      } else if (action == 12) {
        // Refused incref: the held blocks, then an id out of range; every reference added is dropped.
        batch.clear();
        for (const Held& h : mine) batch.push_back(h.id);
        batch.push_back(static_cast<BlockId>(kBlocks + rng() % 8));
        ASSERT_EQ(a.incref(batch).code, ErrorCode::kInvalidBlock);
        refused.fetch_add(1, std::memory_order_relaxed);
      } else if (action == 13 && tid == 0) {
        a.set_limit(kBlocks / 2 + rng() % (kBlocks / 2));  // may be below what is in use: refusals follow
      } else if (action == 14 && tid == 0) {
        a.set_limit(kBlocks);
      }
    }
    drop(0);
    leave.now();
    // Keep taking mail until every sender stopped, so no reference is left in a mailbox.
    for (bool senders = true; senders;) {
      senders = running.load(std::memory_order_acquire) != 0;  // read first: then their mail is in
      for (auto& slot : mailbox[static_cast<std::size_t>(tid)]) {
        const std::uint64_t got = slot.exchange(0, std::memory_order_acquire);
        if (got == 0) continue;
        const auto id = static_cast<BlockId>(got >> 32);
        ASSERT_TRUE(a.free(std::span<const BlockId>(&id, 1)).ok());
      }
      std::this_thread::yield();
    }
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  std::printf("[contents] %llu long batches, %llu blocks shared, %llu refusals: %llu tags overwritten\n",
              static_cast<unsigned long long>(long_batches.load()), static_cast<unsigned long long>(shared.load()),
              static_cast<unsigned long long>(refused.load()), static_cast<unsigned long long>(overwritten.load()));
  EXPECT_EQ(overwritten.load(), 0u) << "a block was handed out while a holder still had it";
  EXPECT_GT(long_batches.load(), 0u);
  EXPECT_GT(shared.load(), 0u);
  EXPECT_GT(refused.load(), 0u);
  a.set_limit(kBlocks);
  EXPECT_EQ(a.num_available(), kBlocks);
  EXPECT_EQ(a.num_allocated(), 0u);
  std::vector<BlockId> all(kBlocks);
  ASSERT_TRUE(a.allocate(all).ok());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::adjacent_find(all.begin(), all.end()), all.end()) << "an id is on the free list twice";
}

}  // namespace
}  // namespace sagellm::kv
