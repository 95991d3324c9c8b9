// Private: freeing (and sharing) references the caller holds, from code that must not fail.
#pragma once

#include <algorithm>
#include <cstdint>
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

/// Adds a reference to each id, all of which the caller holds, as `BlockAllocator::incref`; a batch
/// refused for lack of scratch memory is applied in pieces short enough to be copied on the stack
/// (a refused piece drops the references the earlier ones added), so this never fails for lack of
/// memory. Returns incref's refusal otherwise, with `index` counted in `ids`. Thread safety: as
/// `incref`.
inline BatchStatus incref_held(BlockAllocator& allocator, std::span<const BlockId> ids) noexcept {
  BatchStatus st = allocator.incref(ids);
  if (st.code != ErrorCode::kMemoryExhausted) return st;
  for (std::size_t at = 0; at < ids.size(); at += BlockAllocator::kStackBatch) {
    st = allocator.incref(ids.subspan(at, std::min(BlockAllocator::kStackBatch, ids.size() - at)));
    if (!st.ok()) {
      (void)free_held(allocator, ids.first(at));  // the caller's own references keep these blocks
      if (st.index >= 0) st.index += static_cast<std::int64_t>(at);
      return st;
    }
  }
  return {};
}

}  // namespace sagellm::kv::detail
