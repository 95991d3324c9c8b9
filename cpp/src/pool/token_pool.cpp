// Token-budgeted pool of block ids (see the header for the id space and the locking).
#include "sagellm_kv/token_pool.hpp"

#include <algorithm>
#include <cassert>
#include <new>
#include <string>

namespace sagellm::kv {
namespace {

constexpr std::uint64_t kMaxIds = 0x7FFFFFFFu;  // block ids are int32

std::uint64_t ceil_div(std::uint64_t a, std::uint64_t b) noexcept { return a / b + (a % b != 0 ? 1 : 0); }

// BlockAllocator needs scratch memory only for batches above this many ids; the spread paths
// free in chunks of at most this size so that, once checked, freeing cannot fail.
constexpr std::size_t kFreeChunk = 256;

}  // namespace

TokenPool::TokenPool(std::uint64_t max_tokens, std::uint32_t block_size)
    : max_tokens_(max_tokens), block_size_(block_size), segment_blocks_(0), max_segments_(0) {
  if (max_tokens == 0) throw Error(ErrorCode::kInvalidArgument, "max_tokens must be > 0, got 0");
  if (block_size == 0) throw Error(ErrorCode::kInvalidArgument, "block_size must be > 0, got 0");
  const std::uint64_t segment = ceil_div(max_tokens, block_size);
  // S * ceil(max_tokens / S) >= max_tokens, so any max_tokens that passes fits 32 bits too.
  if (segment > kMaxIds || segment * ceil_div(max_tokens, segment) > kMaxIds) {
    throw Error(ErrorCode::kInvalidArgument,
                "max_tokens " + std::to_string(max_tokens) + " needs more block ids than int32 holds");
  }
  segment_blocks_ = static_cast<std::uint32_t>(segment);
  max_segments_ = static_cast<std::uint32_t>(ceil_div(max_tokens, segment));
  segments_.push_back(std::make_unique<BlockAllocator>(segment_blocks_));
}

TokenPool::~TokenPool() = default;

TokenGrant TokenPool::allocate(std::uint64_t num_tokens, std::span<BlockId> out) noexcept {
  if (num_tokens == 0 || out.size() != blocks_for(num_tokens)) return {ErrorCode::kInvalidArgument, 0};
  std::lock_guard lock(mutex_);
  const std::uint64_t available = max_tokens_ - allocated_tokens_;
  if (num_tokens > available) return {ErrorCode::kBudgetExceeded, available};
  // The common case in one call: segment 0 refuses a short batch without taking anything.
  if (!segments_.front()->allocate(out).ok()) {
    const ErrorCode code = take_spread(out);
    if (code != ErrorCode::kOk) return {code, available};
  }
  allocated_tokens_ += num_tokens;
  allocations_ += 1;
  blocks_in_use_ += out.size();
  blocks_peak_ = std::max(blocks_peak_, blocks_in_use_);
  return {};
}

ErrorCode TokenPool::take_spread(std::span<BlockId> out) noexcept {
  const std::size_t existing = segments_.size();
  std::size_t taken = 0;
  std::size_t index = 0;
  while (taken < out.size()) {
    if (index == segments_.size()) {
      if (index == max_segments_) break;  // cannot happen when the budget admitted the tokens
      try {
        segments_.push_back(std::make_unique<BlockAllocator>(segment_blocks_));
      } catch (const std::bad_alloc&) {
        break;
      }
    }
    BlockAllocator& segment = *segments_[index];
    const std::size_t n = std::min<std::size_t>(out.size() - taken, segment.num_available());
    std::span<BlockId> part = out.subspan(taken, n);
    // Under mutex_ no one else touches the segments, so the count just read is exact.
    if (n != 0 && segment.allocate(part).ok()) {
      const auto offset = static_cast<BlockId>(index * segment_blocks_);
      for (BlockId& id : part) id += offset;
      taken += n;
    }
    ++index;
  }
  if (taken == out.size()) return ErrorCode::kOk;
  // Roll back: the ids taken are ours alone (mutex_), grouped by segment in `out`.
  free_runs(out.first(taken));
  while (segments_.size() > existing) segments_.pop_back();
  return segments_.size() == max_segments_ ? ErrorCode::kPoolFull : ErrorCode::kMemoryExhausted;
}

BatchStatus TokenPool::release(std::uint64_t num_tokens, std::span<const BlockId> ids) noexcept {
  std::lock_guard lock(mutex_);
  if (num_tokens == 0 || ids.size() != blocks_for(num_tokens) || num_tokens > allocated_tokens_ ||
      allocations_ == 0) {
    return {ErrorCode::kInvalidArgument, -1, -1, false};
  }
  BatchStatus st;
  if (segments_.size() == 1) {
    st = segments_.front()->free(ids);  // checks range and ownership itself, all or nothing
  } else {
    st = release_spread(ids);
    if (st.ok()) shrink();
  }
  if (!st.ok()) {
    assert(!st.partial);  // under mutex_ no concurrent free can race the check
    return st;
  }
  allocated_tokens_ -= num_tokens;
  allocations_ -= 1;
  blocks_in_use_ -= ids.size();
  return st;
}

BatchStatus TokenPool::release_spread(std::span<const BlockId> ids) noexcept {
  // Check phase: every id in a segment that exists, allocated, and listed once. Sorting a copy
  // groups the ids by segment and puts duplicates side by side.
  std::vector<BlockId> sorted;
  try {
    sorted.assign(ids.begin(), ids.end());
  } catch (const std::bad_alloc&) {
    return {ErrorCode::kMemoryExhausted, -1, -1, false};
  }
  std::sort(sorted.begin(), sorted.end());
  const std::uint64_t capacity = std::uint64_t{segment_blocks_} * segments_.size();
  auto position = [&](BlockId id) {
    return static_cast<std::int64_t>(std::find(ids.begin(), ids.end(), id) - ids.begin());
  };
  for (std::size_t i = 0; i < sorted.size(); ++i) {
    const BlockId id = sorted[i];
    if (id < 0 || static_cast<std::uint64_t>(id) >= capacity) return {ErrorCode::kInvalidBlock, position(id), id, false};
    const std::size_t segment = static_cast<std::size_t>(id) / segment_blocks_;
    const auto local = static_cast<BlockId>(static_cast<std::uint32_t>(id) % segment_blocks_);
    if ((i > 0 && sorted[i - 1] == id) || !segments_[segment]->is_allocated(local)) {
      return {ErrorCode::kDoubleFree, position(id), id, false};
    }
  }
  // Apply phase: every id was checked allocated (one reference: the pool never shares ids) and
  // distinct, so no free can be refused.
  free_runs(sorted);
  return {};
}

void TokenPool::free_runs(std::span<BlockId> ids) noexcept {
  // Each segment's run, in chunks the allocator frees without scratch memory.
  for (std::size_t begin = 0; begin < ids.size();) {
    const std::size_t segment = static_cast<std::uint32_t>(ids[begin]) / segment_blocks_;
    const auto offset = static_cast<BlockId>(segment * segment_blocks_);
    std::size_t end = begin;
    while (end < ids.size() && end - begin < kFreeChunk &&
           static_cast<std::uint32_t>(ids[end]) / segment_blocks_ == segment) {
      ids[end] -= offset;
      ++end;
    }
    const BatchStatus st = segments_[segment]->free(ids.subspan(begin, end - begin));
    assert(st.ok());
    (void)st;
    begin = end;
  }
}

void TokenPool::shrink() noexcept {
  while (segments_.size() > 1 && segments_.back()->num_allocated() == 0) segments_.pop_back();
}

void TokenPool::reset() {
  auto fresh = std::make_unique<BlockAllocator>(segment_blocks_);  // may throw: nothing changed yet
  std::lock_guard lock(mutex_);
  segments_.resize(1);
  segments_.front() = std::move(fresh);
  allocated_tokens_ = 0;
  allocations_ = 0;
  blocks_in_use_ = 0;
}

void TokenPool::reset_peak() noexcept {
  std::lock_guard lock(mutex_);
  blocks_peak_ = blocks_in_use_;
}

bool TokenPool::can_admit(std::uint64_t num_tokens) const noexcept {
  std::lock_guard lock(mutex_);
  return num_tokens <= max_tokens_ - allocated_tokens_;
}

std::uint64_t TokenPool::allocated_tokens() const noexcept {
  std::lock_guard lock(mutex_);
  return allocated_tokens_;
}

TokenPoolStats TokenPool::stats() const noexcept {
  std::lock_guard lock(mutex_);
  return {max_tokens_, allocated_tokens_, allocations_, blocks_in_use_, blocks_peak_,
          std::uint64_t{segment_blocks_} * segments_.size()};
}

}  // namespace sagellm::kv
