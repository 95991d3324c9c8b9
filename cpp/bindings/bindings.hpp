// Private to the binding module: one registration function per area, and argument converters.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace sagellm::kv::bindings {

namespace py = pybind11;

void bind_errors(py::module_& m);
void bind_pool(py::module_& m);
void bind_prefix(py::module_& m);
void bind_manager(py::module_& m);

/// The bound PrefixCache: the C++ cache plus whatever keeps its allocator alive (shared with the
/// request manager's binding, which composes it).
struct BoundPrefixCache {
  std::shared_ptr<PagedKVPool> pool;  // declared before `cache`: destroyed after it
  py::object allocator_owner;         // a bound BlockAllocator, kept alive the same way
  HashAlgorithm algorithm = HashAlgorithm::kSha256;
  std::unique_ptr<PrefixCache> cache;
};

/// Token ids read straight from what a caller holds, appended as int32 to `out`: a list or tuple
/// of Python ints (read with the C API, no intermediate array), any 1-D buffer of integers
/// (array.array, numpy, memoryview; strided allowed), or an object numpy can view without a copy
/// (a torch CPU tensor). Raises TypeError for non-integer input (naming the position for
/// sequences), ValueError for a value outside int32 or an array that is not 1-D. On an error `out`
/// is restored to its size before the call. Needs the GIL.
void append_tokens(const py::handle& obj, std::vector<std::int32_t>& out, const char* what);

/// A non-negative Python int below 2**64 (a request id); TypeError / ValueError naming `what`.
std::uint64_t request_id_value(PyObject* obj, const char* what);

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
