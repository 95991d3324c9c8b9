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

#include "device/backends.hpp"
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

// Factories run outside the registry lock: threads racing to make the same device (whose factory
// asks for "cpu" itself) all get the one cached allocator, while another thread re-registers the
// backend, which may make a racing call retry with the new factory.
TEST(DeviceStress, ConcurrentFirstLookupsShareOneAllocator) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 200;
  const auto factory = [](const DeviceId&) -> std::shared_ptr<DeviceAllocator> {
    (void)allocator_for("cpu");
    return detail::make_cpu_allocator(DeviceId{"cpu", 0});
  };
  for (int round = 0; round < kRounds; ++round) {
    const std::string type = "race_dev" + std::to_string(round % 4);
    register_backend(type, factory);
    std::vector<std::shared_ptr<DeviceAllocator>> got(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] { got[static_cast<std::size_t>(t)] = allocator_for(type + ":0"); });
    }
    for (auto& th : threads) th.join();
    for (const auto& a : got) ASSERT_EQ(a, got[0]) << "round " << round;
    ASSERT_EQ(allocator_for(type + ":0"), got[0]);
  }
  register_backend("race_swap", factory);
  std::atomic<bool> stop{false};
  std::thread reregister([&] {
    for (int i = 0; i < kRounds; ++i) register_backend("race_swap", factory);
    stop.store(true, std::memory_order_release);
  });
  std::vector<std::thread> lookups;
  for (int t = 0; t < kThreads; ++t) {
    lookups.emplace_back([&] {
      while (!stop.load(std::memory_order_acquire)) ASSERT_NE(allocator_for("race_swap:0"), nullptr);
    });
  }
  reregister.join();
  for (auto& th : lookups) th.join();
}

}  // namespace
}  // namespace sagellm::kv
