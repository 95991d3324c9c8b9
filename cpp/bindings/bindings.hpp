// Private to the binding module: one registration function per area, and argument converters.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"

namespace sagellm::kv::bindings {

namespace py = pybind11;

void bind_errors(py::module_& m);
void bind_pool(py::module_& m);
void bind_prefix(py::module_& m);

/// `obj` as a numpy array (borrowed when it is one, converted otherwise); raises TypeError
/// "<what> must be <expected>, got <type>" when it cannot be read as an array.
py::array as_array(const py::handle& obj, const char* what, const char* expected);

/// A 1-D int32 array of block ids taken from any Python integer sequence: contiguous int32 arrays
/// are borrowed without a copy; other integer arrays and lists are converted with a range check.
/// Raises TypeError for non-integer input and ValueError for the wrong rank, naming `what`.
class BlockIds {
 public:
  BlockIds(const py::handle& obj, const char* what);
  [[nodiscard]] std::span<const BlockId> span() const noexcept { return {data_, size_}; }

 private:
  py::array_t<std::int32_t> owner_;
  const BlockId* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Below this many blocks an allocator call costs less than releasing and re-taking the GIL, so
/// the bindings keep it; larger batches (and all memory movement) release it.
inline constexpr std::size_t kGilReleaseMinBlocks = 512;

/// Releases the GIL for its lifetime when `release` is true.
class MaybeReleaseGil {
 public:
  explicit MaybeReleaseGil(bool release) : state_(release ? PyEval_SaveThread() : nullptr) {}
  ~MaybeReleaseGil() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  MaybeReleaseGil(const MaybeReleaseGil&) = delete;
  MaybeReleaseGil& operator=(const MaybeReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

/// Checks that `n` is a positive count that fits the core's 32-bit ids; raises ValueError naming it.
std::uint32_t checked_count(std::int64_t n, const char* what, bool allow_zero = false);

}  // namespace sagellm::kv::bindings
