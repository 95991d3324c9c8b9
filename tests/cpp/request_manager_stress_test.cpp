// Several threads drive one RequestManager (over one allocator and one bounded prefix cache) with
// their own requests: batched admits of prompts with shared prefixes, batched appends, finish,
// abort and preempt + resume, in a pool small enough that admits and appends are refused often,
// while another thread moves the allocator's limit (often below the blocks in use).
// Fixed seeds and thread counts; meant to run under TSan.
//
// Each block a request owns is marked in a shared array by compare-and-swap from 0 to the
// request's tag when the manager hands it out, and unmarked just before the request ends. If the
// manager ever handed out a block that another running request still owns (or that the cache
// still holds for a running request), the CAS finds it marked and the test fails.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/prefix_cache.hpp"
#include "sagellm_kv/request_manager.hpp"

namespace sagellm::kv {
namespace {

constexpr std::uint32_t kBlockSize = 4;
constexpr std::uint32_t kPoolBlocks = 256;
constexpr std::uint32_t kCapacity = 96;
constexpr int kThreads = 4;
constexpr int kIterations = 4000;

// 32-bit results, so arithmetic on them stays in uint32_t without conversions.
struct Rng {
  explicit Rng(std::uint32_t seed) : engine(seed) {}
  std::uint32_t operator()() { return static_cast<std::uint32_t>(engine()); }
  std::mt19937 engine;
};

struct Shared {
  BlockAllocator alloc{kPoolBlocks};
  std::unique_ptr<PrefixCache> cache;
  std::unique_ptr<RequestManager> manager;
  std::vector<std::atomic<std::uint64_t>> mark = std::vector<std::atomic<std::uint64_t>>(kPoolBlocks);
  std::atomic<int> failures{0};
  std::atomic<std::uint64_t> refused{0};
};

void fail(Shared& s, const std::string& what) {
  if (s.failures.fetch_add(1, std::memory_order_relaxed) < 5) ADD_FAILURE() << what;
}

struct Live {
  RequestId id = 0;
  std::vector<std::int32_t> tokens;
  std::uint32_t shared_blocks = 0;  // leading blocks matched from the cache (not marked)
  std::vector<BlockId> table;
};

// Marks blocks [from, table.size()) as owned by `live`.
void mark_own(Shared& s, const Live& live, std::size_t from) {
  for (std::size_t j = from; j < live.table.size(); ++j) {
    std::uint64_t expected = 0;
    // acq_rel: pairs with the release store of the previous owner's unmark.
    if (!s.mark[static_cast<std::size_t>(live.table[j])].compare_exchange_strong(expected, live.id,
                                                                                  std::memory_order_acq_rel)) {
      fail(s, "block " + std::to_string(live.table[j]) + " handed to request " + std::to_string(live.id) +
                  " while request " + std::to_string(expected) + " owns it");
    }
  }
}

void unmark_own(Shared& s, const Live& live) {
  for (std::size_t j = live.shared_blocks; j < live.table.size(); ++j) {
    s.mark[static_cast<std::size_t>(live.table[j])].store(0, std::memory_order_release);
  }
}

std::vector<std::int32_t> prompt(Rng& rng) {
  std::vector<std::int32_t> t;
  const auto prefix = static_cast<std::int32_t>(rng() % 4);
  const std::uint32_t shared = rng() % 6 * kBlockSize;
  for (std::uint32_t i = 0; i < shared; ++i) t.push_back(prefix * 1000 + static_cast<std::int32_t>(i));
  const std::uint32_t fresh = 1 + rng() % 9;
  for (std::uint32_t i = 0; i < fresh; ++i) t.push_back(static_cast<std::int32_t>(rng() % 50000));
  return t;
}

void worker(Shared& s, int thread_index) {
  Rng rng(0xBEEFu + static_cast<std::uint32_t>(thread_index));
  std::vector<Live> running;
  RequestId next_id = static_cast<RequestId>(thread_index) << 40;
  for (int it = 0; it < kIterations && s.failures.load(std::memory_order_relaxed) == 0; ++it) {
    const std::uint32_t op = rng() % 8;
    if (op < 3 || running.empty()) {  // admit a batch of 1-3
      std::vector<Live> batch(1 + rng() % 3);
      std::vector<AdmitRequest> reqs;
      for (Live& l : batch) {
        l.id = ++next_id;
        l.tokens = prompt(rng);
      }
      for (const Live& l : batch) reqs.push_back({l.id, l.tokens, {}});
      std::vector<std::uint32_t> cached(batch.size());
      std::vector<BlockId> tables;
      const BatchStatus st = s.manager->admit(reqs, cached, &tables);
      if (!st.ok()) {
        s.refused.fetch_add(1, std::memory_order_relaxed);
        for (const Live& l : batch) {
          if (s.manager->contains(l.id)) fail(s, "refused admit left request " + std::to_string(l.id) + " running");
        }
        continue;
      }
      std::size_t at = 0;
      for (std::size_t i = 0; i < batch.size(); ++i) {
        Live& l = batch[i];
        const std::size_t n = (l.tokens.size() + kBlockSize - 1) / kBlockSize;
        l.table.assign(tables.begin() + static_cast<std::ptrdiff_t>(at), tables.begin() + static_cast<std::ptrdiff_t>(at + n));
        at += n;
        l.shared_blocks = cached[i] / kBlockSize;
        for (std::uint32_t j = 0; j < l.shared_blocks; ++j) {
          if (!s.alloc.is_allocated(l.table[j])) fail(s, "a matched block is free");
        }
        mark_own(s, l, l.shared_blocks);
        running.push_back(std::move(l));
      }
    } else if (op < 6) {  // append 1-6 tokens to up to 4 running requests
      const std::size_t k = std::min<std::size_t>(running.size(), 1 + rng() % 4);
      std::vector<RequestId> ids;
      std::vector<std::int32_t> flat;
      std::vector<std::size_t> offsets{0};
      for (std::size_t i = 0; i < k; ++i) {
        ids.push_back(running[i].id);
        const std::uint32_t m = 1 + rng() % 6;
        for (std::uint32_t t = 0; t < m; ++t) flat.push_back(static_cast<std::int32_t>(rng() % 50000));
        offsets.push_back(flat.size());
      }
      std::vector<std::uint32_t> counts(k);
      std::vector<BlockId> fresh;
      const BatchStatus st = s.manager->append(ids, flat, offsets, counts, &fresh);
      if (!st.ok()) {
        s.refused.fetch_add(1, std::memory_order_relaxed);
        for (std::size_t i = 0; i < k; ++i) {
          if (s.manager->num_tokens(ids[i]) != running[i].tokens.size()) fail(s, "refused append changed a request");
        }
        continue;
      }
      std::size_t at = 0;
      for (std::size_t i = 0; i < k; ++i) {
        Live& l = running[i];
        l.tokens.insert(l.tokens.end(), flat.begin() + static_cast<std::ptrdiff_t>(offsets[i]),
                        flat.begin() + static_cast<std::ptrdiff_t>(offsets[i + 1]));
        const std::size_t old = l.table.size();
        l.table.insert(l.table.end(), fresh.begin() + static_cast<std::ptrdiff_t>(at),
                       fresh.begin() + static_cast<std::ptrdiff_t>(at + counts[i]));
        at += counts[i];
        mark_own(s, l, old);
        if (s.manager->block_table(l.id) != l.table) fail(s, "block table differs from the appended blocks");
      }
    } else {  // end the oldest: finish, abort or preempt (then resume with all tokens)
      Live l = std::move(running.front());
      running.erase(running.begin());
      unmark_own(s, l);
      const RequestId id = l.id;
      const std::uint32_t how = rng() % 3;
      if (how == 0) s.manager->finish(std::span<const RequestId>(&id, 1));
      if (how == 1) s.manager->abort(std::span<const RequestId>(&id, 1));
      if (how == 2) {
        if (s.manager->preempt(std::span<const RequestId>(&id, 1)) != l.tokens.size()) fail(s, "preempt token count");
        const AdmitRequest r{id, l.tokens, {}};
        std::uint32_t cached = 0;
        std::vector<BlockId> table;
        if (s.manager->admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1), &table).ok()) {
          l.table = table;
          l.shared_blocks = cached / kBlockSize;
          mark_own(s, l, l.shared_blocks);
          running.push_back(std::move(l));
        }
      }
    }
    if (it % 200 == 0) {
      try {
        s.manager->check_invariants();
        s.cache->check_invariants();
      } catch (const Error& e) {
        fail(s, e.what());
      }
    }
  }
  for (const Live& l : running) {
    unmark_own(s, l);
    s.manager->finish(std::span<const RequestId>(&l.id, 1));
  }
}

TEST(RequestManagerStress, ConcurrentRequestsNeverShareOwnedBlocks) {
  Shared s;
  PrefixCacheOptions o;
  o.block_size = kBlockSize;
  o.capacity_blocks = kCapacity;
  s.cache = std::make_unique<PrefixCache>(o, &s.alloc);
  RequestManagerOptions mo;
  mo.block_size = kBlockSize;
  s.manager = std::make_unique<RequestManager>(s.alloc, s.cache.get(), mo);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, std::ref(s), t);
  // Meanwhile another user of the allocator moves its budget, often below the blocks in use: the
  // managers' admits and appends are refused (or evict) against a limit that changes under them.
  std::atomic<bool> stop{false};
  std::uint64_t limit_changes = 0;
  std::thread budget([&] {
    Rng rng(0x1u);
    while (!stop.load(std::memory_order_acquire)) {
      s.alloc.set_limit(kPoolBlocks / 4 + rng() % (kPoolBlocks - kPoolBlocks / 4 + 1));
      ++limit_changes;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    s.alloc.set_limit(kPoolBlocks);
  });
  for (auto& t : threads) t.join();
  stop.store(true, std::memory_order_release);
  budget.join();
  EXPECT_GT(limit_changes, 0u);
  EXPECT_EQ(s.failures.load(), 0);
  EXPECT_GT(s.refused.load(), 0u);  // the failing paths ran too
  const RequestManagerStats st = s.manager->stats();
  EXPECT_EQ(st.running, 0u);
  EXPECT_EQ(st.owned_blocks, 0u);
  EXPECT_GT(st.hit_blocks, 0u);
  EXPECT_EQ(s.cache->stats().in_use_blocks, 0u);
  EXPECT_EQ(s.alloc.num_allocated(), s.cache->size());  // only cached blocks remain
  s.manager->check_invariants();
  s.cache->check_invariants();
  s.manager.reset();
  s.cache.reset();
  EXPECT_EQ(s.alloc.num_allocated(), 0u);
}

}  // namespace
}  // namespace sagellm::kv
