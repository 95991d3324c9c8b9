// The request manager in C++ alone, to separate the core's cost from the Python boundary:
//   W2: 20,000 requests = one of 1,000 shared 1,024-token prompts + 256 fresh tokens, each admitted
//       and finished (hash, match, allocate, publish, release), unbounded cache; W3: the same with
//       the cache bounded to 8,192 blocks (LRU). SHA-256 and XXH3-128.
//   STEP: 256 running 1,024-token requests append one token each per step (one batched call).
// Token ids are int32 vectors made up front; prints us per request / per step, wall clock and this
// thread's CPU time (the latter is not inflated when other processes take the core away).
// Arguments (optional): a workload (W2, W3 or STEP) and a hash algorithm name run only that
// combination, e.g. `manager_bench W3 sha256`, for per-workload instruction counts (perf stat);
// SETUP only makes the requests (the part of a W2/W3 run's count that is not the manager's).
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <string_view>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"
#include "sagellm_kv/request_manager.hpp"

namespace {

using namespace sagellm::kv;

constexpr std::uint32_t kBlock = 16;

std::vector<std::vector<std::int32_t>> make_requests(std::size_t n, std::size_t prompts, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::int32_t> tok(0, 31999);
  std::vector<std::vector<std::int32_t>> shared(prompts, std::vector<std::int32_t>(1024));
  for (auto& p : shared) {
    for (auto& t : p) t = tok(rng);
  }
  std::vector<std::vector<std::int32_t>> out(n);
  for (auto& r : out) {
    r = shared[rng() % prompts];
    for (int i = 0; i < 256; ++i) r.push_back(tok(rng));
  }
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// CPU time of the calling thread, in seconds.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

void prefix_workload(const char* name, const std::vector<std::vector<std::int32_t>>& requests,
                     std::optional<std::uint32_t> capacity, std::uint32_t pool_blocks, HashAlgorithm alg) {
  BlockAllocator alloc(pool_blocks);
  PrefixCacheOptions o;
  o.block_size = kBlock;
  o.capacity_blocks = capacity;
  PrefixCache cache(o, &alloc);
  RequestManagerOptions mo;
  mo.block_size = kBlock;
  mo.hash_algorithm = alg;
  mo.match_last_token = true;
  RequestManager manager(alloc, &cache, mo);
  std::vector<BlockId> table;
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = thread_cpu_seconds();
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const AdmitRequest r{i, requests[i], {}};
    std::uint32_t cached = 0;
    table.clear();
    if (!manager.admit(std::span<const AdmitRequest>(&r, 1), std::span<std::uint32_t>(&cached, 1), &table).ok()) {
      std::abort();
    }
    const RequestId id = i;
    manager.finish(std::span<const RequestId>(&id, 1));
  }
  const double us = seconds_since(start) / static_cast<double>(requests.size()) * 1e6;
  const double cpu_us = (thread_cpu_seconds() - cpu_start) / static_cast<double>(requests.size()) * 1e6;
  const RequestManagerStats st = manager.stats();
  std::printf("%-4s %-9s %8.2f us/request (cpu %.2f)  hit ratio %.5f\n", name,
              std::string(hash_algorithm_name(alg)).c_str(), us, cpu_us,
              static_cast<double>(st.hit_blocks) / static_cast<double>(st.queried_blocks));
}

void step_workload(HashAlgorithm alg) {
  constexpr std::size_t kRunning = 256;
  constexpr int kSteps = 1024;
  BlockAllocator alloc(65536);
  PrefixCacheOptions o;
  o.block_size = kBlock;
  PrefixCache cache(o, &alloc);
  RequestManagerOptions mo;
  mo.block_size = kBlock;
  mo.hash_algorithm = alg;
  RequestManager manager(alloc, &cache, mo);
  const auto prompts = make_requests(kRunning, 32, 7);
  std::vector<AdmitRequest> admits;
  std::vector<RequestId> ids;
  for (std::size_t i = 0; i < kRunning; ++i) {
    admits.push_back({i, std::span<const std::int32_t>(prompts[i]).first(1024), {}});
    ids.push_back(i);
  }
  std::vector<std::uint32_t> cached(kRunning);
  if (!manager.admit(admits, cached).ok()) std::abort();
  std::vector<std::size_t> offsets(kRunning + 1);
  for (std::size_t i = 0; i <= kRunning; ++i) offsets[i] = i;
  std::vector<std::int32_t> tokens(kRunning);
  std::vector<std::uint32_t> counts(kRunning);
  std::vector<BlockId> fresh;
  std::mt19937 rng(3);
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = thread_cpu_seconds();
  for (int s = 0; s < kSteps; ++s) {
    for (auto& t : tokens) t = static_cast<std::int32_t>(rng() % 32000);
    fresh.clear();
    if (!manager.append(ids, tokens, offsets, counts, &fresh).ok()) std::abort();
  }
  std::printf("STEP %-9s %8.2f us/step (cpu %.2f; 256 requests, 1 token each)\n",
              std::string(hash_algorithm_name(alg)).c_str(), seconds_since(start) / kSteps * 1e6,
              (thread_cpu_seconds() - cpu_start) / kSteps * 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string_view only = argc > 1 ? argv[1] : "";
  // A misspelt workload ran nothing and exited 0; a bad hash name ended in std::terminate.
  if (argc > 3 || !(only.empty() || only == "W2" || only == "W3" || only == "STEP" || only == "SETUP")) {
    std::fprintf(stderr, "usage: manager_bench [W2|W3|STEP|SETUP [sha256|xxh3_128]]\n");
    return 2;
  }
  const auto runs = [&](std::string_view name) { return only.empty() || only == name; };
  std::vector<HashAlgorithm> algs{HashAlgorithm::kSha256};
  if (hash_algorithm_available(HashAlgorithm::kXxh3_128)) algs.push_back(HashAlgorithm::kXxh3_128);
  if (argc > 2) {
    try {
      algs.assign(1, parse_hash_algorithm(argv[2]));
    } catch (const Error& e) {
      std::fprintf(stderr, "manager_bench: %s\n", e.what());
      return 2;
    }
  }
  if (runs("W2") || runs("W3") || only == "SETUP") {
    const auto requests = make_requests(20000, 1000, 0);
    std::size_t total = 0;
    for (const auto& r : requests) total += r.size() / kBlock;
    if (runs("W2")) {
      for (HashAlgorithm alg : algs) prefix_workload("W2", requests, std::nullopt, static_cast<std::uint32_t>(total), alg);
    }
    if (runs("W3")) {
      for (HashAlgorithm alg : algs) prefix_workload("W3", requests, 8192, 8192 + 80, alg);
    }
  }
  if (runs("STEP")) {
    for (HashAlgorithm alg : algs) step_workload(alg);
  }
  return 0;
}
