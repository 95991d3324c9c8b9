// Binding of the seed API's KVPool: a TokenPool plus the Python side of each allocation, so that
// KVPool.alloc and KVPool.free are one call into C++ each.
//
// What the binding owns, and why here: the live-handle table (a dict of handle_id.int -> handle,
// which KVPool reads as `_live_handles`) and the construction of the KVHandle itself (through the
// same trusted-model code as `_core.trusted_model`). The policy stays in Python: argument tables
// and a `normalize` function for anything the tables do not hold, the handle template, and a
// `refusal` factory that builds the seed's typed errors (KVBudgetExceededError, ...).
//
// Locking: one table lock, a mutex taken by alloc and free around the table and the TokenPool, and
// by KVPool's Python methods (`with pool._native:`) around their reads and pin/unpin. While it is
// held alloc and free run no Python code and create no Python object that the collector could
// use to run finalizers: the handle is built before the lock is taken, errors are raised after
// it is dropped. A waiter releases the GIL, so a holder that runs Python code (pin, reset) cannot
// deadlock against it; the thread that holds the lock entering it again (a finalizer or callback
// calling the pool) gets a RuntimeError instead of a deadlock.
#include <pybind11/stl.h>

#include <atomic>
#include <stdexcept>
#include <ctime>
#include <mutex>
#include <optional>
#include <utility>
#include <string>
#include <thread>

#include "bindings.hpp"
#include "sagellm_kv/token_pool.hpp"

namespace sagellm::kv::bindings {
namespace {

// Reads one attribute through the data descriptor its class holds (a __slots__ member), found
// once, so a read skips the lookup through the class's MRO; plain getattr when there is none.
class SlotReader {
 public:
  SlotReader() = default;
  SlotReader(const py::object& cls, const char* name) : name_(name) {
    py::object d = py::getattr(cls, name, py::none());
    if (Py_TYPE(d.ptr()) == &PyMemberDescr_Type) descr_ = std::move(d);
  }
  // A new reference to obj.<name>; obj must be an instance of the class given at construction.
  py::object get(PyObject* obj) const {
    PyObject* v = descr_ ? Py_TYPE(descr_.ptr())->tp_descr_get(descr_.ptr(), obj, reinterpret_cast<PyObject*>(Py_TYPE(obj)))
                         : PyObject_GetAttrString(obj, name_);
    if (v == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(v);
  }

 private:
  const char* name_ = "";
  py::object descr_;
};

// The handle's template and the argument tables, shared by every pool built with them.
struct HandleSpec {
  py::object cls;          // KVHandle
  py::object defaults;     // dict: field -> value of a fresh handle; None: build through `fallback`
  py::tuple names;         // the per-handle fields, in the order alloc passes their values
  py::object fields_set;   // set of the fields create() sets
  py::object fallback;     // KVHandle._trusted, for a protocol whose defaults cannot be shared
  py::object uuid_cls;
  py::object uuid_safe;
  py::object free_state;   // KVBlockState.FREE
  py::dict dtypes, layouts, devices;  // known-good argument -> canonical value(s)
  py::object normalize;    // (num_tokens, dtype, layout, device, metadata) -> the six checked values
  py::object refusal;      // (kind, *details) -> the typed exception to raise
  SlotReader uuid_int, private_attrs, fields_set_of;
};

// A mutex for the live-handle table that releases the GIL while it waits.
class TableLock {
 public:
  TableLock() = default;
  TableLock(const TableLock&) = delete;
  TableLock& operator=(const TableLock&) = delete;
  // A pool dropped by the thread that entered it and never left (`__enter__` without `__exit__`):
  // unlock first, destroying a locked mutex is undefined.
  ~TableLock() {
    if (owner_.load(std::memory_order_relaxed) == std::this_thread::get_id()) mutex_.unlock();
  }

  void acquire() {
    const std::thread::id self = std::this_thread::get_id();
    if (owner_.load(std::memory_order_relaxed) == self) {  // only this thread writes its own id
      // std::runtime_error: pybind11 raises it as RuntimeError.
      throw std::runtime_error("KVPool re-entered by the thread that holds its lock (from a finalizer or callback?)");
    }
    if (!mutex_.try_lock()) {
      py::gil_scoped_release release;  // the holder may need the GIL to finish
      mutex_.lock();
    }
    owner_.store(self, std::memory_order_relaxed);
  }
  void release() {
    if (owner_.load(std::memory_order_relaxed) != std::this_thread::get_id()) {
      throw std::runtime_error("KVPool lock released by a thread that does not hold it");
    }
    owner_.store(std::thread::id(), std::memory_order_relaxed);
    mutex_.unlock();
  }
  // release() for a scope that took the lock: no-op when this thread no longer holds it (Python
  // code run under the lock called __exit__ itself), so a destructor never throws.
  void release_held() noexcept {
    if (owner_.load(std::memory_order_relaxed) != std::this_thread::get_id()) return;
    owner_.store(std::thread::id(), std::memory_order_relaxed);
    mutex_.unlock();
  }

 private:
  std::mutex mutex_;
  std::atomic<std::thread::id> owner_{};
};

class Held {
 public:
  explicit Held(TableLock& lock) : lock_(lock) { lock_.acquire(); }
  ~Held() { lock_.release_held(); }
  Held(const Held&) = delete;
  Held& operator=(const Held&) = delete;

 private:
  TableLock& lock_;
};

struct SeedPool {
  SeedPool(std::uint64_t max_tokens, std::uint32_t block_size, bool overcommit, py::object rank, HandleSpec s)
      : core(max_tokens, block_size, overcommit), node_rank(std::move(rank)), spec(std::move(s)) {}
  TokenPool core;
  py::dict live;
  py::object node_rank;
  HandleSpec spec;
  TableLock lock;
};

[[noreturn]] void raise_refusal(const SeedPool& p, py::tuple args) {
  py::object exc = p.spec.refusal(*args);
  if (!PyExceptionInstance_Check(exc.ptr())) throw py::type_error("refusal must return an exception instance");
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

// The checked arguments of one allocation.
struct AllocArgs {
  std::uint64_t tokens = 0;
  py::object num_tokens, dtype, layout, device, tier, metadata;
};

// A positive exact int; saturates above 2**64 (the budget refuses it, naming the original).
bool positive_tokens(PyObject* obj, std::uint64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow > 0) {
    out = UINT64_MAX;
    return true;
  }
  if (overflow < 0 || v <= 0) return false;
  out = static_cast<std::uint64_t>(v);
  return true;
}

// table[key] (a new reference), or null when absent or unhashable (then the validating path runs).
py::object lookup(const py::dict& table, PyObject* key) {
  PyObject* hit = PyDict_GetItemWithError(table.ptr(), key);
  if (hit == nullptr) PyErr_Clear();
  return py::reinterpret_borrow<py::object>(hit);
}

// A copy of a dict whose keys are all str (what the model requires); nullptr for anything else.
py::object metadata_copy(PyObject* metadata) {
  if (metadata == Py_None) return py::reinterpret_steal<py::object>(PyDict_New());
  if (!PyDict_CheckExact(metadata)) return {};
  auto copy = py::reinterpret_steal<py::object>(PyDict_Copy(metadata));
  if (!copy) throw py::error_already_set();
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(copy.ptr(), &pos, &key, &value)) {
    if (!PyUnicode_Check(key)) return {};
  }
  return copy;
}

// The table lookups of the hot path; anything they do not hold goes through `normalize`, which
// raises the seed's errors for bad values or returns the checked six.
AllocArgs alloc_args(const SeedPool& p, const py::handle& num_tokens, const py::handle& dtype,
                     const py::handle& layout, const py::handle& device, const py::handle& metadata) {
  AllocArgs a;
  const HandleSpec& s = p.spec;
  py::object d = lookup(s.dtypes, dtype.ptr());
  py::object l = d ? lookup(s.layouts, layout.ptr()) : py::object();
  py::object dev = l && PyUnicode_CheckExact(device.ptr()) ? lookup(s.devices, device.ptr()) : py::object();
  if (positive_tokens(num_tokens.ptr(), a.tokens) && dev && PyTuple_CheckExact(dev.ptr()) &&
      PyTuple_GET_SIZE(dev.ptr()) == 2) {
    a.metadata = metadata_copy(metadata.ptr());
    if (a.metadata) {
      a.num_tokens = py::reinterpret_borrow<py::object>(num_tokens);
      a.dtype = std::move(d);
      a.layout = std::move(l);
      a.device = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(dev.ptr(), 0));
      a.tier = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(dev.ptr(), 1));
      return a;
    }
  }
  const py::tuple checked = s.normalize(num_tokens, dtype, layout, device, metadata);
  if (checked.size() != 6 || !positive_tokens(checked[0].ptr(), a.tokens)) {
    throw py::type_error("normalize must return (num_tokens > 0, dtype, layout, device, tier, metadata)");
  }
  a.num_tokens = checked[0];
  a.dtype = checked[1];
  a.layout = checked[2];
  a.device = checked[3];
  a.tier = checked[4];
  a.metadata = checked[5];
  return a;
}

// time.time(), computed as CPython does (integer nanoseconds, then one division).
py::object now() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  const std::int64_t ns = std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
  return py::reinterpret_steal<py::object>(PyFloat_FromDouble(static_cast<double>(ns) / 1e9));
}

// An uninitialised 1-D int32 array of `n` ids, straight from numpy's C API (py::array_t's
// constructor builds shape and stride vectors on the heap first).
py::array new_ids(std::uint64_t n) {
  auto& api = py::detail::npy_api::get();
  Py_intptr_t dims[1] = {static_cast<Py_intptr_t>(n)};
  PyObject* descr = api.PyArray_DescrFromType_(py::detail::npy_api::NPY_INT32_);  // stolen below
  if (descr == nullptr) throw py::error_already_set();
  PyObject* arr = api.PyArray_NewFromDescr_(api.PyArray_Type_, descr, 1, dims, nullptr, nullptr, 0, nullptr);
  if (arr == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::array>(arr);
}

BlockId* ids_data(const py::array& ids) {
  return reinterpret_cast<BlockId*>(py::detail::array_proxy(ids.ptr())->data);
}

void make_read_only(const py::array& ids) {
  py::detail::array_proxy(ids.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
}

// A fresh handle owning `ids` (filled in later, before anyone else sees the handle) and its table key.
py::object build_handle(const SeedPool& p, const AllocArgs& a, const py::array& ids, py::object& key) {
  const HandleSpec& s = p.spec;
  const py::object rank = p.node_rank;  // held: another thread may assign node_rank meanwhile
  if (s.defaults.is_none()) {
    py::object handle = s.fallback(a.num_tokens, a.dtype, a.layout, a.device, a.tier, rank, a.metadata, ids);
    key = handle.attr("handle_id").attr("int");
    return handle;
  }
  const py::object stamp = now();
  const py::object id = new_uuid4(s.uuid_cls.ptr(), s.uuid_safe.ptr(), &key);
  // In the order of KVHandle's _PER_HANDLE_ORDER.
  PyObject* const values[] = {id.ptr(), a.num_tokens.ptr(), a.num_tokens.ptr(), a.dtype.ptr(), a.layout.ptr(),
                              a.device.ptr(), a.tier.ptr(), rank.ptr(), stamp.ptr(), stamp.ptr(),
                              a.metadata.ptr()};
  static PyObject* const ids_name = interned("_block_ids");
  auto private_attrs = py::reinterpret_steal<py::object>(PyDict_New());
  if (!private_attrs || PyDict_SetItem(private_attrs.ptr(), ids_name, ids.ptr()) != 0) throw py::error_already_set();
  const auto names = std::span<PyObject* const>(&PyTuple_GET_ITEM(s.names.ptr(), 0),
                                                static_cast<std::size_t>(s.names.size()));
  return trusted_model(s.cls.ptr(), s.defaults.ptr(), names, values, s.fields_set.ptr(), private_attrs.ptr());
}

py::object alloc(SeedPool& p, const py::handle& num_tokens, const py::handle& dtype, const py::handle& layout,
                 const py::handle& device, const py::handle& metadata) {
  const AllocArgs a = alloc_args(p, num_tokens, dtype, layout, device, metadata);
  // Larger than the whole budget: refused without sizing an id array for it.
  const std::uint64_t blocks = a.tokens <= p.core.max_tokens() ? p.core.blocks_for(a.tokens) : 0;
  const py::array ids = new_ids(blocks);
  py::object key;
  py::object handle = blocks != 0 ? build_handle(p, a, ids, key) : py::object();
  TokenGrant grant;
  {
    Held held(p.lock);
    if (blocks == 0) {
      grant = {ErrorCode::kBudgetExceeded, p.core.available_tokens()};
    } else {
      grant = p.core.allocate(a.tokens, std::span<BlockId>(ids_data(ids), blocks));
    }
    if (grant.ok()) {
      make_read_only(ids);
      if (PyDict_SetItem(p.live.ptr(), key.ptr(), handle.ptr()) != 0) {
        (void)p.core.release(a.tokens, std::span<const BlockId>(ids_data(ids), blocks));
        throw py::error_already_set();
      }
      return handle;
    }
  }
  if (grant.code == ErrorCode::kBudgetExceeded) {
    raise_refusal(p, py::make_tuple("budget", a.num_tokens, grant.available, p.core.max_tokens()));
  }
  throw Error(grant.code, "cannot allocate " + std::to_string(blocks) + " block ids for " +
                              std::to_string(a.tokens) + " tokens");
}

// The instance __dict__ of `obj` (a new reference), where a pydantic model keeps its fields.
py::object dict_of(PyObject* obj) {
  PyObject* d = PyObject_GenericGetDict(obj, nullptr);
  if (d == nullptr) throw py::error_already_set();
  if (!PyDict_Check(d)) {
    Py_DECREF(d);
    throw py::type_error("a KVHandle without its field dict");
  }
  return py::reinterpret_steal<py::object>(d);
}

// Sets state = FREE and ref_count = 0 as validated assignment would (both valid by construction),
// without running Python code.
void mark_freed(const SeedPool& p, PyObject* handle, PyObject* fields) {
  static PyObject* const state_name = interned("state");
  static PyObject* const refs_name = interned("ref_count");
  static PyObject* const zero = PyLong_FromLong(0);
  const py::object fields_set = p.spec.fields_set_of.get(handle);
  if (!PyAnySet_Check(fields_set.ptr())) throw py::type_error("a KVHandle without its set of fields");
  if (PyDict_SetItem(fields, state_name, p.spec.free_state.ptr()) != 0 || PyDict_SetItem(fields, refs_name, zero) != 0 ||
      PySet_Add(fields_set.ptr(), state_name) != 0 || PySet_Add(fields_set.ptr(), refs_name) != 0) {
    throw py::error_already_set();
  }
}

// The field `name` of a live handle, read from its __dict__ (no Python code runs); nullptr when absent.
PyObject* field(PyObject* fields, PyObject* name) { return PyDict_GetItemWithError(fields, name); }

// What free found under the lock; acted on (errors raised) after the lock is dropped.
struct FreeResult {
  enum class Outcome { kFreed, kNotLive, kPinned, kRefused } outcome = Outcome::kFreed;
  py::object live;        // the table's handle: dropped after the lock, it may be the last reference
  py::object pin_count;   // kPinned
  BatchStatus refused;    // kRefused: the handle's ids or token count were changed after alloc
  std::size_t num_ids = 0;
  std::uint64_t tokens = 0;
};

// The handle's id and its table key (handle_id.int), read from its field dict.
std::pair<py::object, py::object> handle_key(const SeedPool& p, PyObject* fields) {
  static PyObject* const id_name = interned("handle_id");
  const auto handle_id = py::reinterpret_borrow<py::object>(field(fields, id_name));
  if (!handle_id) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a KVHandle without a handle_id");
    throw py::error_already_set();
  }
  const bool exact = Py_TYPE(handle_id.ptr()) == reinterpret_cast<PyTypeObject*>(p.spec.uuid_cls.ptr());
  py::object key = exact ? p.spec.uuid_int.get(handle_id.ptr()) : handle_id.attr("int");
  return {handle_id, std::move(key)};
}

// Check and commit for the live handle `found` (the table lock held): returns its tokens and ids
// to the TokenPool, drops it from the table and marks it (and the caller's copy `h`) freed; or
// reports why not, changing nothing.
void free_live(SeedPool& p, PyObject* h, PyObject* found, const py::object& key, const py::object& own_fields,
               FreeResult& r) {
  static PyObject* const pins_name = interned("pin_count");
  static PyObject* const tokens_name = interned("num_tokens");
  static PyObject* const ids_name = interned("_block_ids");
  const py::object fields = found == h ? own_fields : dict_of(found);
  const py::object priv = p.spec.private_attrs.get(found);
  if (!PyDict_Check(priv.ptr())) throw py::type_error("a KVHandle without its private attributes");
  // Held, not borrowed: reading odd block ids may run Python code that rewrites the handle.
  const auto pin_count = py::reinterpret_borrow<py::object>(field(fields.ptr(), pins_name));
  const auto tokens = py::reinterpret_borrow<py::object>(field(fields.ptr(), tokens_name));
  const auto ids_obj = py::reinterpret_borrow<py::object>(field(priv.ptr(), ids_name));
  if (!pin_count || !tokens || !ids_obj) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a KVHandle without num_tokens, pin_count or block ids");
    throw py::error_already_set();
  }
  if (!PyLong_CheckExact(pin_count.ptr()) || PyLong_AsLong(pin_count.ptr()) != 0) {
    PyErr_Clear();
    r.outcome = FreeResult::Outcome::kPinned;
    r.pin_count = pin_count;
    return;
  }
  if (!positive_tokens(tokens.ptr(), r.tokens)) throw py::value_error("handle num_tokens is not a positive int");
  const BlockIds ids(ids_obj, "block_ids");
  r.refused = p.core.release(r.tokens, ids.span());
  if (!r.refused.ok()) {
    r.outcome = FreeResult::Outcome::kRefused;
    r.num_ids = ids.span().size();
    return;
  }
  if (PyDict_DelItem(p.live.ptr(), key.ptr()) != 0) throw py::error_already_set();
  mark_freed(p, found, fields.ptr());
  if (h != found) mark_freed(p, h, own_fields.ptr());
}

// Raises the error for a refused free (no lock held: building it runs Python code).
[[noreturn]] void raise_free_refusal(const SeedPool& p, const py::handle& handle, const py::object& handle_id,
                                     const FreeResult& r) {
  if (r.outcome == FreeResult::Outcome::kNotLive) {
    static PyObject* const state_name = interned("state");
    const int freed = PyObject_RichCompareBool(handle.attr(state_name).ptr(), p.spec.free_state.ptr(), Py_EQ);
    if (freed < 0) throw py::error_already_set();
    raise_refusal(p, py::make_tuple(freed != 0 ? "double_free" : "not_found", handle_id));
  }
  if (r.outcome == FreeResult::Outcome::kPinned) raise_refusal(p, py::make_tuple("pinned", handle_id, r.pin_count));
  const std::string what = "free: handle " + py::str(handle_id).cast<std::string>();
  if (r.refused.code == ErrorCode::kInvalidArgument) {
    throw Error(ErrorCode::kInvalidBlock, what + " holds " + std::to_string(r.num_ids) +
                                              " block ids, which does not match its " + std::to_string(r.tokens) +
                                              " tokens; nothing was freed");
  }
  throw Error(r.refused.code, what + ": block id " + std::to_string(r.refused.id) + " at position " +
                                  std::to_string(r.refused.index) + " is not one it owns; nothing was freed");
}

void free_handle(SeedPool& p, const py::handle& handle) {
  PyObject* h = handle.ptr();
  if (Py_TYPE(h) != reinterpret_cast<PyTypeObject*>(p.spec.cls.ptr())) {
    const int is = PyObject_IsInstance(h, p.spec.cls.ptr());
    if (is < 0) throw py::error_already_set();
    if (is == 0) throw py::type_error(std::string("expected a KVHandle, got ") + Py_TYPE(h)->tp_name);
  }
  const py::object own_fields = dict_of(h);
  const auto [handle_id, key] = handle_key(p, own_fields.ptr());
  FreeResult r;
  {
    Held held(p.lock);
    PyObject* found = PyDict_GetItemWithError(p.live.ptr(), key.ptr());
    if (found != nullptr) {
      r.live = py::reinterpret_borrow<py::object>(found);
      free_live(p, h, found, key, own_fields, r);
    } else if (PyErr_Occurred()) {
      throw py::error_already_set();
    } else {
      r.outcome = FreeResult::Outcome::kNotLive;
    }
  }
  if (r.outcome != FreeResult::Outcome::kFreed) raise_free_refusal(p, handle, handle_id, r);
}

py::dict stats_dict(const TokenPoolStats& s) {
  py::dict d;
  d["max_tokens"] = s.max_tokens;
  d["allocated_tokens"] = s.allocated_tokens;
  d["allocations"] = s.allocations;
  d["blocks_in_use"] = s.blocks_in_use;
  d["blocks_peak"] = s.blocks_peak;
  d["block_id_capacity"] = s.block_id_capacity;
  d["available_tokens"] = s.available_tokens;
  return d;
}

}  // namespace

void bind_seed_pool(py::module_& m) {
  py::class_<SeedPool>(m, "SeedPool")
      .def(py::init([](std::int64_t max_tokens, std::int64_t block_size, py::object node_rank, py::object cls,
                       py::object defaults, py::tuple names, py::object fields_set, py::object fallback,
                       py::object uuid_cls, py::object uuid_safe, py::object free_state, py::dict dtypes,
                       py::dict layouts, py::dict devices, py::object normalize, py::object refusal,
                       bool overcommit_blocks) {
             if (max_tokens <= 0) throw py::value_error("max_tokens must be > 0, got " + std::to_string(max_tokens));
             const std::uint32_t bs = checked_count(block_size, "block_size");
             if (!defaults.is_none() && (!PyDict_Check(defaults.ptr()) || !PyAnySet_Check(fields_set.ptr()))) {
               throw py::type_error("defaults must be a dict (or None) and fields_set a set");
             }
             for (const py::handle name : names) {
               if (!PyUnicode_Check(name.ptr())) throw py::type_error("names must be str");
             }
             if (!PyType_Check(cls.ptr()) || !PyType_Check(uuid_cls.ptr())) {
               throw py::type_error("cls and uuid_cls must be classes");
             }
             check_plain_class(uuid_cls.ptr(), "uuid_cls");  // made by object.__new__ in alloc
             if (!defaults.is_none()) check_plain_class(cls.ptr(), "cls");
             HandleSpec spec{cls, defaults, names, fields_set, fallback, uuid_cls, uuid_safe, free_state,
                             dtypes, layouts, devices, normalize, refusal,
                             SlotReader(uuid_cls, "int"), SlotReader(cls, "__pydantic_private__"),
                             SlotReader(cls, "__pydantic_fields_set__")};
             return std::make_unique<SeedPool>(static_cast<std::uint64_t>(max_tokens), bs, overcommit_blocks, node_rank,
                                               std::move(spec));
           }),
           py::arg("max_tokens"), py::arg("block_size"), py::arg("node_rank"), py::kw_only(), py::arg("cls"),
           py::arg("defaults"), py::arg("names"), py::arg("fields_set"), py::arg("fallback"), py::arg("uuid_cls"),
           py::arg("uuid_safe"), py::arg("free_state"), py::arg("dtypes"), py::arg("layouts"), py::arg("devices"),
           py::arg("normalize"), py::arg("refusal"), py::arg("overcommit_blocks") = false)
      .def("alloc", &alloc, py::arg("num_tokens"), py::arg("dtype"), py::arg("layout"), py::arg("device"),
           py::arg("metadata"))
      .def("free", &free_handle, py::arg("handle"))
      .def("__enter__", [](SeedPool& p) { p.lock.acquire(); })
      .def("__exit__", [](SeedPool& p, const py::args&) {
             p.lock.release();
             return false;
           })
      .def_readonly("live", &SeedPool::live)
      .def_readwrite("node_rank", &SeedPool::node_rank)
      .def("stats", [](const SeedPool& p) { return stats_dict(p.core.stats()); })
      .def_property_readonly("allocated_tokens", [](const SeedPool& p) { return p.core.allocated_tokens(); })
      .def_property_readonly("available_tokens", [](const SeedPool& p) { return p.core.available_tokens(); })
      .def_property_readonly("blocks_in_use", [](const SeedPool& p) { return p.core.stats().blocks_in_use; })
      .def_property_readonly("blocks_peak", [](const SeedPool& p) { return p.core.stats().blocks_peak; })
      .def("can_admit", [](const SeedPool& p, std::int64_t n) {
             return n >= 0 && p.core.can_admit(static_cast<std::uint64_t>(n));
           }, py::arg("num_tokens"))
      .def("reset_ids", [](SeedPool& p) { p.core.reset(); })
      .def("reset_peak", [](SeedPool& p) { p.core.reset_peak(); })
      .def_property_readonly("max_block_ids", [](const SeedPool& p) { return p.core.max_block_ids(); });
}

}  // namespace sagellm::kv::bindings
