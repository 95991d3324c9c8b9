#include "sagellm_kv/error.hpp"

namespace sagellm::kv {

std::string_view error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kOk: return "ok";
    case ErrorCode::kInvalidArgument: return "invalid_argument";
    case ErrorCode::kPoolFull: return "pool_full";
    case ErrorCode::kBudgetExceeded: return "budget_exceeded";
    case ErrorCode::kMemoryExhausted: return "memory_exhausted";
    case ErrorCode::kDoubleFree: return "double_free";
    case ErrorCode::kInvalidBlock: return "invalid_block";
    case ErrorCode::kUnknownDevice: return "unknown_device";
    case ErrorCode::kBackendUnavailable: return "backend_unavailable";
    case ErrorCode::kRefCountUnderflow: return "ref_count_underflow";
    case ErrorCode::kMetadataMismatch: return "metadata_mismatch";
    case ErrorCode::kChecksumMismatch: return "checksum_mismatch";
    case ErrorCode::kCacheMiss: return "cache_miss";
    case ErrorCode::kNoVictim: return "no_victim";
    case ErrorCode::kNotImplemented: return "not_implemented";
    case ErrorCode::kInternal: return "internal";
  }
  return "unknown";
}

}  // namespace sagellm::kv
