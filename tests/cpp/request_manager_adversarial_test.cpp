// Two RequestManagers share one allocator and one prefix cache, driven by a seeded random mix of
// batched admits (shared prefixes, salts, extra keys, opaque requests, caller-supplied digests),
// appends, finish / abort / preempt + resume, and the cache's own removals (evict, evict_detached,
// clear, invalidate). After every step the test checks:
//   - both managers' and the cache's check_invariants();
//   - the allocator's counts: free + allocated == total;
//   - the ownership protocol of InsertOptions::adopt: every allocated block has exactly one
//     reference, and it is either cached or in exactly one running request's table (a block freed
//     twice, leaked, or handed to two owners breaks this);
//   - the sum of references equals the cache's size plus both managers' owned_blocks;
//   - the contents: each block remembers the chained digest it was filled with; a matched block
//     must hold the digest of the prompt's block at that position (a block freed while cached and
//     handed out again would have been overwritten by its new owner).
// Requests end and are admitted again under the same ids, so finished records are reused.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"
#include "sagellm_kv/request_manager.hpp"

namespace sagellm::kv {
namespace {

constexpr std::uint32_t kBs = 4;

struct Config {
  std::uint32_t pool = 48;
  std::optional<std::uint32_t> capacity;
  EvictionPolicy policy = EvictionPolicy::kLru;
  bool events = false;
  std::uint32_t seed = 1;
};

struct Running {
  int manager = 0;
  std::vector<std::int32_t> tokens;  // empty for an opaque request
  std::uint64_t opaque_tokens = 0;
  std::string salt;
  std::string extra;
};

class World {
 public:
  explicit World(const Config& c) : cfg_(c), alloc_(c.pool), rng_(c.seed) {
    PrefixCacheOptions o;
    o.block_size = kBs;
    o.capacity_blocks = c.capacity;
    o.policy = c.policy;
    o.ttl_seconds = 1.0;
    o.clock_ns = [this] { return now_ns_; };
    o.event_queue_capacity = c.events ? 4096 : 0;
    cache_.emplace(o, &alloc_);
    RequestManagerOptions mo;
    mo.block_size = kBs;
    managers_[0].emplace(alloc_, &*cache_, mo);
    mo.match_last_token = true;
    managers_[1].emplace(alloc_, &*cache_, mo);
    content_.assign(c.pool, std::nullopt);
  }
  ~World() {
    managers_[0].reset();
    managers_[1].reset();
    cache_.reset();
  }

  void run(int steps) {
    for (int step = 0; step < steps; ++step) {
      now_ns_ += 50'000'000;  // 50 ms a step: the TTL of 1 s expires nodes as the run goes
      const std::uint32_t op = pick(100);
      where_ = "seed " + std::to_string(cfg_.seed) + " step " + std::to_string(step) + " op " + std::to_string(op);
      if (op < 35) {
        admit();
      } else if (op < 60) {
        append();
      } else if (op < 80) {
        end();
      } else if (op < 86) {
        (void)cache_->evict(1 + pick(6));
      } else if (op < 90) {
        evict_detached();
      } else if (op < 93) {
        (void)cache_->clear();
      } else if (op < 96) {
        (void)cache_->invalidate(0);
      } else {
        external_match_release();
      }
      if (cfg_.events && pick(4) == 0) (void)cache_->drain_events();
      check();
      if (::testing::Test::HasFatalFailure() || ::testing::Test::HasFailure()) return;
    }
    for (int m = 0; m < 2; ++m) {
      const auto st = managers_[m]->stats();
      std::printf("seed %u manager %d: admitted %llu refused %llu hit %llu/%llu published %llu evicted %llu\n",
                  cfg_.seed, m, static_cast<unsigned long long>(st.admitted), static_cast<unsigned long long>(st.refused),
                  static_cast<unsigned long long>(st.hit_blocks), static_cast<unsigned long long>(st.queried_blocks),
                  static_cast<unsigned long long>(st.published_blocks),
                  static_cast<unsigned long long>(st.evicted_for_room));
    }
    // Everything ends: only the cache's references remain, and clearing it returns them all.
    for (int m = 0; m < 2; ++m) {
      std::vector<RequestId> ids;
      for (const auto& [id, r] : running_) {
        if (r.manager == m) ids.push_back(id);
      }
      managers_[m]->finish(ids);
    }
    running_.clear();
    check();
    EXPECT_EQ(alloc_.num_allocated(), cache_->size()) << where_;
    (void)cache_->clear();
    EXPECT_EQ(cache_->size(), 0u);
    EXPECT_EQ(alloc_.num_allocated(), 0u);
    EXPECT_EQ(alloc_.num_available(), cfg_.pool);
    cache_->check_invariants();
  }

 private:
  std::uint32_t pick(std::uint32_t n) { return static_cast<std::uint32_t>(rng_() % n); }

  std::vector<std::int32_t> prompt() {
    // Three shared stems, so requests of both managers match (and duplicate) each other's blocks.
    std::vector<std::int32_t> t;
    const std::uint32_t stem = pick(4);
    if (stem < 3) {
      const std::uint32_t len = 1 + pick(14);
      for (std::uint32_t i = 0; i < len; ++i) t.push_back(static_cast<std::int32_t>(stem * 1000 + i));
    }
    const std::uint32_t tail = (t.empty() ? 1 : 0) + pick(9);
    for (std::uint32_t i = 0; i < tail; ++i) t.push_back(static_cast<std::int32_t>(pick(3)));
    return t;
  }

  std::vector<BlockHash> digests_of(const std::vector<std::int32_t>& tokens, const std::string& salt,
                                    const std::string& extra) const {
    std::vector<BlockHash> d(tokens.size() / kBs);
    (void)hash_blocks(HashAlgorithm::kSha256, tokens, kBs, kRootBlockHash, BlockHashKey{salt, extra}, d);
    return d;
  }

  // Records what the request's blocks hold: the chained digest of each full block (from `first`),
  // nothing known for a partial block or an opaque request's.
  void fill(RequestId id, std::size_t first) {
    const Running& r = running_.at(id);
    const auto table = managers_[r.manager]->block_table(id);
    const auto d = r.tokens.empty() ? std::vector<BlockHash>{} : digests_of(r.tokens, r.salt, r.extra);
    for (std::size_t j = first; j < table.size(); ++j) {
      content_[static_cast<std::size_t>(table[j])] = j < d.size() ? std::optional<BlockHash>(d[j]) : std::nullopt;
    }
  }

  void admit() {
    const int m = static_cast<int>(pick(2));
    const std::uint32_t n = 1 + pick(3);
    std::vector<RequestId> ids;
    std::vector<Running> runs;
    std::vector<std::vector<BlockHash>> supplied(n);
    std::vector<AdmitRequest> batch;
    for (std::uint32_t i = 0; i < n; ++i) {
      RequestId id = 0;
      Running r;
      r.manager = m;
      if (!resume_.empty() && pick(2) == 0) {  // a preempted request comes back with all its tokens
        id = resume_.begin()->first;
        r = resume_.begin()->second;
        r.manager = m;
        resume_.erase(resume_.begin());
      } else {
        id = 1 + pick(24);  // few ids: the same id is admitted again and again (record reuse)
        if (pick(8) == 0) {
          r.opaque_tokens = 1 + pick(13);
        } else {
          r.tokens = prompt();
          if (pick(4) == 0) r.salt = "tenant" + std::to_string(pick(2));
          if (pick(4) == 0) r.extra = "lora" + std::to_string(pick(2));
        }
      }
      if (running_.contains(id) || std::find(ids.begin(), ids.end(), id) != ids.end()) continue;
      ids.push_back(id);
      runs.push_back(r);
    }
    for (std::size_t i = 0; i < ids.size(); ++i) {
      AdmitRequest a;
      a.id = ids[i];
      a.tokens = runs[i].tokens;
      a.num_opaque_tokens = runs[i].opaque_tokens;
      a.key = BlockHashKey{runs[i].salt, runs[i].extra};
      if (!runs[i].tokens.empty() && pick(2) == 0) {
        supplied[i] = digests_of(runs[i].tokens, runs[i].salt, runs[i].extra);
        a.digests = supplied[i];
      }
      batch.push_back(a);
    }
    if (batch.empty()) return;
    std::vector<std::uint32_t> cached(batch.size(), 99);
    std::vector<BlockId> tables;
    const auto before = alloc_.num_allocated();
    const BatchStatus st = managers_[m]->admit(batch, cached, &tables);
    if (!st.ok()) {
      ASSERT_EQ(st.code, ErrorCode::kPoolFull) << where_;
      for (std::size_t i = 0; i < ids.size(); ++i) ASSERT_FALSE(managers_[m]->contains(ids[i])) << where_;
      ASSERT_LE(alloc_.num_allocated(), before) << where_;  // only evictions happened
      for (std::size_t i = 0; i < ids.size(); ++i) {
        if (!runs[i].tokens.empty() && pick(2) == 0) resume_.emplace(ids[i], runs[i]);
      }
      return;
    }
    std::size_t at = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const Running& r = runs[i];
      const std::uint64_t count = r.tokens.empty() ? r.opaque_tokens : r.tokens.size();
      const std::size_t blocks = (count + kBs - 1) / kBs;
      ASSERT_EQ(managers_[m]->num_tokens(ids[i]), count) << where_;
      ASSERT_EQ(cached[i] % kBs, 0u) << where_;
      const std::size_t shared = cached[i] / kBs;
      ASSERT_LE(cached[i], r.tokens.size()) << where_;
      if (r.tokens.empty()) {
        ASSERT_EQ(cached[i], 0u) << where_;
      }
      const auto d = r.tokens.empty() ? std::vector<BlockHash>{} : digests_of(r.tokens, r.salt, r.extra);
      const auto table = managers_[m]->block_table(ids[i]);
      ASSERT_EQ(table.size(), blocks) << where_;
      ASSERT_TRUE(std::equal(table.begin(), table.end(), tables.begin() + static_cast<std::ptrdiff_t>(at))) << where_;
      at += blocks;
      for (std::size_t j = 0; j < shared; ++j) {
        const auto& held = content_[static_cast<std::size_t>(table[j])];
        ASSERT_TRUE(held.has_value() && *held == d[j])
            << where_ << ": request " << ids[i] << " matched block " << table[j] << " at " << j
            << " whose contents are another block's";
      }
      running_.emplace(ids[i], r);
      fill(ids[i], shared);
    }
    ASSERT_EQ(at, tables.size()) << where_;
  }

  std::vector<RequestId> some_running(int m, std::uint32_t most) {
    std::vector<RequestId> ids;
    for (const auto& [id, r] : running_) {
      if (r.manager == m && pick(3) != 0) ids.push_back(id);
    }
    std::shuffle(ids.begin(), ids.end(), rng_);
    if (ids.size() > most) ids.resize(most);
    return ids;
  }

  void append() {
    const int m = static_cast<int>(pick(2));
    const auto ids = some_running(m, 3);
    if (ids.empty()) return;
    std::vector<std::int32_t> tokens;
    std::vector<std::size_t> offsets{0};
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::uint32_t len = 1 + pick(9);
      for (std::uint32_t k = 0; k < len; ++k) tokens.push_back(static_cast<std::int32_t>(pick(3)));
      offsets.push_back(tokens.size());
    }
    std::vector<std::size_t> had(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) had[i] = managers_[m]->block_table(ids[i]).size();
    std::vector<std::uint32_t> new_blocks(ids.size());
    const BatchStatus st = managers_[m]->append(ids, tokens, offsets, new_blocks);
    if (!st.ok()) {
      ASSERT_EQ(st.code, ErrorCode::kPoolFull) << where_;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        ASSERT_EQ(managers_[m]->block_table(ids[i]).size(), had[i]) << where_;
      }
      return;
    }
    for (std::size_t i = 0; i < ids.size(); ++i) {
      Running& r = running_.at(ids[i]);
      const std::size_t len = offsets[i + 1] - offsets[i];
      if (r.tokens.empty() && r.opaque_tokens != 0) {
        r.opaque_tokens += len;
      } else {
        r.tokens.insert(r.tokens.end(), tokens.begin() + static_cast<std::ptrdiff_t>(offsets[i]),
                        tokens.begin() + static_cast<std::ptrdiff_t>(offsets[i + 1]));
      }
      // The block that was partial may have filled, and the new blocks are ours to write.
      fill(ids[i], had[i] == 0 ? 0 : had[i] - 1);
    }
  }

  void end() {
    const int m = static_cast<int>(pick(2));
    const auto ids = some_running(m, 4);
    if (ids.empty()) return;
    const std::uint32_t how = pick(3);
    if (how == 0) {
      managers_[m]->finish(ids);
    } else if (how == 1) {
      managers_[m]->abort(ids);
    } else {
      std::uint64_t expect = 0;
      for (RequestId id : ids) expect += managers_[m]->num_tokens(id);
      ASSERT_EQ(managers_[m]->preempt(ids), expect) << where_;
      for (RequestId id : ids) {
        if (!running_.at(id).tokens.empty()) resume_.emplace(id, running_.at(id));
      }
    }
    for (RequestId id : ids) {
      ASSERT_FALSE(managers_[m]->contains(id)) << where_;
      running_.erase(id);
    }
  }

  void evict_detached() {
    std::vector<BlockHash> digests;
    std::vector<BlockId> blocks;
    const std::uint32_t got = cache_->evict_detached(1 + pick(4), digests, blocks);
    ASSERT_EQ(blocks.size(), got) << where_;
    for (const BlockHash& d : digests) ASSERT_FALSE(cache_->contains(d)) << where_;
    for (BlockId b : blocks) {
      ASSERT_EQ(alloc_.ref_count(b), 1u) << where_ << ": a detached block has other references";
      content_[static_cast<std::size_t>(b)] = std::nullopt;  // "demoted": its bytes are gone
    }
    ASSERT_TRUE(alloc_.free(blocks).ok()) << where_;
  }

  // A third user of the cache: matches a running request's chain and releases it.
  void external_match_release() {
    if (running_.empty()) return;
    auto it = running_.begin();
    std::advance(it, pick(static_cast<std::uint32_t>(running_.size())));
    if (it->second.tokens.empty()) return;
    const auto d = digests_of(it->second.tokens, it->second.salt, it->second.extra);
    std::vector<BlockId> out(d.size());
    const std::uint32_t m = cache_->match(d, out);
    for (std::uint32_t j = 0; j < m; ++j) {
      const auto& held = content_[static_cast<std::size_t>(out[j])];
      ASSERT_TRUE(held.has_value() && *held == d[j]) << where_ << ": cached block " << out[j] << " holds other contents";
    }
    cache_->release(std::span<const BlockHash>(d).first(m));
  }

  void check() {
    ASSERT_NO_THROW(managers_[0]->check_invariants()) << where_;
    ASSERT_NO_THROW(managers_[1]->check_invariants()) << where_;
    ASSERT_NO_THROW(cache_->check_invariants()) << where_;
    ASSERT_EQ(alloc_.num_available() + alloc_.num_allocated(), cfg_.pool) << where_;
    const auto cached = cache_->cached_block_ids();
    const std::set<BlockId> cached_set(cached.begin(), cached.end());
    ASSERT_EQ(cached_set.size(), cached.size()) << where_ << ": a block cached twice";
    std::map<BlockId, int> in_tables;
    for (const auto& [id, r] : running_) {
      ASSERT_TRUE(managers_[r.manager]->contains(id)) << where_;
      for (BlockId b : managers_[r.manager]->block_table(id)) ++in_tables[b];
    }
    std::uint64_t refs = 0;
    for (BlockId b = 0; b < static_cast<BlockId>(cfg_.pool); ++b) {
      const std::uint32_t rc = alloc_.ref_count(b);
      refs += rc;
      const bool is_cached = cached_set.contains(b);
      const auto t = in_tables.find(b);
      const int uses = t == in_tables.end() ? 0 : t->second;
      if (rc == 0) {
        ASSERT_FALSE(is_cached) << where_ << ": cached block " << b << " is free";
        ASSERT_EQ(uses, 0) << where_ << ": block " << b << " in a running table is free";
        continue;
      }
      ASSERT_EQ(rc, 1u) << where_ << ": block " << b << " has " << rc << " references";
      if (!is_cached) {
        ASSERT_EQ(uses, 1) << where_ << ": uncached block " << b << " is in " << uses << " tables (leaked or shared)";
      }
    }
    const auto s0 = managers_[0]->stats();
    const auto s1 = managers_[1]->stats();
    ASSERT_EQ(refs, std::uint64_t{cache_->size()} + s0.owned_blocks + s1.owned_blocks) << where_;
    std::size_t n0 = 0;
    for (const auto& [id, r] : running_) n0 += r.manager == 0 ? 1 : 0;
    ASSERT_EQ(s0.running, n0) << where_;
    ASSERT_EQ(s1.running, running_.size() - n0) << where_;
  }

  Config cfg_;
  BlockAllocator alloc_;
  std::optional<PrefixCache> cache_;
  std::optional<RequestManager> managers_[2];
  std::mt19937 rng_;
  std::int64_t now_ns_ = 0;
  std::map<RequestId, Running> running_;
  std::map<RequestId, Running> resume_;
  std::vector<std::optional<BlockHash>> content_;
  std::string where_;
};

TEST(RequestManagerAdversarial, TwoManagersOneCacheUnbounded) {
  for (std::uint32_t seed = 1; seed <= 6; ++seed) {
    World w(Config{.pool = 48, .capacity = std::nullopt, .policy = EvictionPolicy::kLru, .events = seed % 2 == 0,
                   .seed = seed});
    w.run(3000);
    if (HasFailure()) return;
  }
}

TEST(RequestManagerAdversarial, TwoManagersOneBoundedCache) {
  const EvictionPolicy policies[] = {EvictionPolicy::kLru, EvictionPolicy::kFifo, EvictionPolicy::kPriority,
                                     EvictionPolicy::kTtl};
  for (std::uint32_t seed = 1; seed <= 8; ++seed) {
    World w(Config{.pool = 40, .capacity = 6 + seed * 2, .policy = policies[seed % 4], .events = seed % 3 == 0,
                   .seed = 100 + seed});
    w.run(3000);
    if (HasFailure()) return;
  }
}

// The same sharing on threads (meant for TSan): two managers, two request threads each with ids of
// their own, and a thread that evicts, detaches, clears and invalidates the cache meanwhile. Each
// request thread checks its manager's invariants as it goes (its requests' held blocks cannot
// leave the cache under it). At the end every request is finished: every allocated block is the
// cache's, with one reference, and clearing the cache frees the whole pool.
TEST(RequestManagerAdversarial, TwoManagersOneCacheOnThreads) {
  constexpr std::uint32_t kPool = 64;
  BlockAllocator alloc(kPool);
  PrefixCacheOptions o;
  o.block_size = kBs;
  o.capacity_blocks = 40;
  o.event_queue_capacity = 256;
  PrefixCache cache(o, &alloc);
  RequestManagerOptions mo;
  mo.block_size = kBs;
  RequestManager m0(alloc, &cache, mo);
  mo.match_last_token = true;
  RequestManager m1(alloc, &cache, mo);
  RequestManager* managers[2] = {&m0, &m1};
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  const auto worker = [&](int t) {
    RequestManager& m = *managers[t % 2];
    std::mt19937 rng(static_cast<std::uint32_t>(1000 + t));
    const auto pick = [&](std::uint32_t n) { return static_cast<std::uint32_t>(rng() % n); };
    std::vector<RequestId> mine;
    const RequestId base = static_cast<RequestId>(t) * 100;
    for (int step = 0; step < 2500; ++step) {
      const std::uint32_t op = pick(10);
      try {
        if (op < 4) {
          const RequestId id = base + 1 + pick(12);
          if (std::find(mine.begin(), mine.end(), id) != mine.end()) continue;
          std::vector<std::int32_t> tokens;
          const std::uint32_t stem = pick(3);
          const std::uint32_t len = 1 + pick(16);
          for (std::uint32_t i = 0; i < len; ++i) tokens.push_back(static_cast<std::int32_t>(stem * 1000 + i % 11));
          AdmitRequest a{id, tokens, pick(4) == 0 ? BlockHashKey{"s", ""} : BlockHashKey{}};
          std::uint32_t cached = 0;
          if (m.admit(std::span(&a, 1), std::span(&cached, 1)).ok()) mine.push_back(id);
        } else if (op < 7 && !mine.empty()) {
          const RequestId id = mine[pick(static_cast<std::uint32_t>(mine.size()))];
          const std::vector<std::int32_t> tokens(1 + pick(6), static_cast<std::int32_t>(pick(5)));
          const std::vector<std::size_t> offsets{0, tokens.size()};
          std::uint32_t nb = 0;
          (void)m.append(std::span(&id, 1), tokens, offsets, std::span(&nb, 1));
        } else if (!mine.empty()) {
          const std::size_t at = pick(static_cast<std::uint32_t>(mine.size()));
          const RequestId id = mine[at];
          mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(at));
          if (op == 7) {
            m.finish(std::span(&id, 1));
          } else if (op == 8) {
            m.abort(std::span(&id, 1));
          } else {
            (void)m.preempt(std::span(&id, 1));
          }
        }
        if (step % 16 == 0) m.check_invariants();
      } catch (const std::exception& e) {
        if (failures.fetch_add(1) < 3) ADD_FAILURE() << "thread " << t << " step " << step << ": " << e.what();
        return;
      }
    }
    m.finish(mine);
  };
  std::thread janitor([&] {
    std::mt19937 rng(7);
    while (!stop.load()) {
      switch (rng() % 5) {
        case 0: (void)cache.evict(1 + static_cast<std::uint32_t>(rng() % 4)); break;
        case 1: {
          std::vector<BlockHash> d;
          std::vector<BlockId> b;
          (void)cache.evict_detached(1 + static_cast<std::uint32_t>(rng() % 3), d, b);
          for (BlockId x : b) {
            if (alloc.ref_count(x) != 1 && failures.fetch_add(1) < 3) ADD_FAILURE() << "detached block shared";
          }
          if (!alloc.free(b).ok() && failures.fetch_add(1) < 3) ADD_FAILURE() << "detached block not ours";
          break;
        }
        case 2: (void)cache.clear(); break;
        case 3: (void)cache.invalidate(0); break;
        default: (void)cache.drain_events(); break;
      }
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  stop.store(true);
  janitor.join();
  ASSERT_EQ(failures.load(), 0);
  m0.check_invariants();
  m1.check_invariants();
  cache.check_invariants();
  EXPECT_EQ(m0.stats().running + m1.stats().running, 0u);
  EXPECT_EQ(m0.stats().owned_blocks + m1.stats().owned_blocks, 0u);
  EXPECT_EQ(cache.stats().in_use_blocks, 0u);
  EXPECT_EQ(alloc.num_allocated(), cache.size());
  for (BlockId b : cache.cached_block_ids()) EXPECT_EQ(alloc.ref_count(b), 1u);
  for (const RequestManager* m : {&m0, &m1}) {
    const auto st = m->stats();
    std::printf("admitted %llu refused %llu hit %llu/%llu published %llu evicted %llu; cache evictions %llu removals %llu\n",
                static_cast<unsigned long long>(st.admitted), static_cast<unsigned long long>(st.refused),
                static_cast<unsigned long long>(st.hit_blocks), static_cast<unsigned long long>(st.queried_blocks),
                static_cast<unsigned long long>(st.published_blocks), static_cast<unsigned long long>(st.evicted_for_room),
                static_cast<unsigned long long>(cache.stats().evictions),
                static_cast<unsigned long long>(cache.stats().removals));
  }
  EXPECT_GT(m0.stats().published_blocks + m1.stats().published_blocks, 0u);
  EXPECT_GT(m0.stats().hit_blocks + m1.stats().hit_blocks, 0u);
  (void)cache.clear();
  EXPECT_EQ(alloc.num_allocated(), 0u);
  EXPECT_EQ(alloc.num_available(), kPool);
}

}  // namespace
}  // namespace sagellm::kv
