// Helpers shared by the C++ tests.
#pragma once

#include "sagellm_kv/error.hpp"

namespace sagellm::kv::testing {

/// Built with ThreadSanitizer (GCC's and Clang's spellings): stress tests run fewer rounds.
#if defined(__SANITIZE_THREAD__)
inline constexpr bool kUnderTsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool kUnderTsan = true;
#else
inline constexpr bool kUnderTsan = false;
#endif
#else
inline constexpr bool kUnderTsan = false;
#endif

/// Debug and ASan builds run the bounded TSan rounds too (their CI stages must stay short).
#if !defined(NDEBUG) || defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSlowBuild = true;
#else
inline constexpr bool kSlowBuild = false;
#endif

/// The ErrorCode that `fn` throws as sagellm::kv::Error, or kOk when it returns normally.
inline ErrorCode code_of(auto&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kOk;
}

}  // namespace sagellm::kv::testing
