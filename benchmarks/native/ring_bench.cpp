// The ceiling of W5's same-host path on this machine: the shared-ring handover with nothing but the
// copies. Two threads play source and destination over real PagedKVPools with W5's geometry (2 MiB
// blocks of a Llama-3-8B shard, a random permutation of ids): the source gathers chunks into the
// slots of a ring, the destination scatters them out, and they hand slots over through two atomic
// counters they spin on: no sockets, no footers, no Python. Threads of one process share memory
// exactly as two processes mapping one memfd do, so this is what the protocol in
// python/sagellm_kv_cache/transfer/shm.py could at best reach. Reference: one memcpy of the same
// bytes (W5's). Prints GB/s and the ratio for checksummed copies (what the library does) and plain
// ones, per slot size.
//
//   benchmarks/native/ring_bench [MiB=1024] [repeats=3]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/segment_sum.hpp"

namespace {

using namespace sagellm::kv;
using Clock = std::chrono::steady_clock;

// The ring lives in a memfd mapped shared, as the library's does (so it gets the same pages: this
// kernel's shmem has no transparent huge pages unless the admin enables them).
struct Ring {
  Ring(std::size_t slot_count, std::size_t slot_size) : slots(slot_count), slot_bytes(slot_size) {
    const int fd = memfd_create("ring_bench", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, static_cast<off_t>(slots * slot_bytes)) != 0) std::abort();
    void* at = mmap(nullptr, slots * slot_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (at == MAP_FAILED) std::abort();
    base = static_cast<std::byte*>(at);
    std::memset(base, 0, slots * slot_bytes);
  }
  ~Ring() { munmap(base, slots * slot_bytes); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  std::byte* base = nullptr;
  std::size_t slots = 0;
  std::size_t slot_bytes = 0;
  alignas(64) std::atomic<std::size_t> filled{0};   // chunks the source has written
  alignas(64) std::atomic<std::size_t> drained{0};  // chunks the destination has read
};

// Spins briefly, then yields the core: on a loaded machine the other side may need this one.
void spin_until(const std::atomic<std::size_t>& counter, std::size_t at_least) {
  for (int spins = 0; counter.load(std::memory_order_acquire) < at_least; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct Timing {
  double wall = 0;        // seconds for the handover
  double source_copy = 0;  // seconds each side spent inside its copies (the rest is waiting)
  double destination_copy = 0;
};

// One handover of `ids` (source pool) into `dst_ids` (destination pool) through `ring`.
Timing handover(const PagedKVPool& src, std::span<const BlockId> ids, PagedKVPool& dst,
                std::span<const BlockId> dst_ids, Ring& ring, bool summed) {
  const std::size_t per_chunk = ring.slot_bytes / src.block_bytes();
  const std::size_t chunks = (ids.size() + per_chunk - 1) / per_chunk;
  ring.filled.store(0);
  ring.drained.store(0);
  std::vector<std::uint64_t> src_sums(segment_count(ring.slot_bytes));
  std::vector<std::uint64_t> dst_sums(segment_count(ring.slot_bytes));
  const auto chunk_of = [&](std::size_t c, std::span<const BlockId> all) {
    const std::size_t first = c * per_chunk;
    return all.subspan(first, std::min(per_chunk, all.size() - first));
  };
  Timing timing;
  const auto start = Clock::now();
  std::thread source([&] {
    for (std::size_t c = 0; c < chunks; ++c) {
      if (c >= ring.slots) spin_until(ring.drained, c - ring.slots + 1);
      const auto part = chunk_of(c, ids);
      std::span<std::byte> slot(ring.base + (c % ring.slots) * ring.slot_bytes, part.size() * src.block_bytes());
      const auto copy_start = Clock::now();
      if (summed) {
        src.gather_summed(part, slot, std::span(src_sums).first(segment_count(slot.size())));
      } else {
        src.gather(part, slot);
      }
      timing.source_copy += since(copy_start);
      ring.filled.store(c + 1, std::memory_order_release);
    }
  });
  for (std::size_t c = 0; c < chunks; ++c) {
    spin_until(ring.filled, c + 1);
    const auto part = chunk_of(c, dst_ids);
    std::span<const std::byte> slot(ring.base + (c % ring.slots) * ring.slot_bytes,
                                    part.size() * dst.block_bytes());
    const auto copy_start = Clock::now();
    if (summed) {
      dst.scatter_summed(slot, part, std::span(dst_sums).first(segment_count(slot.size())));
    } else {
      dst.scatter(slot, part);
    }
    timing.destination_copy += since(copy_start);
    ring.drained.store(c + 1, std::memory_order_release);
  }
  source.join();
  timing.wall = since(start);
  return timing;
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 3;
  const KVCacheSpec spec{32, 8, 128, DType::kFloat16, 16};  // W5's: 2 MiB per block
  const auto n = static_cast<std::uint32_t>((mib << 20) / spec.block_bytes());
  if (n == 0 || repeats < 1) {
    std::fprintf(stderr, "usage: ring_bench [MiB >= 2] [repeats >= 1]\n");
    return 2;
  }
  PoolOptions options;
  options.huge_pages = true;
  PagedKVPool src(spec, n + 8, options);
  PagedKVPool dst(spec, n + 8, options);
  std::vector<BlockId> all(n + 8);
  src.allocate(all);
  std::vector<BlockId> ids(all);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(static_cast<unsigned>(mib)));
  ids.resize(n);
  std::vector<BlockId> dst_ids(n);
  dst.allocate(dst_ids);
  for (std::uint32_t layer = 0; layer < spec.num_layers; ++layer) {  // touch every page of both pools
    for (bool value : {false, true}) {
      std::memset(src.layer_data(layer, value), 1, std::size_t{n + 8} * spec.layer_block_bytes());
      std::memset(dst.layer_data(layer, value), 2, std::size_t{n + 8} * spec.layer_block_bytes());
    }
  }

  const std::size_t total = std::size_t{n} * spec.block_bytes();
  std::vector<std::byte> from(total, std::byte{3});
  std::vector<std::byte> to(total, std::byte{4});
  double memcpy_s = 1e9;
  for (int r = 0; r < repeats; ++r) {
    const auto t = Clock::now();
    std::memcpy(to.data(), from.data(), total);
    memcpy_s = std::min(memcpy_s, std::chrono::duration<double>(Clock::now() - t).count());
  }
  const double memcpy_gbps = static_cast<double>(total) / memcpy_s / 1e9;
  std::printf("%zu MiB in %u blocks of %zu KiB; memcpy %.2f GB/s (best of %d)\n", total >> 20, n,
              spec.block_bytes() >> 10, memcpy_gbps, repeats);
  std::printf("%-8s %6s %9s %8s %7s %14s\n", "copies", "slots", "slot KiB", "GB/s", "ratio", "copy ms src/dst");
  for (const bool summed : {true, false}) {
    for (const std::size_t slot_mib : {std::size_t{2}, std::size_t{4}, std::size_t{8}}) {
      for (const std::size_t slots : {std::size_t{2}, std::size_t{4}}) {
        Ring ring(slots, slot_mib << 20);
        Timing best{1e9, 0, 0};
        for (int r = 0; r <= repeats; ++r) {  // the first round warms the ring
          const Timing t = handover(src, ids, dst, dst_ids, ring, summed);
          if (r > 0 && t.wall < best.wall) best = t;
        }
        const double gbps = static_cast<double>(total) / best.wall / 1e9;
        std::printf("%-8s %6zu %9zu %8.2f %7.2f %7.0f/%.0f\n", summed ? "summed" : "plain", slots,
                    ring.slot_bytes >> 10, gbps, gbps / memcpy_gbps, best.source_copy * 1e3, best.destination_copy * 1e3);
      }
    }
  }
  return 0;
}
