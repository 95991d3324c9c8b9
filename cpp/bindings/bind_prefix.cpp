// Bindings of block hashing and the prefix cache. Digests cross as (n, 32) uint8 arrays (a list of
// 32-byte bytes objects is accepted too), token ids as 1-D int32/int64 arrays, block ids as int32
// arrays. Arguments are converted with the GIL held, then the GIL is released around the C++ work.
#include <pybind11/stl.h>

#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace sagellm::kv::bindings {
namespace {

constexpr py::ssize_t kDigestBytes = static_cast<py::ssize_t>(kBlockHashBytes);

std::string type_name(const py::handle& obj) { return std::string(py::str(py::type::handle_of(obj).attr("__name__"))); }

std::string shape_text(const py::array& arr) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < arr.ndim(); ++d) {
    s += std::to_string(arr.shape(d));
    s += (arr.ndim() == 1 ? "," : (d + 1 < arr.ndim() ? ", " : ""));
  }
  return s + ")";
}

// Token ids: a list or tuple of ints (read straight into int32, no intermediate numpy array) or a
// 1-D int32 or int64 array (any byte order, compared by value), copied while the GIL is held:
// hashing runs without the GIL, and a thread changing or resizing the caller's array meanwhile
// must not change what is hashed, or free it under the reader.
class Tokens {
 public:
  Tokens(const py::handle& obj, const char* what) {
    if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
      append_tokens(obj, narrow_copy_, what);
      return;
    }
    py::array arr = as_array(obj, what, "a 1-D int32 or int64 array");
    if (arr.ndim() == 1 && arr.size() == 0) return;  // an empty list has dtype float64: nothing to read
    const py::dtype dt = arr.dtype();
    if (dt.kind() != 'i' || (dt.itemsize() != 4 && dt.itemsize() != 8)) {
      throw py::type_error(std::string(what) + " must have dtype int32 or int64, got dtype " +
                           std::string(py::str(dt)));
    }
    if (arr.ndim() != 1) {
      throw py::value_error(std::string(what) + " must be 1-D, got shape " + shape_text(arr));
    }
    wide_ = dt.itemsize() == 8;
    if (wide_) {
      copy_into(arr, wide_copy_);
    } else {
      copy_into(arr, narrow_copy_);
    }
  }

  [[nodiscard]] std::size_t size() const noexcept { return wide_ ? wide_copy_.size() : narrow_copy_.size(); }
  [[nodiscard]] bool wide() const noexcept { return wide_; }
  [[nodiscard]] std::span<const std::int32_t> narrow_span() const noexcept { return narrow_copy_; }
  [[nodiscard]] std::span<const std::int64_t> wide_span() const noexcept { return wide_copy_; }

  // Hashes the full blocks into `out` (GIL must be released by the caller if wanted).
  std::size_t hash(HashAlgorithm algorithm, std::uint32_t block_size, const BlockHash& parent, const BlockHashKey& key,
                   std::span<BlockHash> out) const {
    return wide_ ? hash_blocks(algorithm, wide_span(), block_size, parent, key, out)
                 : hash_blocks(algorithm, narrow_span(), block_size, parent, key, out);
  }

  // The first `n` ids as int32 (for events): the copy itself when already int32, else range-checked.
  std::span<const std::int32_t> first_int32(std::size_t n, std::vector<std::int32_t>& storage, const char* what) const {
    if (!wide_) return narrow_span().first(n);
    storage.resize(n);
    const auto src = wide_span();
    for (std::size_t i = 0; i < n; ++i) {
      if (src[i] < std::numeric_limits<std::int32_t>::min() || src[i] > std::numeric_limits<std::int32_t>::max()) {
        throw py::value_error(std::string(what) + ": token id " + std::to_string(src[i]) + " at position " +
                              std::to_string(i) + " is outside the int32 range");
      }
      storage[i] = static_cast<std::int32_t>(src[i]);
    }
    return storage;
  }

 private:
  // One read of the caller's buffer: native byte order, contiguous (a strided or byte-swapped array
  // is converted first, still under the GIL).
  template <class T>
  static void copy_into(const py::array& arr, std::vector<T>& out) {
    const auto native = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(arr);
    if (!native) throw py::type_error("token ids could not be read as integers");
    out.resize(static_cast<std::size_t>(native.size()));
    if (!out.empty()) std::memcpy(out.data(), native.data(), out.size() * sizeof(T));
  }

  std::vector<std::int32_t> narrow_copy_;
  std::vector<std::int64_t> wide_copy_;
  bool wide_ = false;
};

// Copies one 32-byte digest out of any contiguous buffer (bytes, bytearray, memoryview, a uint8 row).
BlockHash digest_from_buffer(const py::handle& obj, const std::string& what) {
  if (PyObject_CheckBuffer(obj.ptr()) == 0) {
    throw py::type_error(what + " must be a 32-byte digest (bytes or a uint8 array), got " + type_name(obj));
  }
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();
    throw py::value_error(what + " must be a C-contiguous buffer");
  }
  const py::ssize_t len = view.len;
  BlockHash h;
  if (len == kDigestBytes) std::memcpy(h.bytes.data(), view.buf, kBlockHashBytes);
  PyBuffer_Release(&view);
  if (len != kDigestBytes) {
    throw py::value_error(what + " must be 32 bytes, got " + std::to_string(len));
  }
  return h;
}

// A private copy of a C-contiguous bytes-like object, taken with the GIL held.
std::vector<std::uint8_t> bytes_of(const py::handle& obj, const char* what) {
  if (PyObject_CheckBuffer(obj.ptr()) == 0) {
    throw py::type_error(std::string(what) + " must be a bytes-like object, got " + type_name(obj));
  }
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();
    throw py::value_error(std::string(what) + " must be a C-contiguous buffer");
  }
  const auto* begin = static_cast<const std::uint8_t*>(view.buf);
  std::vector<std::uint8_t> copy(begin, begin + view.len);
  PyBuffer_Release(&view);
  return copy;
}

// A list or tuple of 32-byte bytes objects, concatenated (TypeError / ValueError name the first
// item that is not one).
// Copies the `n` items of a list or tuple of 32-byte bytes objects to `out`, which holds 32 bytes per
// item (TypeError / ValueError name the first item that is not one; runs no Python code).
void copy_digests(const py::handle& seq, const char* what, Py_ssize_t n, std::uint8_t* out) {
  PyObject* p = seq.ptr();
  const bool list = PyList_Check(p);
  if ((list ? PyList_GET_SIZE(p) : PyTuple_GET_SIZE(p)) != n) {
    throw py::value_error(std::string(what) + " changed length while it was read");
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = list ? PyList_GET_ITEM(p, i) : PyTuple_GET_ITEM(p, i);
    if (!PyBytes_Check(item)) {
      throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] must be bytes, got " + type_name(item));
    }
    if (PyBytes_GET_SIZE(item) != kDigestBytes) {
      throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] must be 32 bytes, got " +
                            std::to_string(PyBytes_GET_SIZE(item)));
    }
    std::memcpy(out + static_cast<std::size_t>(i) * kBlockHashBytes, PyBytes_AS_STRING(item), kBlockHashBytes);
  }
}

std::vector<std::uint8_t> joined_digests(const py::handle& seq, const char* what) {
  const Py_ssize_t n = PyList_Check(seq.ptr()) ? PyList_GET_SIZE(seq.ptr()) : PyTuple_GET_SIZE(seq.ptr());
  std::vector<std::uint8_t> out(static_cast<std::size_t>(n) * kBlockHashBytes);
  copy_digests(seq, what, n, out.data());
  return out;
}

// Bytes that are all written before they are read, so not zeroed first.
struct RawBytes {
  explicit RawBytes(std::size_t n) : data(std::make_unique_for_overwrite<std::uint8_t[]>(n)), size(n) {}
  [[nodiscard]] std::span<const std::uint8_t> span() const noexcept { return {data.get(), size}; }
  std::unique_ptr<std::uint8_t[]> data;
  std::size_t size;
};

// One token id from a list of ints: exact ints of one digit or zero, the common case (a
// non-negative one of at most 30 bits), stored 4-byte big-endian; false for anything else.
inline bool put_small_u32(PyObject* item, std::uint8_t* d) noexcept {
  long long v = 0;
  if (!small_int(item, v) || static_cast<unsigned long long>(v) > 0xFFFFFFFFULL) return false;
  const std::uint32_t be = __builtin_bswap32(static_cast<std::uint32_t>(v));
  std::memcpy(d, &be, sizeof be);
  return true;
}

// The general case of one token id: any int in [0, 2**32), stored 4-byte big-endian; TypeError /
// ValueError name the bad item and its position. A bool is an int subclass but no token id (True
// would be read as token 1): refused, as the package's other token readers refuse it. Only items
// that are not exact ints come here, so the check costs the common case nothing.
void put_u32(PyObject* item, Py_ssize_t i, std::uint8_t* d, const char* what) {
  if (PyBool_Check(item)) {
    throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] must be an int, got bool " +
                         (item == Py_True ? "True" : "False"));
  }
  if (!PyLong_Check(item)) {
    throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] must be an int, got " + type_name(item));
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
  if (v == -1 && overflow == 0 && PyErr_Occurred() != nullptr) throw py::error_already_set();
  if (overflow != 0) v = -1;
  if (v < 0 || v > 0xFFFFFFFFLL) {
    throw py::value_error("token id " + std::string(py::str(item)) + " at position " + std::to_string(i) +
                          " is out of range [0, 2**32)");
  }
  const std::uint32_t be = __builtin_bswap32(static_cast<std::uint32_t>(v));
  std::memcpy(d, &be, sizeof be);
}

// A list or tuple of token ids in [0, 2**32) as the original package hashed them: 4-byte
// big-endian each. TypeError / ValueError name the first bad item and its position.
// With `limit` (>= 0), only the first min(limit, len) items are read.
RawBytes big_endian_u32(const py::handle& seq, const char* what, Py_ssize_t limit = -1) {
  PyObject* p = seq.ptr();
  const bool list = PyList_Check(p);
  Py_ssize_t n = list ? PyList_GET_SIZE(p) : PyTuple_GET_SIZE(p);
  if (limit >= 0 && limit < n) n = limit;
  RawBytes out(static_cast<std::size_t>(n) * 4);
  std::uint8_t* d = out.data.get();
  PyObject** items = list ? reinterpret_cast<PyListObject*>(p)->ob_item : reinterpret_cast<PyTupleObject*>(p)->ob_item;
  constexpr Py_ssize_t kAhead = 64;  // the int objects are scattered: keep many misses in flight
  Py_ssize_t i = 0;
  for (; i + kAhead < n; ++i) {
    __builtin_prefetch(items[i + kAhead]);
    if (!put_small_u32(items[i], d + 4 * i)) put_u32(items[i], i, d + 4 * i, what);
  }
  for (; i < n; ++i) {
    if (!put_small_u32(items[i], d + 4 * i)) put_u32(items[i], i, d + 4 * i, what);
  }
  return out;
}

std::optional<BlockHash> optional_digest(const py::object& obj, const char* what) {
  if (obj.is_none()) return std::nullopt;
  return digest_from_buffer(obj, what);
}

// A run of digests, copied while the GIL is held: an (n, 32) uint8 array or a sequence of 32-byte
// digests. The core reads the copy only (see Tokens for why). With `packed`, a bytes object of n * 32
// bytes (the seed PrefixCache's chained digests, concatenated) is read in place instead: bytes cannot
// change, and the caller's argument keeps it alive for the call.
class Digests {
 public:
  Digests(const py::handle& obj, const char* what, bool packed = false) {
    if (packed && PyBytes_CheckExact(obj.ptr())) {
      const Py_ssize_t len = PyBytes_GET_SIZE(obj.ptr());
      if (len % kDigestBytes != 0) {
        throw py::value_error(std::string(what) + " must be a whole number of 32-byte digests, got " +
                              std::to_string(len) + " bytes");
      }
      view_ = {reinterpret_cast<const BlockHash*>(PyBytes_AS_STRING(obj.ptr())),
               static_cast<std::size_t>(len / kDigestBytes)};
      return;
    }
    read(obj, what);
    view_ = copy_;
  }

  Digests(const Digests&) = delete;  // view_ may point into copy_
  Digests& operator=(const Digests&) = delete;

  [[nodiscard]] std::span<const BlockHash> span() const noexcept { return view_; }

 private:
  void read(const py::handle& obj, const char* what) {
    if (py::isinstance<py::array>(obj)) {
      auto arr = py::reinterpret_borrow<py::array>(obj);
      if (arr.size() == 0 && arr.ndim() == 1) return;  // np.array([]) and friends: no digests
      const py::dtype dt = arr.dtype();
      if (dt.kind() != 'u' || dt.itemsize() != 1) {  // by value: a pickled dtype is another object
        throw py::type_error(std::string(what) + " must have dtype uint8, got dtype " + std::string(py::str(dt)));
      }
      if (arr.ndim() != 2 || arr.shape(1) != kDigestBytes) {
        throw py::value_error(std::string(what) + " must have shape (n, 32), got shape " + shape_text(arr));
      }
      const auto rows = py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>::ensure(arr);
      if (!rows) throw py::type_error(std::string(what) + " could not be read as bytes");
      copy_.resize(static_cast<std::size_t>(rows.shape(0)));
      if (!copy_.empty()) std::memcpy(copy_.data(), rows.data(), copy_.size() * kBlockHashBytes);
      return;
    }
    PyObject* p = obj.ptr();
    const bool list = PyList_Check(p);
    if (list || PyTuple_Check(p)) {
      // 32-byte bytes items are copied directly; anything else (and every error message, which is
      // a string built per item) takes the general buffer path. The size is re-read each round
      // because that path may run code that resizes a list.
      for (Py_ssize_t i = 0; i < (list ? PyList_GET_SIZE(p) : PyTuple_GET_SIZE(p)); ++i) {
        PyObject* item = list ? PyList_GET_ITEM(p, i) : PyTuple_GET_ITEM(p, i);
        if (PyBytes_CheckExact(item) && PyBytes_GET_SIZE(item) == kDigestBytes) {
          BlockHash& h = copy_.emplace_back();
          std::memcpy(h.bytes.data(), PyBytes_AS_STRING(item), kBlockHashBytes);
          continue;
        }
        const auto held = py::reinterpret_borrow<py::object>(item);
        copy_.push_back(digest_from_buffer(held, std::string(what) + "[" + std::to_string(i) + "]"));
      }
      return;
    }
    throw py::type_error(std::string(what) + " must be an (n, 32) uint8 array or a list of 32-byte digests, got " +
                         type_name(obj));
  }

  std::vector<BlockHash> copy_;
  std::span<const BlockHash> view_;
};

py::array_t<std::uint8_t> digest_array(std::size_t n) {
  return py::array_t<std::uint8_t>({static_cast<py::ssize_t>(n), kDigestBytes});
}
std::span<BlockHash> digest_span(py::array_t<std::uint8_t>& arr) {
  return {reinterpret_cast<BlockHash*>(arr.mutable_data()), static_cast<std::size_t>(arr.shape(0))};
}

py::array_t<BlockId> id_array(std::span<const BlockId> ids) {
  py::array_t<BlockId> out(static_cast<py::ssize_t>(ids.size()));
  if (!ids.empty()) std::memcpy(out.mutable_data(), ids.data(), ids.size_bytes());
  return out;
}

py::array_t<std::int32_t> position_array(std::uint32_t n) {
  py::array_t<std::int32_t> out(static_cast<py::ssize_t>(n));
  auto* p = out.mutable_data();
  for (std::uint32_t i = 0; i < n; ++i) p[i] = static_cast<std::int32_t>(i);
  return out;
}

std::uint64_t owner_value(const py::int_& owner) {
  const unsigned long long v = PyLong_AsUnsignedLongLong(owner.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    throw py::value_error("owner must be an integer in [0, 2**64), got " + std::string(py::str(owner)));
  }
  return static_cast<std::uint64_t>(v);
}

std::int32_t priority_value(std::int64_t priority) {
  if (priority < std::numeric_limits<std::int32_t>::min() || priority > std::numeric_limits<std::int32_t>::max()) {
    throw py::value_error("priority must fit int32, got " + std::to_string(priority));
  }
  return static_cast<std::int32_t>(priority);
}

std::uint32_t block_size_value(std::int64_t block_size) { return checked_count(block_size, "block_size"); }

// Block ids coming out of a match, in a per-thread buffer: the result is made at its exact size
// after the GIL is back. Making it may run Python code on this thread (a garbage collection's
// finalisers), which may match on this or another cache before this call has read its ids: such a
// nested call gets a buffer of its own instead of overwriting the outer call's (one per depth).
class IdScratch {
 public:
  explicit IdScratch(std::size_t n) : ids_(depth_ < kDepths ? buffers_[depth_] : own_) {
    ids_.resize(n);  // before the depth is taken: a throw here leaves it as it was
    ++depth_;
  }
  ~IdScratch() { --depth_; }
  IdScratch(const IdScratch&) = delete;
  IdScratch& operator=(const IdScratch&) = delete;
  std::vector<BlockId>& ids() noexcept { return ids_; }

 private:
  static constexpr std::size_t kDepths = 4;  // deeper nesting allocates (own_)
  static thread_local std::size_t depth_;
  static thread_local std::array<std::vector<BlockId>, kDepths> buffers_;
  std::vector<BlockId> own_;
  std::vector<BlockId>& ids_;
};
thread_local std::size_t IdScratch::depth_ = 0;
thread_local std::array<std::vector<BlockId>, IdScratch::kDepths> IdScratch::buffers_;

py::tuple do_match(BoundPrefixCache& self, std::span<const BlockHash> digests, bool take) {
  IdScratch scratch(digests.size());
  std::vector<BlockId>& ids = scratch.ids();
  std::uint32_t m = 0;
  {
    py::gil_scoped_release release;
    m = take ? self.cache->match(digests, ids) : self.cache->peek(digests, ids);
  }
  return py::make_tuple(m, id_array(std::span<const BlockId>(ids).first(m)));
}

py::tuple do_insert(BoundPrefixCache& self, std::span<const BlockHash> digests, const BlockIds& ids,
                    const InsertOptions& options) {
  InsertResult r;
  {
    py::gil_scoped_release release;
    r = self.cache->insert(digests, ids.span(), options);
  }
  return py::make_tuple(r.num_inserted, position_array(r.num_redundant));
}

// The seed PrefixCache's table of objects: a list whose item `id` is the object cached under block id
// `id` (None: no entry), so a lookup maps ids to objects by index, with no int object and no hash probe.
// Grows the table with None so that it has an item `id` (may raise MemoryError; changes nothing else).
void table_reserve(PyObject* table, BlockId id) {
  while (PyList_GET_SIZE(table) <= static_cast<Py_ssize_t>(id)) {
    if (PyList_Append(table, Py_None) != 0) throw py::error_already_set();
  }
}

// table[id] = object, for an item table_reserve made room for. The object it replaces is appended to
// `displaced` (a list, or nullptr) instead of being dropped here: dropping the last reference runs
// the object's finaliser, which may call back into the seed cache while its caller holds the cache's
// lock. Only when that append fails (no memory) is the old object dropped at once. Cannot fail.
void table_set(PyObject* table, BlockId id, PyObject* object, PyObject* displaced) noexcept {
  const auto idx = static_cast<Py_ssize_t>(id);
  if (idx >= PyList_GET_SIZE(table)) return;  // not reserved: the caller checked, nothing to set
  PyObject* old = PyList_GET_ITEM(table, idx);
  if (displaced != nullptr && old != Py_None && PyList_Append(displaced, old) != 0) PyErr_Clear();
  Py_INCREF(object);
  PyList_SetItem(table, idx, object);  // takes the new reference, drops the table's one on the old item
}

PyObject* table_get(PyObject* table, BlockId id) {  // borrowed; nullptr when there is no entry
  const auto idx = static_cast<Py_ssize_t>(id);
  PyObject* v = idx >= 0 && idx < PyList_GET_SIZE(table) ? PyList_GET_ITEM(table, idx) : nullptr;
  return v == Py_None ? nullptr : v;
}

void check_table(const py::handle& table) {
  if (!PyList_Check(table.ptr())) throw py::type_error("table must be a list, got " + type_name(table));
}

// The seed PrefixCache's insert in one call: new entries get fresh ids and the caller's objects are
// stored under them in its table. Objects are checked before anything changes; the ids are returned
// to the allocator (the cache holds its own references) whatever happens.
py::object insert_objects(BoundPrefixCache& self, const py::handle& digests, std::int64_t start,
                          const py::list& objects, const py::handle& table, const py::object& ids_from,
                          const py::object& displaced) {
  check_table(table);
  if (!displaced.is_none() && !PyList_Check(displaced.ptr())) {
    throw py::type_error("displaced must be a list or None, got " + type_name(displaced));
  }
  const Digests d(digests, "digests", /*packed=*/true);
  const std::size_t n = d.span().size();
  if (start < 0 || static_cast<std::size_t>(start) >= n || objects.size() != n) {
    throw py::value_error("insert_objects: start " + std::to_string(start) + " must lie within " + std::to_string(n) +
                          " digests, with as many objects (got " + std::to_string(objects.size()) + ")");
  }
  const auto first = static_cast<std::size_t>(start);
  // Our own references to the new objects: the list may change while the GIL is released below.
  // Not PyList_GetSlice: it reads the list's items after allocating the slice, and that allocation
  // may start a garbage collection whose finalisers change the list (CPython then reads freed or null
  // item memory). The copy is made first, then the list's size is checked again before it is read.
  const auto count = static_cast<Py_ssize_t>(n - first);
  const auto fresh = py::reinterpret_steal<py::list>(PyList_New(count));
  if (!fresh) throw py::error_already_set();
  if (const Py_ssize_t now = PyList_GET_SIZE(objects.ptr()); static_cast<std::size_t>(now) != n) {
    throw py::value_error("blocks changed length during insert: " + std::to_string(now) + " items for " +
                          std::to_string(n) + " digests");
  }
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* object = PyList_GET_ITEM(objects.ptr(), static_cast<Py_ssize_t>(first) + i);
    Py_INCREF(object);
    PyList_SET_ITEM(fresh.ptr(), i, object);
  }
  static PyObject* const owner_key = PyUnicode_InternFromString("handle_id");
  for (std::size_t i = first; i < n; ++i) {
    PyObject* object = PyList_GET_ITEM(fresh.ptr(), static_cast<Py_ssize_t>(i - first));
    if (!PyDict_Check(object)) {
      throw py::type_error("blocks[" + std::to_string(i) + "] must be a dict, got " + type_name(object));
    }
    PyObject* owner = PyDict_GetItemWithError(object, owner_key);  // borrowed
    if (owner == nullptr && PyErr_Occurred() != nullptr) throw py::error_already_set();
    if (owner != nullptr && owner != Py_None) return py::none();
  }
  BlockAllocator* alloc = self.cache->allocator();
  if ((alloc == nullptr) == ids_from.is_none()) {
    throw py::value_error("insert_objects: ids are given for a cache without an allocator, and only for one");
  }
  std::vector<BlockId> ids(alloc != nullptr ? std::min<std::size_t>(n - first, alloc->num_available()) : n - first);
  if (alloc != nullptr) {
    if (!alloc->allocate(ids).ok()) throw py::value_error("insert_objects: the allocator ran short while allocating");
  } else if (PyLong_Check(ids_from.ptr())) {  // first id of a run
    const auto base = ids_from.cast<std::int64_t>();
    if (base < 0 || base + static_cast<std::int64_t>(ids.size()) > std::numeric_limits<BlockId>::max()) {
      throw py::value_error("insert_objects: first id " + std::to_string(base) + " leaves no room for " +
                            std::to_string(ids.size()) + " ids");
    }
    for (std::size_t j = 0; j < ids.size(); ++j) ids[j] = static_cast<BlockId>(base + static_cast<std::int64_t>(j));
  } else {  // the ids themselves
    const BlockIds given(ids_from, "ids");
    if (given.span().size() != ids.size()) {
      throw py::value_error("insert_objects: " + std::to_string(given.span().size()) + " ids for " +
                            std::to_string(ids.size()) + " new blocks");
    }
    for (std::size_t j = 0; j < ids.size(); ++j) {
      if (given.span()[j] < 0) throw py::value_error("insert_objects: id " + std::to_string(given.span()[j]) + " is negative");
      ids[j] = given.span()[j];
    }
  }
  // Our references: the cache adopts those on the blocks it caches (positions [kept_from, kept_to)
  // once the insert returns); the others go back to the allocator whatever happens.
  struct GiveBack {
    BlockAllocator* alloc;
    std::span<const BlockId> ids;
    std::size_t kept_from = 0, kept_to = 0;
    ~GiveBack() {
      if (alloc == nullptr) return;
      if (kept_from != 0) (void)alloc->free(ids.first(kept_from));
      if (kept_to < ids.size()) (void)alloc->free(ids.subspan(kept_to));
    }
  } give_back{alloc, ids};
  // Room in the table for every id first, while nothing has changed yet: what follows the insert cannot fail.
  for (const BlockId id : ids) table_reserve(table.ptr(), id);
  InsertResult r;
  if (!ids.empty()) {
    InsertOptions o;
    if (first > 0) o.parent = d.span()[first - 1];
    o.adopt = alloc != nullptr;  // saves an increment per block now and its decrement in give_back
    py::gil_scoped_release release;
    r = self.cache->insert(d.span().subspan(first, ids.size()), ids, o);
    give_back.kept_from = r.num_redundant;
    give_back.kept_to = r.num_cached();
  }
  for (std::uint32_t j = 0; j < r.num_inserted; ++j) {
    const std::size_t at = r.num_redundant + j;
    table_set(table.ptr(), ids[at], PyList_GET_ITEM(fresh.ptr(), static_cast<Py_ssize_t>(at)),
              displaced.is_none() ? nullptr : displaced.ptr());
  }
  return py::make_tuple(r.num_redundant + r.num_inserted, ids.size());
}

py::object bytes_or_none(const std::optional<BlockHash>& d) {
  if (!d) return py::none();
  return py::bytes(reinterpret_cast<const char*>(d->bytes.data()), kBlockHashBytes);
}

py::dict event_dict(const PrefixCacheEvent& e) {
  py::dict d;
  switch (e.type) {
    case PrefixCacheEvent::Type::kStored: d["type"] = "stored"; break;
    case PrefixCacheEvent::Type::kRemoved: d["type"] = "removed"; break;
    case PrefixCacheEvent::Type::kCleared: d["type"] = "cleared"; break;
  }
  py::list digests;
  for (const BlockHash& h : e.digests) digests.append(bytes_or_none(h));
  d["digests"] = digests;
  d["parent"] = bytes_or_none(e.parent);
  py::list tokens;
  for (std::int32_t t : e.token_ids) tokens.append(t);
  d["token_ids"] = tokens;
  d["block_size"] = e.block_size;
  d["extra_key"] = e.extra_key ? py::object(py::bytes(*e.extra_key)) : py::object(py::none());
  if (e.cache_salt) d["cache_salt"] = py::bytes(*e.cache_salt);  // only on salted stored events
  if (e.events_lost) d["events_lost"] = true;  // only on the cleared mark of dropped events
  return d;
}

}  // namespace

py::dict prefix_stats_dict(const PrefixCacheStats& s) {
  py::dict d;
  d["lookups"] = s.lookups;
  d["hit_lookups"] = s.hit_lookups;
  d["queried_blocks"] = s.queried_blocks;
  d["hit_blocks"] = s.hit_blocks;
  d["queried_tokens"] = s.queried_tokens;
  d["hit_tokens"] = s.hit_tokens;
  d["inserts"] = s.inserts;
  d["evictions"] = s.evictions;
  d["removals"] = s.removals;
  d["events_dropped"] = s.events_dropped;
  d["cached_blocks"] = s.cached_blocks;
  d["evictable_blocks"] = s.evictable_blocks;
  d["in_use_blocks"] = s.in_use_blocks;
  return d;
}

namespace {

std::unique_ptr<BoundPrefixCache> make_cache(std::int64_t block_size, std::optional<std::int64_t> capacity_blocks,
                                             const std::string& policy, double ttl_seconds, const py::object& allocator,
                                             std::int64_t event_queue_capacity, const std::string& hash_algorithm) {
  auto self = std::make_unique<BoundPrefixCache>();
  PrefixCacheOptions o;
  o.block_size = block_size_value(block_size);
  if (capacity_blocks) o.capacity_blocks = checked_count(*capacity_blocks, "capacity_blocks");
  o.policy = parse_eviction_policy(policy);
  o.ttl_seconds = ttl_seconds;
  if (event_queue_capacity < 0) {
    throw py::value_error("event_queue_capacity must be >= 0, got " + std::to_string(event_queue_capacity));
  }
  o.event_queue_capacity = static_cast<std::size_t>(event_queue_capacity);
  self->algorithm = parse_hash_algorithm(hash_algorithm);
  (void)BlockHasher(self->algorithm);  // raises, naming the available ones, when not built in

  BlockAllocator* alloc = nullptr;
  if (allocator.is_none()) {
    // metadata-only cache
  } else if (py::isinstance<PagedKVPool>(allocator)) {
    self->pool = allocator.cast<std::shared_ptr<PagedKVPool>>();
    if (self->pool->spec().block_size != o.block_size) {
      throw Error(ErrorCode::kMetadataMismatch, "prefix cache block_size " + std::to_string(o.block_size) +
                                                    " differs from the pool's block_size " +
                                                    std::to_string(self->pool->spec().block_size));
    }
    alloc = &self->pool->allocator();
  } else if (py::isinstance<BlockAllocator>(allocator)) {
    self->allocator_owner = allocator;
    alloc = allocator.cast<BlockAllocator*>();
  } else {
    throw py::type_error("allocator must be a PagedKVPool, a BlockAllocator or None, got " + type_name(allocator));
  }
  self->cache = std::make_unique<PrefixCache>(o, alloc);
  return self;
}

}  // namespace

void bind_prefix(py::module_& m) {
  m.def("available_hash_algorithms", &available_hash_algorithms,
        "Block hash algorithms built into this module, default first.");

  m.def("hash_blocks", [](const py::handle& tokens, std::int64_t block_size, const py::object& parent,
                          const py::handle& salt_arg, const py::handle& extra_arg, const std::string& algorithm) {
          const std::optional<std::string> salt = optional_key(salt_arg, "salt");
          const std::optional<std::string> extra = optional_key(extra_arg, "extra");
          const HashAlgorithm alg = parse_hash_algorithm(algorithm);
          const std::uint32_t bs = block_size_value(block_size);
          const Tokens t(tokens, "tokens");
          const BlockHash p = optional_digest(parent, "parent").value_or(kRootBlockHash);
          auto out = digest_array(num_full_blocks(t.size(), bs));
          auto span = digest_span(out);
          {
            py::gil_scoped_release release;
            const BlockHashKey key{salt ? std::string_view(*salt) : std::string_view{},
                                   extra ? std::string_view(*extra) : std::string_view{}};
            (void)t.hash(alg, bs, p, key, span);
          }
          return out;
        },
        py::arg("tokens"), py::arg("block_size"), py::arg("parent") = py::none(), py::arg("salt") = py::none(),
        py::arg("extra") = py::none(), py::arg("algorithm") = "sha256",
        "Chained digests of the full blocks of `tokens`: an (n_full_blocks, 32) uint8 array.");

  // The seed PrefixCache's block keys (plain SHA-256 per block) and their chaining, in C++: per
  // block, hashlib costs a Python call and two objects, ~10x the digest itself.
  m.def("sha256_chunks", [](const py::handle& data, std::int64_t chunk_bytes, bool drop_partial) {
          if (chunk_bytes <= 0) throw py::value_error("chunk_bytes must be > 0, got " + std::to_string(chunk_bytes));
          // Read once, with the GIL: token ids packed as 4-byte big-endian, or the caller's bytes.
          // drop_partial reads the token ids of whole chunks only, so the caller need not slice its
          // list (a slice of a list may crash CPython when the slice's allocation runs a finaliser
          // that empties the list).
          const bool tokens = PyList_Check(data.ptr()) || PyTuple_Check(data.ptr());
          std::optional<RawBytes> packed;
          std::vector<std::uint8_t> copy;
          if (tokens) {
            Py_ssize_t limit = -1;
            if (drop_partial && chunk_bytes % 4 == 0) {
              const Py_ssize_t len = PyList_Check(data.ptr()) ? PyList_GET_SIZE(data.ptr()) : PyTuple_GET_SIZE(data.ptr());
              limit = len - len % static_cast<Py_ssize_t>(chunk_bytes / 4);
            }
            packed.emplace(big_endian_u32(data, "tokens", limit));
          } else {
            copy = bytes_of(data, "data");
          }
          std::span<const std::uint8_t> in = tokens ? packed->span() : std::span<const std::uint8_t>(copy);
          const auto size = static_cast<std::size_t>(chunk_bytes);
          if (drop_partial) in = in.first(in.size() - in.size() % size);
          if (in.size() % size != 0) {
            throw py::value_error(std::to_string(in.size()) + " bytes are not a whole number of " +
                                  std::to_string(size) + "-byte chunks");
          }
          const std::size_t n = in.size() / size;
          RawBytes digests(n * kBlockHashBytes);  // every digest is written
          {
            py::gil_scoped_release release;
            (void)sha256_chunks(in, size, {reinterpret_cast<BlockHash*>(digests.data.get()), n});
          }
          auto out = py::reinterpret_steal<py::list>(PyList_New(static_cast<Py_ssize_t>(n)));
          if (!out) throw py::error_already_set();
          for (std::size_t i = 0; i < n; ++i) {
            PyObject* item = PyBytes_FromStringAndSize(
                reinterpret_cast<const char*>(digests.data.get() + i * kBlockHashBytes), kDigestBytes);
            if (item == nullptr) throw py::error_already_set();  // the list drops the items made so far
            PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), item);
          }
          return out;
        },
        py::arg("data"), py::arg("chunk_bytes"), py::arg("drop_partial") = false,
        "SHA-256 of each chunk_bytes-byte chunk of a bytes-like object, or of a list/tuple of ints in "
        "[0, 2**32) (not bools) packed as 4-byte big-endian: a list of 32-byte bytes. drop_partial: a trailing partial "
        "chunk is skipped (its token ids are not read) instead of refused.");

  m.def("sha256_chain", [](const py::handle& keys) {
          const bool listed = PyList_Check(keys.ptr()) || PyTuple_Check(keys.ptr());
          const std::vector<std::uint8_t> copy = listed ? joined_digests(keys, "keys") : bytes_of(keys, "keys");
          if (copy.size() % kBlockHashBytes != 0) {
            throw py::value_error("keys must be a whole number of 32-byte keys, got " + std::to_string(copy.size()) +
                                  " bytes");
          }
          const std::span<const BlockHash> in(reinterpret_cast<const BlockHash*>(copy.data()),
                                              copy.size() / kBlockHashBytes);
          auto out = py::reinterpret_steal<py::bytes>(
              PyBytes_FromStringAndSize(nullptr, static_cast<py::ssize_t>(copy.size())));
          if (!out) throw py::error_already_set();
          // A fresh bytes object nobody else references yet: filled without the GIL.
          const std::span<BlockHash> dst(reinterpret_cast<BlockHash*>(PyBytes_AS_STRING(out.ptr())), in.size());
          {
            py::gil_scoped_release release;
            sha256_chain(in, dst);
          }
          return out;
        },
        py::arg("keys"),
        "Chains 32-byte keys (a list/tuple of 32-byte bytes, or them concatenated): key 0 as is, then "
        "the SHA-256 compression function of (previous || key i) from the initial state (hashing.hpp); "
        "returns the digests concatenated, as bytes.");

  // The seed PrefixCache's chaining with its last result kept: an insert usually follows the lookup of
  // the same keys (equal bytes, other objects), and comparing the keys' bytes here costs a memcmp where
  // a tuple comparison in Python costs a call per key.
  m.def("sha256_chain_cached", [](const py::handle& keys, const py::handle& last) -> py::object {
          if (!PyList_Check(keys.ptr()) && !PyTuple_Check(keys.ptr())) {
            throw py::type_error("keys must be a list or tuple of 32-byte bytes, got " + type_name(keys));
          }
          const Py_ssize_t n = PyList_Check(keys.ptr()) ? PyList_GET_SIZE(keys.ptr()) : PyTuple_GET_SIZE(keys.ptr());
          auto joined = py::reinterpret_steal<py::bytes>(PyBytes_FromStringAndSize(nullptr, n * kDigestBytes));
          if (!joined) throw py::error_already_set();
          char* dst = PyBytes_AS_STRING(joined.ptr());
          copy_digests(keys, "keys", n, reinterpret_cast<std::uint8_t*>(dst));
          if (!last.is_none()) {
            const bool pair = PyTuple_CheckExact(last.ptr()) && PyTuple_GET_SIZE(last.ptr()) == 2;
            PyObject* before = pair ? PyTuple_GET_ITEM(last.ptr(), 0) : nullptr;
            PyObject* chained_before = pair ? PyTuple_GET_ITEM(last.ptr(), 1) : nullptr;
            if (!pair || !PyBytes_CheckExact(before) || !PyBytes_CheckExact(chained_before) ||
                PyBytes_GET_SIZE(before) != PyBytes_GET_SIZE(chained_before)) {
              throw py::type_error("last must be None or a pair this function returned, got " + type_name(last));
            }
            if (PyBytes_GET_SIZE(before) == n * kDigestBytes &&
                std::memcmp(PyBytes_AS_STRING(before), dst, static_cast<std::size_t>(n * kDigestBytes)) == 0) {
              return py::reinterpret_borrow<py::object>(last);
            }
          }
          auto out = py::reinterpret_steal<py::bytes>(PyBytes_FromStringAndSize(nullptr, n * kDigestBytes));
          if (!out) throw py::error_already_set();
          // Fresh bytes objects nobody else references yet: read and filled without the GIL.
          const std::span<const BlockHash> in(reinterpret_cast<const BlockHash*>(dst), static_cast<std::size_t>(n));
          const std::span<BlockHash> chained(reinterpret_cast<BlockHash*>(PyBytes_AS_STRING(out.ptr())), in.size());
          {
            py::gil_scoped_release release;
            sha256_chain(in, chained);
          }
          return py::make_tuple(joined, out);
        },
        py::arg("keys"), py::arg("last") = py::none(),
        "sha256_chain of a list/tuple of 32-byte bytes keys as a pair (the keys concatenated, the chained "
        "digests concatenated), both bytes. `last` is None or a pair it returned before: when the keys are "
        "the same bytes as last's, last itself comes back and nothing is hashed.");

  py::class_<BoundPrefixCache>(m, "PrefixCache")
      .def(py::init(&make_cache), py::arg("block_size") = 16, py::arg("capacity_blocks") = py::none(),
           py::arg("policy") = "lru", py::arg("ttl_seconds") = 300.0, py::arg("allocator") = py::none(),
           py::arg("event_queue_capacity") = 0, py::arg("hash_algorithm") = "sha256")
      .def("match", [](BoundPrefixCache& self, const py::handle& digests) {
             const Digests d(digests, "digests");
             return do_match(self, d.span(), true);
           }, py::arg("digests"),
           "Longest cached prefix: (num_matched, block_ids int32). Acquires the matched nodes; release them.")
      .def("probe", [](BoundPrefixCache& self, const py::handle& digests, const py::object& table) -> py::tuple {
             const Digests d(digests, "digests", /*packed=*/true);
             IdScratch scratch(d.span().size());
             std::vector<BlockId>& ids = scratch.ids();
             std::uint32_t matched = 0;
             {
               py::gil_scoped_release release;
               matched = self.cache->probe(d.span(), ids);
             }
             if (table.is_none()) return py::make_tuple(matched, id_array(std::span<const BlockId>(ids).first(matched)));
             check_table(table);
             py::list values(matched);
             for (std::uint32_t i = 0; i < matched; ++i) {
               PyObject* v = table_get(table.ptr(), ids[i]);
               if (v == nullptr) throw py::key_error("block id " + std::to_string(ids[i]) + " is cached but not in table");
               values[i] = py::reinterpret_borrow<py::object>(v);
             }
             return py::make_tuple(matched, values);
           }, py::arg("digests"), py::arg("table") = py::none(),
           "As match, without taking a use (counts the lookup, marks the blocks used): (num_matched, ids). "
           "The digests may also come as one bytes object of n * 32 bytes (so may peek's and insert_objects'). "
           "With a list `table`, the ids are mapped through it: (num_matched, [table[id], ...]); an id whose "
           "item is missing or None raises KeyError.")
      .def("peek", [](BoundPrefixCache& self, const py::handle& digests) {
             const Digests d(digests, "digests", /*packed=*/true);
             return do_match(self, d.span(), false);
           }, py::arg("digests"), "Like match, without acquiring, touching or counting anything.")
      .def("release", [](BoundPrefixCache& self, const py::handle& digests) {
             const Digests d(digests, "digests");
             py::gil_scoped_release release;
             self.cache->release(d.span());
           }, py::arg("digests"))
      .def("insert", [](BoundPrefixCache& self, const py::handle& digests, const py::handle& block_ids,
                        const py::object& parent, const py::object& token_ids, const py::int_& owner,
                        std::int64_t priority, const py::handle& extra_key_arg, bool acquire,
                        const py::handle& cache_salt_arg) {
             const std::optional<std::string> extra_key = optional_key(extra_key_arg, "extra_key");
             const std::optional<std::string> cache_salt = optional_key(cache_salt_arg, "cache_salt");
             const Digests d(digests, "digests");
             const BlockIds ids(block_ids, "block_ids");
             InsertOptions o;
             o.acquire = acquire;
             o.parent = optional_digest(parent, "parent");
             o.owner = owner_value(owner);
             o.priority = priority_value(priority);
             if (extra_key) o.extra_key = std::string_view(*extra_key);
             if (cache_salt && !cache_salt->empty()) o.cache_salt = std::string_view(*cache_salt);
             std::vector<std::int32_t> narrowed;
             std::optional<Tokens> toks;
             if (!token_ids.is_none()) {
               toks.emplace(token_ids, "token_ids");
               o.token_ids = toks->first_int32(toks->size(), narrowed, "token_ids");
             }
             return do_insert(self, d.span(), ids, o);
           }, py::arg("digests"), py::arg("block_ids"), py::arg("parent") = py::none(),
           py::arg("token_ids") = py::none(), py::arg("owner") = 0, py::arg("priority") = 0,
           py::arg("extra_key") = py::none(), py::arg("acquire") = false, py::arg("cache_salt") = py::none(),
           "Caches digests[i] -> block_ids[i]: (num_inserted, redundant_positions int32). acquire: also "
           "take a use of every position now cached (release those digests later). cache_salt: the tenant "
           "salt the digests were hashed with, for the stored event only.")
      .def("insert_objects", &insert_objects, py::arg("digests"), py::arg("start"), py::arg("objects"),
           py::arg("table"), py::arg("ids") = py::none(), py::arg("displaced") = py::none(),
           "Caches digests[start:] (a chain continuing digests[start - 1]) under fresh block ids and stores "
           "table[id] = objects[i] (a list, grown with None) for each one cached: ids from the cache's "
           "allocator or, without one, `ids`: an int (ids, ids + 1, ...) or exactly one id per new block. "
           "Every object from `start` on must be a dict; None (nothing changed) when one of them has a "
           "'handle_id' (an owner: use insert). The objects the table held under the ids now used are appended to "
           "the list `displaced` when one is given (else dropped), so their finalisers run when the caller lets "
           "go of it. The cache keeps the allocator's reference on each block it caches, so once this returns "
           "another call may evict such a block and reuse its id: callers sharing a table serialise their calls "
           "(the seed PrefixCache does). Returns (num_inserted, num_ids_taken).")
      .def("match_tokens", [](BoundPrefixCache& self, const py::handle& tokens, const py::handle& salt_arg,
                              const py::handle& extra_arg) {
             const std::optional<std::string> salt = optional_key(salt_arg, "salt");
             const std::optional<std::string> extra = optional_key(extra_arg, "extra");
             const Tokens t(tokens, "tokens");
             auto digests = digest_array(num_full_blocks(t.size(), self.cache->block_size()));
             auto span = digest_span(digests);
             IdScratch scratch(span.size());
             std::vector<BlockId>& ids = scratch.ids();
             std::uint32_t matched = 0;
             {
               py::gil_scoped_release release;
               const BlockHashKey key{salt ? std::string_view(*salt) : std::string_view{},
                                      extra ? std::string_view(*extra) : std::string_view{}};
               (void)t.hash(self.algorithm, self.cache->block_size(), kRootBlockHash, key, span);
               matched = self.cache->match(span, ids);
             }
             return py::make_tuple(matched, id_array(std::span<const BlockId>(ids).first(matched)), digests);
           }, py::arg("tokens"), py::arg("salt") = py::none(), py::arg("extra") = py::none(),
           "Hashes the full blocks of a prompt and matches them: (num_matched, block_ids int32, digests (n, 32)).")
      .def("insert_tokens", [](BoundPrefixCache& self, const py::handle& tokens, const py::handle& block_ids,
                               const py::handle& salt_arg, const py::handle& extra_arg,
                               const py::int_& owner, std::int64_t priority) {
             const std::optional<std::string> salt = optional_key(salt_arg, "salt");
             const std::optional<std::string> extra = optional_key(extra_arg, "extra");
             const Tokens t(tokens, "tokens");
             const BlockIds ids(block_ids, "block_ids");
             const std::uint32_t bs = self.cache->block_size();
             const std::size_t n = num_full_blocks(t.size(), bs);
             if (ids.span().size() != n) {
               throw py::value_error("block_ids holds " + std::to_string(ids.span().size()) + " ids but " +
                                     std::to_string(t.size()) + " tokens make " + std::to_string(n) +
                                     " full blocks of " + std::to_string(bs));
             }
             InsertOptions o;
             o.owner = owner_value(owner);
             o.priority = priority_value(priority);
             if (extra) o.extra_key = std::string_view(*extra);
             if (salt && !salt->empty()) o.cache_salt = std::string_view(*salt);  // for the stored event
             std::vector<std::int32_t> narrowed;
             if (self.cache->options().event_queue_capacity != 0) {
               o.token_ids = t.first_int32(n * bs, narrowed, "tokens");  // recorded in the stored event
             }
             auto digests = digest_array(n);
             auto span = digest_span(digests);
             InsertResult r;
             {
               py::gil_scoped_release release;
               const BlockHashKey key{salt ? std::string_view(*salt) : std::string_view{},
                                      extra ? std::string_view(*extra) : std::string_view{}};
               (void)t.hash(self.algorithm, bs, kRootBlockHash, key, span);
               r = self.cache->insert(span, ids.span(), o);
             }
             return py::make_tuple(r.num_inserted, position_array(r.num_redundant), digests);
           }, py::arg("tokens"), py::arg("block_ids"), py::arg("salt") = py::none(), py::arg("extra") = py::none(),
           py::arg("owner") = 0, py::arg("priority") = 0,
           "Hashes the full blocks of a prompt and caches them: (num_inserted, redundant_positions, digests).")
      .def("evict", [](BoundPrefixCache& self, std::int64_t n) {
             const std::uint32_t count = checked_count(n, "num_blocks", /*allow_zero=*/true);
             py::gil_scoped_release release;
             return self.cache->evict(count);
           }, py::arg("num_blocks"), "Evicts up to num_blocks unreferenced leaves; returns how many went.")
      .def("evict_detached", [](BoundPrefixCache& self, std::int64_t n) {
             const std::uint32_t count = checked_count(n, "num_blocks", /*allow_zero=*/true);
             std::vector<BlockHash> digests;
             std::vector<BlockId> ids;
             {
               py::gil_scoped_release release;
               (void)self.cache->evict_detached(count, digests, ids);
             }
             auto out = digest_array(digests.size());
             auto span = digest_span(out);
             std::copy(digests.begin(), digests.end(), span.begin());
             return py::make_tuple(out, id_array(ids));
           }, py::arg("num_blocks"),
           "Evicts up to num_blocks leaves by the policy and hands their blocks to the caller, still "
           "allocated: (digests (n, 32) uint8, block_ids int32). Free the ids once their bytes are copied.")
      .def("invalidate", [](BoundPrefixCache& self, const py::int_& owner) {
             const std::uint64_t o = owner_value(owner);
             py::gil_scoped_release release;
             return self.cache->invalidate(o);
           }, py::arg("owner"))
      .def("clear", [](BoundPrefixCache& self) {
             py::gil_scoped_release release;
             return self.cache->clear();
           })
      .def("drain_events", [](BoundPrefixCache& self) {
             std::vector<PrefixCacheEvent> events;
             {
               py::gil_scoped_release release;
               events = self.cache->drain_events();
             }
             py::list out;
             for (const auto& e : events) out.append(event_dict(e));
             return out;
           })
      .def("stats", [](const BoundPrefixCache& self) {
             PrefixCacheStats s;
             {
               py::gil_scoped_release release;
               s = self.cache->stats();
             }
             return prefix_stats_dict(s);
           })
      .def_property_readonly("num_in_use", [](const BoundPrefixCache& self) {
             py::gil_scoped_release release;
             return self.cache->stats().in_use_blocks;
           }, "Nodes with at least one user now (stats()['in_use_blocks'] without building the dict).")
      .def("contains", [](const BoundPrefixCache& self, const py::object& digest) {
             const BlockHash d = digest_from_buffer(digest, "digest");
             py::gil_scoped_release release;
             return self.cache->contains(d);
           }, py::arg("digest"))
      .def("__contains__", [](const BoundPrefixCache& self, const py::object& digest) {
             const BlockHash d = digest_from_buffer(digest, "digest");
             py::gil_scoped_release release;
             return self.cache->contains(d);
           })
      .def("lookup", [](const BoundPrefixCache& self, const py::object& digest) -> py::object {
             const BlockHash d = digest_from_buffer(digest, "digest");
             std::optional<PrefixNodeInfo> info;
             {
               py::gil_scoped_release release;
               info = self.cache->lookup(d);
             }
             if (!info) return py::none();
             py::dict r;
             r["block_id"] = info->block_id;
             r["parent"] = bytes_or_none(info->parent);
             r["num_children"] = info->num_children;
             r["users"] = info->users;
             r["owner"] = info->owner;
             r["priority"] = info->priority;
             return r;
           }, py::arg("digest"), "Snapshot of one node as a dict, or None.")
      .def("cached_block_ids", [](const BoundPrefixCache& self) {
             std::vector<BlockId> ids;
             {
               py::gil_scoped_release release;
               ids = self.cache->cached_block_ids();
             }
             return id_array(ids);
           })
      .def("cached_owners", [](const BoundPrefixCache& self) {
             std::vector<std::uint64_t> owners;
             {
               py::gil_scoped_release release;
               owners = self.cache->cached_owners();
             }
             return owners;
           }, "The distinct non-zero owners of cached nodes, ascending (a list of ints).")
      .def("check_invariants", [](const BoundPrefixCache& self) {
             py::gil_scoped_release release;
             self.cache->check_invariants();
           })
      .def("__len__", [](const BoundPrefixCache& self) {
             py::gil_scoped_release release;
             return self.cache->size();
           })
      .def_property_readonly("block_size", [](const BoundPrefixCache& self) { return self.cache->block_size(); })
      .def_property_readonly("capacity", [](const BoundPrefixCache& self) -> py::object {
             const auto c = self.cache->capacity();
             return c ? py::object(py::int_(*c)) : py::object(py::none());
           })
      .def_property_readonly("policy", [](const BoundPrefixCache& self) {
             return std::string(eviction_policy_name(self.cache->policy()));
           })
      .def_property_readonly("ttl_seconds", [](const BoundPrefixCache& self) { return self.cache->options().ttl_seconds; })
      .def_property_readonly("event_queue_capacity",
                             [](const BoundPrefixCache& self) { return self.cache->options().event_queue_capacity; })
      .def_property_readonly("hash_algorithm", [](const BoundPrefixCache& self) {
             return std::string(hash_algorithm_name(self.algorithm));
           })
      .def_property_readonly("metadata_bytes", [](const BoundPrefixCache& self) {
             py::gil_scoped_release release;
             return self.cache->metadata_bytes();
           })
      .def_property_readonly_static("node_bytes", [](const py::object&) { return PrefixCache::node_bytes(); });
}

}  // namespace sagellm::kv::bindings
