// Private: freeing references the caller holds, from cleanup code that must not fail.
#pragma once

#include <algorithm>
#include <span>

#include "sagellm_kv/block_allocator.hpp"

namespace sagellm::kv::detail {

/// Drops the caller's own reference on each id. `BlockAllocator::free` refuses a long batch with
/// kMemoryExhausted when it cannot copy the ids; references the caller holds are then freed in
/// pieces short enough to be copied on the stack, so this never fails for lack of memory. Returns
/// the first refusal otherwise (a broken ownership protocol). Thread safety: as `free`.
inline BatchStatus free_held(BlockAllocator& allocator, std::span<const BlockId> ids) noexcept {
  BatchStatus st = allocator.free(ids);
  if (st.code != ErrorCode::kMemoryExhausted) return st;
  st = {};
  for (std::size_t at = 0; at < ids.size(); at += BlockAllocator::kStackBatch) {
    const BatchStatus piece = allocator.free(ids.subspan(at, std::min(BlockAllocator::kStackBatch, ids.size() - at)));
    if (!piece.ok() && st.ok()) st = piece;
  }
  return st;
}

}  // namespace sagellm::kv::detail
