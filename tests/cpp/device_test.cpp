#include "sagellm_kv/device.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include "device/backends.hpp"
#include "sagellm_kv/error.hpp"
#include "test_support.hpp"

namespace sagellm::kv {
namespace {

using testing::code_of;

TEST(DeviceId, ParsesAndPrints) {
  EXPECT_EQ(DeviceId::parse("cpu").str(), "cpu");
  EXPECT_EQ(DeviceId::parse("cuda:1").index, 1);
  EXPECT_EQ(DeviceId::parse("cuda:1").str(), "cuda:1");
  EXPECT_EQ(code_of([] { (void)DeviceId::parse("cuda:"); }), ErrorCode::kUnknownDevice);
  EXPECT_EQ(code_of([] { (void)DeviceId::parse("cuda:-1"); }), ErrorCode::kUnknownDevice);
  EXPECT_EQ(code_of([] { (void)DeviceId::parse("CUDA"); }), ErrorCode::kUnknownDevice);
  EXPECT_EQ(code_of([] { (void)DeviceId::parse(""); }), ErrorCode::kUnknownDevice);
  EXPECT_EQ(DeviceId::parse("cuda:0").str(), "cuda:0");
  EXPECT_EQ(DeviceId::parse("cuda:10").index, 10);
  for (const char* bad : {"cuda:01", "cuda:00", "cuda:0x", "cuda:+1", " cuda:0", "cuda: 1", "cuda:0 ", "cuda:0:1",
                          "cuda:2147483648", "CPU"}) {
    EXPECT_EQ(code_of([bad] { (void)DeviceId::parse(bad); }), ErrorCode::kUnknownDevice) << bad;
  }
}

TEST(Registry, UnknownDeviceNamesTheKnownOnes) {
  try {
    (void)allocator_for("tpu:0");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnknownDevice);
    EXPECT_NE(std::string(e.what()).find("tpu:0"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("cpu"), std::string::npos);
  }
}

TEST(Registry, CpuHasOneDevice) {
  EXPECT_EQ(code_of([] { (void)allocator_for("cpu:1"); }), ErrorCode::kUnknownDevice);
  EXPECT_EQ(allocator_for("cpu"), allocator_for("cpu:0"));
}

// Runs `fn` on a detached thread, so a test can time out on a deadlock instead of hanging.
std::future<std::shared_ptr<DeviceAllocator>> run_detached(std::function<std::shared_ptr<DeviceAllocator>()> fn) {
  std::packaged_task<std::shared_ptr<DeviceAllocator>()> task(std::move(fn));
  auto result = task.get_future();
  std::thread(std::move(task)).detach();
  return result;
}

constexpr auto kDeadlockTimeout = std::chrono::seconds(10);

TEST(Registry, FactoryMayAskForAnotherDevice) {
  // A backend built on the cpu one (e.g. a pinned staging allocator) asks for "cpu" from its
  // factory: that deadlocked while the registry lock was held across the factory call.
  register_backend("nested", [](const DeviceId&) { return allocator_for("cpu"); });
  auto made = run_detached([] { return allocator_for("nested:0"); });
  ASSERT_EQ(made.wait_for(kDeadlockTimeout), std::future_status::ready) << "allocator_for deadlocked";
  EXPECT_EQ(made.get(), allocator_for("cpu"));
}

TEST(Registry, FactoryAskingForItsOwnDeviceIsRefused) {
  register_backend("selfish", [](const DeviceId& id) { return allocator_for(id.str()); });
  auto made = run_detached([] { return allocator_for("selfish:0"); });
  ASSERT_EQ(made.wait_for(kDeadlockTimeout), std::future_status::ready) << "allocator_for deadlocked";
  EXPECT_EQ(code_of([&] { (void)made.get(); }), ErrorCode::kInvalidArgument);
}

// A factory that reports when it runs and then waits for the test to let it finish.
struct GatedFactory {
  std::shared_ptr<std::promise<void>> entered = std::make_shared<std::promise<void>>();
  std::shared_ptr<std::promise<void>> gate = std::make_shared<std::promise<void>>();
  std::shared_future<void> gate_open = gate->get_future().share();

  BackendFactory factory() const {
    return [entered = entered, gate_open = gate_open](const DeviceId&) {
      entered->set_value();
      gate_open.wait();
      return detail::make_cpu_allocator(DeviceId{"cpu", 0});
    };
  }
};

TEST(Registry, SlowFactoryBlocksNoOtherLookup) {
  // A CUDA factory may spend seconds loading the runtime; lookups of other devices go on.
  GatedFactory slow;
  register_backend("slow", slow.factory());
  auto slow_made = run_detached([] { return allocator_for("slow:0"); });
  slow.entered->get_future().wait();
  auto cpu = run_detached([] { return allocator_for("cpu"); });
  const bool cpu_ready = cpu.wait_for(kDeadlockTimeout) == std::future_status::ready;
  slow.gate->set_value();
  EXPECT_TRUE(cpu_ready) << "a cpu lookup waited for another device's factory";
  ASSERT_EQ(slow_made.wait_for(kDeadlockTimeout), std::future_status::ready);
  EXPECT_EQ(slow_made.get(), allocator_for("slow:0"));
}

TEST(Registry, FactoryReplacedDuringItsCallIsNotCached) {
  GatedFactory old_factory;
  register_backend("swapped", old_factory.factory());
  auto made = run_detached([] { return allocator_for("swapped:0"); });
  old_factory.entered->get_future().wait();
  const auto replacement = detail::make_cpu_allocator(DeviceId{"cpu", 0});
  auto registered = std::async(std::launch::async, [&] {
    register_backend("swapped", [replacement](const DeviceId&) { return replacement; });
  });
  const bool registered_meanwhile = registered.wait_for(kDeadlockTimeout) == std::future_status::ready;
  old_factory.gate->set_value();
  registered.wait();
  EXPECT_TRUE(registered_meanwhile) << "register_backend waited for a factory call";
  ASSERT_EQ(made.wait_for(kDeadlockTimeout), std::future_status::ready);
  EXPECT_EQ(made.get(), replacement) << "the replaced factory's allocator was returned";
  EXPECT_EQ(allocator_for("swapped:0"), replacement) << "the replaced factory's allocator was cached";
}

TEST(Registry, ThrowingFactoryCachesNothing) {
  auto calls = std::make_shared<std::atomic<int>>(0);
  register_backend("flaky", [calls](const DeviceId&) -> std::shared_ptr<DeviceAllocator> {
    if (calls->fetch_add(1) == 0) throw Error(ErrorCode::kBackendUnavailable, "not yet");
    return detail::make_cpu_allocator(DeviceId{"cpu", 0});
  });
  EXPECT_EQ(code_of([] { (void)allocator_for("flaky:0"); }), ErrorCode::kBackendUnavailable);
  const auto second = allocator_for("flaky:0");
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(allocator_for("flaky:0"), second);
  EXPECT_EQ(calls->load(), 2);
}

TEST(CpuAllocator, AlignedZeroFilledMemory) {
  auto alloc = allocator_for("cpu");
  AllocationRequest req;
  req.size = 1000;
  req.alignment = 4096;
  req.zero_fill = true;
  Allocation a = alloc->allocate(req);
  ASSERT_TRUE(a);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a.data()) % 4096, 0u);
  const auto* bytes = static_cast<const unsigned char*>(a.data());
  for (std::size_t i = 0; i < req.size; ++i) ASSERT_EQ(bytes[i], 0);
  std::memset(a.data(), 0xAB, req.size);  // writable
  Allocation moved = std::move(a);
  EXPECT_FALSE(a);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  EXPECT_EQ(moved.size(), 1000u);
}

TEST(CpuAllocator, HugePageRequestStillWorks) {
  AllocationRequest req;
  req.size = std::size_t{3} << 20;
  req.huge_pages = true;
  Allocation a = allocator_for("cpu")->allocate(req);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a.data()) % (std::size_t{2} << 20), 0u);
}

TEST(CpuAllocator, RejectsBadRequests) {
  auto alloc = allocator_for("cpu");
  AllocationRequest zero;
  EXPECT_EQ(code_of([&] { (void)alloc->allocate(zero); }), ErrorCode::kInvalidArgument);
  AllocationRequest odd;
  odd.size = 64;
  odd.alignment = 48;
  EXPECT_EQ(code_of([&] { (void)alloc->allocate(odd); }), ErrorCode::kInvalidArgument);
  AllocationRequest huge;
  huge.size = std::size_t{1} << 62;
  EXPECT_EQ(code_of([&] { (void)alloc->allocate(huge); }), ErrorCode::kMemoryExhausted);
}

TEST(CpuAllocator, SizeNearTheTopOfTheAddressSpaceIsExhaustedNotWrapped) {
  // Rounding such a size up to the alignment wraps to a few bytes; those must not be handed out
  // as an allocation of the size asked for (a zero fill of it would run over the heap).
  auto alloc = allocator_for("cpu");
  for (std::size_t alignment : {std::size_t{64}, std::size_t{4096}}) {
    AllocationRequest req;
    req.size = SIZE_MAX - 10;
    req.alignment = alignment;
    EXPECT_EQ(code_of([&] { (void)alloc->allocate(req); }), ErrorCode::kMemoryExhausted) << alignment;
  }
  AllocationRequest huge_pages;
  huge_pages.size = SIZE_MAX - (std::size_t{1} << 20);
  huge_pages.huge_pages = true;
  EXPECT_EQ(code_of([&] { (void)alloc->allocate(huge_pages); }), ErrorCode::kMemoryExhausted);
}

// Kibibytes of locked memory of this process (VmLck in /proc/self/status), or -1 if unknown.
long locked_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmLck:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

TEST(CpuAllocator, LockedMemoryIsUnlockedWhenFreed) {
  // lock = true on pageable host memory, and a pinned size that is not a multiple of the
  // alignment: both must leave no page locked once freed (locked pages left behind count
  // against RLIMIT_MEMLOCK until the process ends, and stay locked under later heap users).
  const long before = locked_kib();
  if (before < 0) GTEST_SKIP() << "no VmLck in /proc/self/status";
  auto alloc = allocator_for("cpu");
  AllocationRequest locked;
  locked.size = 64 * 1024;  // below malloc's mmap threshold: freed into the heap, not unmapped
  locked.alignment = 4096;
  locked.lock = true;
  AllocationRequest pinned;
  pinned.size = 5000;
  pinned.alignment = 64;
  pinned.kind = MemoryKind::kPinnedHost;
  for (const AllocationRequest& req : {locked, pinned}) {
    Allocation a;
    try {
      a = alloc->allocate(req);
    } catch (const Error& e) {
      GTEST_SKIP() << "mlock refused here: " << e.what();
    }
    if (locked_kib() < before + static_cast<long>(req.size / 1024)) {
      GTEST_SKIP() << "mlock does not show in VmLck here (sanitizers intercept it)";
    }
    a = Allocation();
    EXPECT_EQ(locked_kib(), before) << "bytes " << req.size << " kind " << static_cast<int>(req.kind);
  }
}

TEST(CudaAllocator, FailsCleanlyOrWorks) {
  // Without a GPU (or without the runtime) "cuda:0" is a clear error naming the device; with one,
  // a device allocation round-trips through host memory.
  std::shared_ptr<DeviceAllocator> alloc;
  try {
    alloc = allocator_for("cuda:0");
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kBackendUnavailable);
    EXPECT_NE(std::string(e.what()).find("cuda:0"), std::string::npos);
    GTEST_SKIP() << "no usable CUDA device: " << e.what();
  }
  AllocationRequest req;
  req.size = 1 << 20;
  req.kind = MemoryKind::kDevice;
  req.zero_fill = true;
  Allocation dev = alloc->allocate(req);
  std::vector<unsigned char> host(req.size, 7), back(req.size, 1);
  alloc->copy(dev.data(), host.data(), req.size, CopyKind::kHostToDevice);
  alloc->copy(back.data(), dev.data(), req.size, CopyKind::kDeviceToHost);
  EXPECT_EQ(host, back);
  AllocationRequest pinned;
  pinned.size = 4096;
  pinned.kind = MemoryKind::kPinnedHost;
  Allocation p = alloc->allocate(pinned);
  std::memset(p.data(), 1, pinned.size);
}

}  // namespace
}  // namespace sagellm::kv
