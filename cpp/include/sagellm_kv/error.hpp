// Error codes and the one exception type thrown at the public edges of the core.
//
// Three tiers (see STYLE.md): expected outcomes on hot paths (pool exhausted, prefix miss) are
// returned values; contract violations at public edges throw `Error` carrying an `ErrorCode`;
// internal invariants are debug assertions. The Python binding maps each code to one `KV*Error`.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace sagellm::kv {

/// Why an operation of the core was refused. Values are stable: the bindings and the on-wire
/// transfer header refer to them by number.
enum class ErrorCode : std::uint16_t {
  kOk = 0,
  kInvalidArgument = 1,   ///< a size, count, shape or name that can never be valid
  kPoolFull = 2,          ///< not enough free blocks; nothing was taken
  kBudgetExceeded = 3,    ///< a configured budget would be exceeded; nothing was taken
  kMemoryExhausted = 4,   ///< the device allocator could not provide the memory
  kDoubleFree = 5,        ///< a block id that is not currently allocated was freed
  kInvalidBlock = 6,      ///< a block id out of range, or not allocated where it must be
  kUnknownDevice = 7,     ///< a device string no registered backend accepts
  kBackendUnavailable = 8,///< the backend exists but cannot run here (no driver, no device)
  kRefCountUnderflow = 9, ///< a reference was released that was never taken
  kMetadataMismatch = 10, ///< two specs that must agree do not
  kChecksumMismatch = 11, ///< data failed its integrity check
  kCacheMiss = 12,        ///< a lookup that must hit did not
  kNoVictim = 13,         ///< eviction was asked for but nothing is evictable
  kNotImplemented = 14,
  kInternal = 15,
};

/// Short stable name of a code, e.g. "pool_full".
[[nodiscard]] std::string_view error_code_name(ErrorCode code) noexcept;

/// The exception thrown for contract violations at public edges. Never thrown from inside the
/// lock-free paths of the block allocator; those report through return values.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}

  [[nodiscard]] ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace sagellm::kv
