#include "common/copy.hpp"

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sagellm::kv::detail {

namespace {
// Below this the destination likely stays in cache for the consumer; memcpy is the better choice.
constexpr std::size_t kStreamMinBytes = 16 * 1024;
}  // namespace

void stream_copy(void* dst, const void* src, std::size_t bytes) noexcept {
#if defined(__SSE2__)
  const auto d = reinterpret_cast<std::uintptr_t>(dst);
  if (bytes >= kStreamMinBytes && d % 16 == 0) {
    auto* out = static_cast<__m128i*>(dst);
    const auto* in = static_cast<const __m128i*>(src);
    const std::size_t vectors = bytes / 16;
    std::size_t i = 0;
    // Four 16-byte lanes per iteration: one 64-byte cache line per loop.
    for (; i + 4 <= vectors; i += 4) {
      const __m128i a = _mm_loadu_si128(in + i);
      const __m128i b = _mm_loadu_si128(in + i + 1);
      const __m128i c = _mm_loadu_si128(in + i + 2);
      const __m128i e = _mm_loadu_si128(in + i + 3);
      _mm_stream_si128(out + i, a);
      _mm_stream_si128(out + i + 1, b);
      _mm_stream_si128(out + i + 2, c);
      _mm_stream_si128(out + i + 3, e);
    }
    for (; i < vectors; ++i) _mm_stream_si128(out + i, _mm_loadu_si128(in + i));
    const std::size_t done = vectors * 16;
    if (done < bytes) std::memcpy(static_cast<char*>(dst) + done, static_cast<const char*>(src) + done, bytes - done);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void stream_fence() noexcept {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace sagellm::kv::detail
