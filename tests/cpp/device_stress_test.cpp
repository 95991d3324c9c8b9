// Threads allocate and free through one shared cpu allocator (locked and plain memory: the
// allocator keeps a table of locked ranges) while others look allocators up and re-register a
// backend. Fixed seeds and thread counts; meant to run under TSan.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "sagellm_kv/device.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv {
namespace {

TEST(DeviceStress, SharedCpuAllocatorAndRegistryFromManyThreads) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 400;
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, &refused] {
      std::mt19937 rng(static_cast<std::uint32_t>(7 + t));
      std::vector<Allocation> held;
      for (int i = 0; i < kRounds; ++i) {
        AllocationRequest req;
        req.size = 1 + rng() % 20000;
        req.lock = rng() % 2 == 0;
        req.kind = rng() % 4 == 0 ? MemoryKind::kPinnedHost : MemoryKind::kHost;
        try {
          held.push_back(allocator_for(rng() % 2 == 0 ? "cpu" : "cpu:0")->allocate(req));
          std::memset(held.back().data(), t, req.size);
        } catch (const Error& e) {
          ASSERT_EQ(e.code(), ErrorCode::kMemoryExhausted);  // RLIMIT_MEMLOCK reached: a clean refusal
          refused.fetch_add(1, std::memory_order_relaxed);
        }
        if (held.size() > 8 || rng() % 3 == 0) held.erase(held.begin() + static_cast<std::ptrdiff_t>(rng() % held.size()));
      }
    });
  }
  threads.emplace_back([] {
    for (int i = 0; i < 200; ++i) {
      register_backend("stress_dev", [](const DeviceId& id) -> std::shared_ptr<DeviceAllocator> {
        throw Error(ErrorCode::kBackendUnavailable, "device '" + id.str() + "' is a test stand-in");
      });
      try {
        (void)allocator_for("stress_dev:1");
        ADD_FAILURE() << "expected kBackendUnavailable";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kBackendUnavailable);
      }
      (void)registered_backends();
    }
  });
  for (auto& th : threads) th.join();
  EXPECT_LT(refused.load(), kThreads * kRounds);
}

}  // namespace
}  // namespace sagellm::kv
