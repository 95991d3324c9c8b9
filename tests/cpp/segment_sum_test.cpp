// Segment sums (segment_sum.hpp), the fused copy+sum kernel under them, and the pool's
// gather_summed / scatter_summed that use it.
#include "sagellm_kv/segment_sum.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/copy.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "test_support.hpp"

namespace sagellm::kv {
namespace {

using testing::code_of;

std::vector<std::byte> random_bytes(std::size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng() & 0xFF);
  return out;
}

// The definition, word by word: what every fast path must reproduce.
std::vector<std::uint64_t> reference_sums(const std::byte* data, std::size_t n) {
  std::vector<std::uint64_t> sums(segment_count(n), 0);
  for (std::size_t j = 0; j < sums.size(); ++j) {
    for (std::size_t w = 0; w < kSegmentBytes / 8; ++w) {
      std::uint64_t v = 0;
      for (std::size_t b = 0; b < 8; ++b) {
        v |= std::uint64_t{std::to_integer<std::uint8_t>(data[j * kSegmentBytes + w * 8 + b])} << (8 * b);
      }
      sums[j] += v;
    }
  }
  return sums;
}

TEST(SegmentSums, MatchTheDefinitionForAnySizeAndAlignment) {
  const auto data = random_bytes(5 * kSegmentBytes + 1000, 1);
  for (std::size_t start : {0u, 1u, 3u, 8u, 13u}) {
    for (std::size_t n : {std::size_t{0}, std::size_t{100}, kSegmentBytes, 3 * kSegmentBytes + 7, 5 * kSegmentBytes}) {
      const std::span<const std::byte> view(data.data() + start, n);
      std::vector<std::uint64_t> sums(segment_count(n), 0xDEAD);
      segment_sums(view, sums);
      EXPECT_EQ(sums, reference_sums(view.data(), n)) << "start " << start << " n " << n;
    }
  }
}

TEST(SegmentSums, WrongRoomIsRefusedBeforeWriting) {
  const auto data = random_bytes(2 * kSegmentBytes, 2);
  std::vector<std::uint64_t> sums(3, 7);
  EXPECT_EQ(code_of([&] { segment_sums(data, sums); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(sums, std::vector<std::uint64_t>(3, 7));
}

TEST(CopySum, PiecesAtAnyOffsetAddUpToTheWholeAndCopyEveryByte) {
  // A payload copied in odd-sized pieces (as a pool gathers layer pieces of any byte size), to
  // destinations of any alignment, sums exactly as the whole payload; the tail past the last full
  // segment is copied but not summed. Pieces of several segments, starting on a segment boundary or
  // not, take the whole-segment loop for their full segments and the word loop for the rest.
  const std::size_t n = 4 * kSegmentBytes + 123;
  const auto data = random_bytes(n, 3);
  using detail::CopyIsa;
  for (CopyIsa isa : {CopyIsa::kPortable, CopyIsa::kAvx2, CopyIsa::kAvx512}) {
    if (!detail::cpu_supports(isa)) continue;
    for (std::size_t misalign : {std::size_t{0}, std::size_t{5}}) {
      for (bool stream : {false, true}) {
        for (std::size_t piece : {std::size_t{1}, std::size_t{7}, std::size_t{100}, std::size_t{4093},
                                  2 * kSegmentBytes, 2 * kSegmentBytes + 5, n}) {
          std::vector<std::byte> out(n + 128);
          std::byte* dst = out.data() + (64 - reinterpret_cast<std::uintptr_t>(out.data()) % 64) + misalign;
          std::vector<std::uint64_t> sums(segment_count(n), 0);
          for (std::size_t off = 0; off < n; off += piece) {
            detail::copy_sum(dst + off, data.data() + off, std::min(piece, n - off), off, sums, stream, isa);
          }
          detail::stream_fence();
          const auto what = "isa " + std::to_string(static_cast<int>(isa)) + " misalign " + std::to_string(misalign) +
                            " stream " + std::to_string(stream) + " piece " + std::to_string(piece);
          EXPECT_EQ(std::memcmp(dst, data.data(), n), 0) << what;
          EXPECT_EQ(sums, reference_sums(data.data(), n)) << what;
          std::vector<std::uint64_t> only(segment_count(n), 0);  // no destination: sums only
          detail::copy_sum(nullptr, data.data(), n, 0, only, false, isa);
          EXPECT_EQ(only, sums) << what;
        }
      }
    }
  }
}

void fill_pool(PagedKVPool& pool, unsigned seed) {
  const auto bytes = random_bytes(pool.total_bytes(), seed);
  std::memcpy(pool.block_data(0, false, 0), bytes.data(), bytes.size());
}

TEST(PagedKVPool, GatherSummedEqualsGatherPlusSums) {
  // Layer pieces of 3 * 5 * 7 bytes: not a multiple of 8, so words and segments straddle pieces.
  for (const KVCacheSpec& spec : {KVCacheSpec{3, 5, 7, DType::kInt8, 41}, KVCacheSpec{2, 4, 64, DType::kFloat16, 16}}) {
    PagedKVPool pool(spec, 64);
    fill_pool(pool, 4);
    const std::vector<BlockId> ids{9, 3, 63, 0, 17, 40, 41, 2};
    std::vector<std::byte> plain(ids.size() * pool.block_bytes()), fused(plain.size());
    pool.gather(ids, plain);
    std::vector<std::uint64_t> sums(segment_count(plain.size()));
    pool.gather_summed(ids, fused, sums);
    EXPECT_EQ(plain, fused);
    EXPECT_EQ(sums, reference_sums(plain.data(), plain.size()));
  }
}

TEST(PagedKVPool, ScatterSummedWritesTheBlocksAndSumsWhatItRead) {
  const KVCacheSpec spec{3, 5, 7, DType::kInt8, 41};
  PagedKVPool pool(spec, 32);
  const std::vector<BlockId> ids{5, 30, 1};
  const auto staging = random_bytes(ids.size() * pool.block_bytes(), 5);
  std::vector<std::uint64_t> sums(segment_count(staging.size()));
  ASSERT_GT(sums.size(), 0u);
  pool.scatter_summed(staging, ids, sums);
  std::vector<std::byte> back(staging.size());
  pool.gather(ids, back);
  EXPECT_EQ(back, staging);
  EXPECT_EQ(sums, reference_sums(staging.data(), staging.size()));
}

TEST(PagedKVPool, SummedCopiesCheckEverythingBeforeWriting) {
  PagedKVPool pool(KVCacheSpec{2, 4, 64, DType::kFloat16, 16}, 8);
  fill_pool(pool, 6);
  const std::vector<BlockId> ids{1, 2};
  std::vector<std::byte> staging(ids.size() * pool.block_bytes(), std::byte{0x5A});
  std::vector<std::byte> before(pool.total_bytes());
  std::memcpy(before.data(), pool.block_data(0, false, 0), before.size());
  std::vector<std::uint64_t> short_sums(segment_count(staging.size()) - 1, 9);
  EXPECT_EQ(code_of([&] { pool.gather_summed(ids, staging, short_sums); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { pool.scatter_summed(staging, ids, short_sums); }), ErrorCode::kInvalidArgument);
  std::vector<std::uint64_t> sums(segment_count(staging.size()), 9);
  const std::vector<BlockId> repeated{1, 1}, out_of_range{1, 8};
  EXPECT_EQ(code_of([&] { pool.scatter_summed(staging, repeated, sums); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([&] { pool.scatter_summed(staging, out_of_range, sums); }), ErrorCode::kInvalidBlock);
  EXPECT_EQ(code_of([&] { pool.gather_summed(out_of_range, staging, sums); }), ErrorCode::kInvalidBlock);
  const std::span<std::byte> short_staging(staging.data(), staging.size() - 1);
  EXPECT_EQ(code_of([&] { pool.gather_summed(ids, short_staging, sums); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(std::memcmp(before.data(), pool.block_data(0, false, 0), before.size()), 0);
  EXPECT_EQ(staging, std::vector<std::byte>(staging.size(), std::byte{0x5A}));
  EXPECT_EQ(sums, std::vector<std::uint64_t>(sums.size(), 9));
  EXPECT_EQ(short_sums, std::vector<std::uint64_t>(short_sums.size(), 9));
}

}  // namespace
}  // namespace sagellm::kv
