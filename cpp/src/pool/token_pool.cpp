// Token-budgeted pool of block ids (see the header for the id space and the locking).
#include "sagellm_kv/token_pool.hpp"

#include <algorithm>
#include <new>
#include <string>

namespace sagellm::kv {
namespace {

constexpr std::uint64_t kMaxIds = 0x7FFFFFFFu;  // block ids are int32

enum : std::uint8_t { kFree = 0, kHeld = 1, kReleasing = 2 };

std::uint64_t ceil_div(std::uint64_t a, std::uint64_t b) noexcept { return a / b + (a % b != 0 ? 1 : 0); }

// Segment `index`'s ids, all free, the lowest handed out first. Throws std::bad_alloc.
std::vector<BlockId> fresh_segment(std::uint32_t index, std::uint32_t size) {
  std::vector<BlockId> ids(size);
  const auto base = static_cast<BlockId>(std::uint64_t{index} * size);
  for (std::uint32_t k = 0; k < size; ++k) ids[k] = base + static_cast<BlockId>(size - 1 - k);
  return ids;
}

}  // namespace

TokenPool::TokenPool(std::uint64_t max_tokens, std::uint32_t block_size, bool overcommit)
    : max_tokens_(max_tokens), block_size_(block_size), segment_blocks_(0), max_segments_(0) {
  if (max_tokens == 0) throw Error(ErrorCode::kInvalidArgument, "max_tokens must be > 0, got 0");
  if (block_size == 0) throw Error(ErrorCode::kInvalidArgument, "block_size must be > 0, got 0");
  const std::uint64_t segment = ceil_div(max_tokens, block_size);
  const std::uint64_t segments = overcommit ? ceil_div(max_tokens, segment) : 1;
  // With overcommit S * ceil(max_tokens / S) >= max_tokens, so any max_tokens that passes fits 32
  // bits too.
  if (segment > kMaxIds || segment * segments > kMaxIds) {
    throw Error(ErrorCode::kInvalidArgument,
                "max_tokens " + std::to_string(max_tokens) + " needs more block ids than int32 holds");
  }
  segment_blocks_ = static_cast<std::uint32_t>(segment);
  max_segments_ = static_cast<std::uint32_t>(segments);
  free_.push_back(fresh_segment(0, segment_blocks_));
  state_.assign(segment_blocks_, kFree);
}

TokenPool::~TokenPool() = default;

TokenGrant TokenPool::allocate(std::uint64_t num_tokens, std::span<BlockId> out) noexcept {
  if (num_tokens == 0 || out.size() != blocks_for(num_tokens)) return {ErrorCode::kInvalidArgument, 0};
  std::lock_guard lock(mutex_);
  const std::uint64_t available = available_locked();
  if (num_tokens > available) return {ErrorCode::kBudgetExceeded, available};
  std::vector<BlockId>& first = free_.front();
  if (first.size() >= out.size()) {  // the common case: segment 0 has them all, top of the stack first
    std::reverse_copy(first.end() - static_cast<std::ptrdiff_t>(out.size()), first.end(), out.begin());
    first.resize(first.size() - out.size());
  } else if (const ErrorCode code = take_spread(out); code != ErrorCode::kOk) {
    return {code, available};
  }
  for (const BlockId id : out) state_[static_cast<std::uint32_t>(id)] = kHeld;
  allocated_tokens_ += num_tokens;
  allocations_ += 1;
  blocks_in_use_ += out.size();
  blocks_peak_ = std::max(blocks_peak_, blocks_in_use_);
  return {};
}

ErrorCode TokenPool::take_spread(std::span<BlockId> out) noexcept {
  const std::size_t existing = free_.size();
  std::size_t taken = 0;
  for (std::size_t index = 0; taken < out.size(); ++index) {
    if (index == free_.size() && !grow()) break;
    std::vector<BlockId>& segment = free_[index];
    while (taken < out.size() && !segment.empty()) {
      out[taken++] = segment.back();
      segment.pop_back();
    }
  }
  if (taken == out.size()) return ErrorCode::kOk;
  // Roll back: push the ids back in reverse, which restores every stack exactly, then drop the
  // segments this call added (all their ids are free again).
  for (std::size_t k = taken; k-- > 0;) {
    free_[static_cast<std::uint32_t>(out[k]) / segment_blocks_].push_back(out[k]);
  }
  const bool at_limit = free_.size() == max_segments_;
  free_.resize(existing);
  state_.resize(std::size_t{segment_blocks_} * existing);
  // kPoolFull cannot happen once available_locked() admitted the tokens (see the header); kept for
  // safety.
  return at_limit ? ErrorCode::kPoolFull : ErrorCode::kMemoryExhausted;
}

bool TokenPool::grow() noexcept {
  if (free_.size() == max_segments_) return false;
  try {
    const auto index = static_cast<std::uint32_t>(free_.size());
    std::vector<BlockId> ids = fresh_segment(index, segment_blocks_);
    state_.resize(state_.size() + segment_blocks_, kFree);
    try {
      free_.push_back(std::move(ids));
    } catch (const std::bad_alloc&) {
      state_.resize(state_.size() - segment_blocks_);
      return false;
    }
  } catch (const std::bad_alloc&) {
    return false;
  }
  return true;
}

BatchStatus TokenPool::release(std::uint64_t num_tokens, std::span<const BlockId> ids) noexcept {
  std::lock_guard lock(mutex_);
  if (num_tokens == 0 || ids.size() != blocks_for(num_tokens) || num_tokens > allocated_tokens_ ||
      ids.size() > blocks_in_use_) {
    return {ErrorCode::kInvalidArgument, -1, -1, false};
  }
  // Check phase: every id in range and held, each listed once (a second listing finds it
  // kReleasing). A refusal puts back the states it changed: nothing else was touched.
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const BlockId id = ids[i];
    const bool in_range = id >= 0 && static_cast<std::size_t>(id) < state_.size();
    if (!in_range || state_[static_cast<std::uint32_t>(id)] != kHeld) {
      for (std::size_t k = 0; k < i; ++k) state_[static_cast<std::uint32_t>(ids[k])] = kHeld;
      return {in_range ? ErrorCode::kDoubleFree : ErrorCode::kInvalidBlock, static_cast<std::int64_t>(i), id, false};
    }
    state_[static_cast<std::uint32_t>(id)] = kReleasing;
  }
  // Apply phase: cannot fail (each stack has room for all of its segment's ids).
  for (const BlockId id : ids) state_[static_cast<std::uint32_t>(id)] = kFree;
  if (free_.size() == 1) {
    free_.front().insert(free_.front().end(), ids.begin(), ids.end());
  } else {
    for (const BlockId id : ids) free_[static_cast<std::uint32_t>(id) / segment_blocks_].push_back(id);
    shrink();
  }
  allocated_tokens_ -= num_tokens;
  allocations_ -= 1;
  blocks_in_use_ -= ids.size();
  return {};
}

void TokenPool::shrink() noexcept {
  while (free_.size() > 1 && free_.back().size() == segment_blocks_) {
    free_.pop_back();
    state_.resize(state_.size() - segment_blocks_);
  }
}

void TokenPool::reset() {
  std::vector<BlockId> first = fresh_segment(0, segment_blocks_);  // may throw: nothing changed yet
  std::vector<std::uint8_t> states(segment_blocks_, kFree);
  std::lock_guard lock(mutex_);
  free_.resize(1);
  free_.front().swap(first);
  state_.swap(states);
  allocated_tokens_ = 0;
  allocations_ = 0;
  blocks_in_use_ = 0;
}

void TokenPool::reset_peak() noexcept {
  std::lock_guard lock(mutex_);
  blocks_peak_ = blocks_in_use_;
}

std::uint64_t TokenPool::available_locked() const noexcept {
  const std::uint64_t tokens = max_tokens_ - allocated_tokens_;
  // n <= free_ids * block_size exactly when ceil(n / block_size) <= free_ids. With overcommit the
  // id space never runs short of what the budget admits (an allocation holds at most one id per
  // token), so this is the token budget; bounded, it adds the ids. At most 2^31 ids * 2^32 tokens.
  const std::uint64_t free_ids = std::uint64_t{segment_blocks_} * max_segments_ - blocks_in_use_;
  return std::min(tokens, free_ids * block_size_);
}

bool TokenPool::can_admit(std::uint64_t num_tokens) const noexcept {
  std::lock_guard lock(mutex_);
  return num_tokens <= available_locked();
}

std::uint64_t TokenPool::available_tokens() const noexcept {
  std::lock_guard lock(mutex_);
  return available_locked();
}

std::uint64_t TokenPool::allocated_tokens() const noexcept {
  std::lock_guard lock(mutex_);
  return allocated_tokens_;
}

TokenPoolStats TokenPool::stats() const noexcept {
  std::lock_guard lock(mutex_);
  return {max_tokens_, allocated_tokens_, allocations_, blocks_in_use_, blocks_peak_,
          std::uint64_t{segment_blocks_} * free_.size(), available_locked()};
}

}  // namespace sagellm::kv
