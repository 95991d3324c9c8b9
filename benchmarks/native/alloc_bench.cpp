// W1 in C++ alone: alloc/free churn of 1..64-block requests on a 65,536-block pool, the same
// request pattern as benchmarks/w1_alloc.py (sizes from a fixed seed, at most 1,000 live requests).
// Prints ns per block allocated+freed, single thread and with 2 threads sharing the allocator.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <span>
#include <random>
#include <thread>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"

namespace {

using sagellm::kv::BlockAllocator;
using sagellm::kv::BlockId;

double churn(BlockAllocator& a, const std::vector<int>& sizes, std::size_t live_limit) {
  // A ring of preallocated id buffers: the loop measures the allocator, not malloc.
  std::vector<std::vector<BlockId>> ring(live_limit, std::vector<BlockId>(64));
  std::vector<std::size_t> counts(live_limit, 0);
  std::size_t blocks = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::size_t slot = i % live_limit;
    if (counts[slot] != 0 && !a.free(std::span<const BlockId>(ring[slot].data(), counts[slot])).ok()) std::abort();
    counts[slot] = static_cast<std::size_t>(sizes[i]);
    if (!a.allocate(std::span<BlockId>(ring[slot].data(), counts[slot])).ok()) std::abort();
    blocks += counts[slot];
  }
  for (std::size_t slot = 0; slot < live_limit; ++slot) {
    if (counts[slot] != 0 && !a.free(std::span<const BlockId>(ring[slot].data(), counts[slot])).ok()) std::abort();
  }
  const std::chrono::duration<double, std::nano> elapsed = std::chrono::steady_clock::now() - start;
  return elapsed.count() / static_cast<double>(blocks);
}

}  // namespace

int main() {
  constexpr std::uint32_t kBlocks = 65536;
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> dist(1, 64);
  std::vector<int> sizes(200000);
  for (int& s : sizes) s = dist(rng);

  BlockAllocator a(kBlocks);
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) best = std::min(best, churn(a, sizes, 1000));
  std::printf("W1 native, 1 thread : %.2f ns per block allocated+freed\n", best);

  double two = 0;
  std::vector<std::thread> threads;
  std::vector<double> results(2);
  for (std::size_t t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] { results[t] = churn(a, sizes, 500); });
  }
  for (auto& th : threads) th.join();
  two = (results[0] + results[1]) / 2;
  std::printf("W1 native, 2 threads: %.2f ns per block allocated+freed (per thread, shared allocator)\n", two);
  std::printf("allocator metadata: %zu bytes per block\n", BlockAllocator::metadata_bytes_per_block());
  return 0;
}
