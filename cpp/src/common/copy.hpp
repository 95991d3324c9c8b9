// Private: bulk host copies for gather/scatter.
#pragma once

#include <cstddef>

namespace sagellm::kv::detail {

/// Copies `bytes` from `src` to `dst` (no overlap). Large aligned copies use non-temporal stores, so
/// the destination is not read into the cache first (it is written once and consumed elsewhere:
/// by the network, or by a later kernel); everything else is a plain memcpy. Call `stream_fence()`
/// after a series of copies before another thread reads the destination.
void stream_copy(void* dst, const void* src, std::size_t bytes) noexcept;

/// Orders preceding non-temporal stores before later stores (sfence on x86; no-op elsewhere).
void stream_fence() noexcept;

}  // namespace sagellm::kv::detail
