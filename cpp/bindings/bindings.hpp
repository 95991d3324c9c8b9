// Private to the binding module: one registration function per area, and argument converters.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
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
void bind_tier(py::module_& m);
void bind_objects(py::module_& m);
void bind_offload(py::module_& m);
void bind_seed_pool(py::module_& m);

/// `text` as an interned str, made once and kept for the process (for attribute names used on hot
/// paths: `static PyObject* const name = interned("...")`). Needs the GIL.
PyObject* interned(const char* text);

/// object.__new__(cls): an instance of `cls` whose __init__ has not run (bind_objects.cpp). `cls`
/// must have passed check_plain_class.
py::object new_bare(PyObject* cls);

/// TypeError naming `what` unless `cls` is a class whose instances object.__new__ makes (its
/// __new__ is object's): object.__new__ of any other (type, numpy.ndarray, an exception class)
/// leaves an instance its own deallocator cannot take.
void check_plain_class(PyObject* cls, const char* what);

/// Sets an attribute as object.__setattr__ would (no class-level __setattr__ runs); `name` an
/// interned str.
void set_generic(PyObject* obj, PyObject* name, PyObject* value);

/// A random version-4 UUID of class `uuid_cls` (uuid.UUID) with `is_safe`, built without running
/// its __init__ (bind_objects.cpp); `int_out`, when given, receives its `int` value. Needs the GIL.
py::object new_uuid4(PyObject* uuid_cls, PyObject* is_safe, py::object* int_out);

/// An instance of the pydantic model `cls` built without validation, for values the caller has
/// checked: __dict__ is a copy of `defaults` updated with names[i] -> values[i], the fields set a
/// copy of `fields_set`, no extras, `private_attrs` as __pydantic_private__. Needs the GIL.
py::object trusted_model(PyObject* cls, PyObject* defaults, std::span<PyObject* const> names,
                         std::span<PyObject* const> values, PyObject* fields_set, PyObject* private_attrs);

/// A capsule owning a copy of `owner`: the base of a numpy view of the owner's memory, so the memory
/// lives while the view does. The copy is freed when the capsule is, or here when the capsule cannot
/// be made (it is owned by a unique_ptr until the capsule exists). Needs the GIL.
template <class T>
py::capsule keep_alive_capsule(const std::shared_ptr<T>& owner) {
  auto keep = std::make_unique<std::shared_ptr<T>>(owner);
  py::capsule base(keep.get(), [](void* p) { delete static_cast<std::shared_ptr<T>*>(p); });
  (void)keep.release();  // the capsule's from here
  return base;
}

/// A PrefixCache's counters as a dict (the names of PrefixCacheStats' fields).
py::dict prefix_stats_dict(const PrefixCacheStats& s);

/// The bound PrefixCache: the C++ cache plus whatever keeps its allocator alive (shared with the
/// request manager's binding, which composes it).
struct BoundPrefixCache {
  std::shared_ptr<PagedKVPool> pool;  // declared before `cache`: destroyed after it
  py::object allocator_owner;         // a bound BlockAllocator, kept alive the same way
  HashAlgorithm algorithm = HashAlgorithm::kSha256;
  std::unique_ptr<PrefixCache> cache;
};

/// The value of an exact Python int that fits one internal digit (|v| < 2**30), read without a
/// call: the common token id. False for anything else (the caller takes the general path).
inline bool small_int(PyObject* obj, long long& value) noexcept {
  if (!PyLong_CheckExact(obj)) return false;
#if PY_VERSION_HEX >= 0x030C0000
  auto* l = reinterpret_cast<PyLongObject*>(obj);
  if (!PyUnstable_Long_IsCompact(l)) return false;
  value = static_cast<long long>(PyUnstable_Long_CompactValue(l));
  return true;
#else
  const Py_ssize_t size = Py_SIZE(obj);
  if (size < -1 || size > 1) return false;
  value = static_cast<long long>(reinterpret_cast<PyLongObject*>(obj)->ob_digit[0]) * size;
  return true;
#endif
}

/// Token ids read straight from what a caller holds, appended as int32 to `out`: a list or tuple
/// of Python ints (read with the C API, no intermediate array), any 1-D buffer of integers
/// (array.array, numpy, memoryview; strided allowed, either byte order, read by value), or an
/// object numpy can view without a copy (a torch CPU tensor). bytes and bytearray are refused (text
/// or raw data, not token ids). Raises TypeError for non-integer input (naming the position for
/// sequences), ValueError for a value outside int32 or an array that is not 1-D. On an error `out`
/// is restored to its size before the call. Needs the GIL.
void append_tokens(const py::handle& obj, std::vector<std::int32_t>& out, const char* what);

/// Blocks to digest while append_tokens reads a list: `hasher` has a chain started
/// (BlockHasher::start_chain with `block_size`), and each full block of the items read is digested
/// onto `digests` as soon as it is complete, so hashing one block overlaps the loads of the next
/// items (the int objects of a long list mostly come from memory).
struct BlockFeed {
  BlockHasher* hasher = nullptr;
  std::uint32_t block_size = 0;
  std::vector<BlockHash>* digests = nullptr;
};

/// As append_tokens, also feeding `feed` (blocks counted from the first item of this call). On
/// return feed.digests holds one digest per full block, or nothing when the input was not a list
/// or tuple of small ints (then the caller hashes the tokens itself); on an error it is empty.
void append_tokens(const py::handle& obj, std::vector<std::int32_t>& out, const char* what, BlockFeed& feed);

/// An optional hash key argument (a per-tenant salt, an extra key): None -> nullopt; bytes,
/// bytearray or str (its UTF-8) -> a copy of its bytes (a copy, so a bytearray changed by another
/// thread while the GIL is released cannot change a key in use). TypeError naming `what` and the
/// type for anything else, ValueError for a str that has no UTF-8 form (a lone surrogate). Needs
/// the GIL.
std::optional<std::string> optional_key(const py::handle& obj, const char* what);

/// A non-negative Python int below 2**64 (a request id); TypeError / ValueError naming `what`.
std::uint64_t request_id_value(PyObject* obj, const char* what);

/// `obj` as a numpy array (borrowed when it is one, converted otherwise); raises TypeError
/// "<what> must be <expected>, got <type>" when it cannot be read as an array.
py::array as_array(const py::handle& obj, const char* what, const char* expected);

/// True when `dt` is a signed integer type of `bytes` bytes in native byte order (compared by value:
/// a dtype that went through pickle is not the same object as numpy's singleton).
bool is_native_int(const py::dtype& dt, py::ssize_t bytes);

/// A private copy of 1-D int32 block ids taken from any Python integer sequence (numpy arrays of
/// any integer dtype, lists, tuples, array.array, ...), made while the GIL is held. The core reads
/// only this copy, so another Python thread changing (or resizing) the caller's array while the
/// GIL is released cannot make it act on ids it did not check. Ids outside int32 are refused
/// (ValueError) before narrowing, so none wraps into a valid one. Raises TypeError for non-integer
/// input and ValueError for the wrong rank, naming `what`. Not copyable: span() points inside.
class BlockIds {
 public:
  BlockIds(const py::handle& obj, const char* what);
  BlockIds(const BlockIds&) = delete;
  BlockIds& operator=(const BlockIds&) = delete;
  [[nodiscard]] std::span<const BlockId> span() const noexcept { return {data_, size_}; }

 private:
  BlockId* reserve(std::size_t n);
  // Fast path for a list or tuple of exact Python ints in the int32 range: false (nothing kept)
  // at the first item that is not, so the general path reads it and names any error.
  bool read_int_sequence(PyObject* seq);

  static constexpr std::size_t kInline = 64;
  std::array<BlockId, kInline> inline_{};
  std::vector<BlockId> heap_;
  BlockId* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Keeps the numpy arrays whose memory a caller's buffer shares (the array itself, its bases, the
/// array behind a memoryview) from being resized while the GIL is released: ndarray.resize
/// (refcheck=False) reallocates an array that has no weak reference, whatever buffers it exported,
/// and a call writing or reading through the old pointer meanwhile would touch freed memory. Holds a
/// weak reference to each (numpy then refuses the resize with ValueError). Construct and destroy
/// with the GIL held: declare it before the GIL is released.
class ResizeGuard {
 public:
  explicit ResizeGuard(const py::handle& obj);
  ResizeGuard(const ResizeGuard&) = delete;
  ResizeGuard& operator=(const ResizeGuard&) = delete;

 private:
  std::vector<py::object> refs_;
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
