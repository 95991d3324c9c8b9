// Helpers shared by the C++ tests.
#pragma once

#include "sagellm_kv/error.hpp"

namespace sagellm::kv::testing {

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
