// Binding of the offload index (vLLM's OffloadingManager bookkeeping). An engine names chunks by
// keys (exact bytes objects); the binding keeps the key -> slot maps in two Python dicts it owns,
// `resident` and `pending`, because vLLM asks about one key at a time and a dict probe from Python
// costs less than any call into C++. Every other call reads its whole key list in one pass (C API,
// no Python code runs: keys must be exact bytes), maps it to slots and crosses into the core once.
// The GIL is held throughout: each call builds Python objects and does O(keys) core work. Given the
// engine's result classes, the binding also builds the answers (object.__new__ + attributes, as
// bind_objects.cpp does), so a call's Python side is a few attribute reads.
#include <algorithm>
#include <cassert>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/offload_index.hpp"

namespace sagellm::kv::bindings {
namespace {

// The items of a list, tuple or any other iterable, each held by this object: a tuple is held
// whole, the caller's list is copied item by item (a reference each, no Python code runs while
// copying), anything else is read into a list of its own. Never a borrowed view of the caller's
// list: a call allocates Python objects while it reads the items, a garbage collection that
// triggers runs finalizers, and one that clears or grows the list would free or move its array
// under the reader.
class KeyItems {
 public:
  explicit KeyItems(const py::handle& keys) {
    PyObject* p = keys.ptr();
    if (PyList_Check(p)) {
      const Py_ssize_t n = PyList_GET_SIZE(p);
      owned_.refs.reserve(static_cast<std::size_t>(n));  // may throw; nothing held yet
      for (Py_ssize_t i = 0; i < n; ++i) owned_.refs.push_back(Py_NewRef(PyList_GET_ITEM(p, i)));
      items_ = owned_.refs.data();
      size_ = owned_.refs.size();
    } else {
      seq_ = py::reinterpret_steal<py::object>(PySequence_Fast(p, "keys must be a collection of bytes"));
      if (!seq_) throw py::error_already_set();
      items_ = PySequence_Fast_ITEMS(seq_.ptr());
      size_ = static_cast<std::size_t>(PySequence_Fast_GET_SIZE(seq_.ptr()));
    }
    for (std::size_t i = 0; i < size_; ++i) {
      if (!PyBytes_CheckExact(items_[i])) {
        throw py::type_error("keys must be bytes, got " +
                             std::string(Py_TYPE(items_[i])->tp_name) + " at position " + std::to_string(i));
      }
    }
  }
  KeyItems(const KeyItems&) = delete;
  KeyItems& operator=(const KeyItems&) = delete;
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] PyObject* operator[](std::size_t i) const noexcept { return items_[i]; }

 private:
  struct Refs {  // one reference per item of the caller's list
    std::vector<PyObject*> refs;
    Refs() = default;
    Refs(const Refs&) = delete;
    Refs& operator=(const Refs&) = delete;
    ~Refs() {
      for (PyObject* o : refs) Py_DECREF(o);
    }
  };
  Refs owned_;
  py::object seq_;                 // the caller's tuple, or a list made from another iterable
  PyObject* const* items_ = nullptr;
  std::size_t size_ = 0;
};

// A key for an error message: Python's own bytes.hex() (error paths only).
std::string key_hex(PyObject* key) {
  return py::str(py::reinterpret_borrow<py::object>(key).attr("hex")());
}

// The value `key` maps to in `dict` (borrowed), or nullptr. Never runs Python code (exact bytes keys).
PyObject* value_in(PyObject* dict, PyObject* key) {
  PyObject* v = PyDict_GetItemWithError(dict, key);
  if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

bool same_bytes(PyObject* a, PyObject* b) noexcept {
  return a == b || (PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b) &&
                    std::memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), static_cast<std::size_t>(PyBytes_GET_SIZE(a))) == 0);
}

// lookup(key, req_context=None) over (resident, pending, hit, hit_pending, miss), the tuple `self`:
// a plain C function, so an engine's per-key probe costs no Python frame and no pybind11 dispatch.
// Both arguments may be passed by name, as to the OffloadingManager.lookup it stands in for.
PyObject* lookup_key(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  if (nargs > 2) {
    PyErr_Format(PyExc_TypeError, "lookup() takes a key and an optional request context (%zd arguments given)", nargs);
    return nullptr;
  }
  PyObject* key = nargs > 0 ? args[0] : nullptr;
  bool have_context = nargs > 1;
  const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
  for (Py_ssize_t i = 0; i < nkw; ++i) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, i);
    const bool is_key = PyUnicode_CompareWithASCIIString(name, "key") == 0;
    if (!is_key && PyUnicode_CompareWithASCIIString(name, "req_context") != 0) {
      PyErr_Format(PyExc_TypeError, "lookup() got an unexpected keyword argument '%U'", name);
      return nullptr;
    }
    if (is_key ? key != nullptr : have_context) {
      PyErr_Format(PyExc_TypeError, "lookup() got multiple values for argument '%U'", name);
      return nullptr;
    }
    if (is_key) {
      key = args[nargs + i];
    } else {
      have_context = true;
    }
  }
  if (key == nullptr) {
    PyErr_SetString(PyExc_TypeError, "lookup() missing required argument 'key'");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < 2; ++i) {
    const int found = PyDict_Contains(PyTuple_GET_ITEM(self, i), key);
    if (found < 0) return nullptr;
    if (found == 1) return Py_NewRef(PyTuple_GET_ITEM(self, 2 + i));
  }
  return Py_NewRef(PyTuple_GET_ITEM(self, 4));
}

PyMethodDef lookup_def = {"lookup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&lookup_key)),
                          METH_FASTCALL | METH_KEYWORDS,
                          "lookup(key, req_context=None): hit if resident, hit_pending if pending, else miss."};

// Marks a call in progress. Python code can run inside one (a garbage collection its allocations
// trigger runs finalizers and gc callbacks, and they may switch threads): a call entering then would
// reuse the scratch state of the one in progress, so it is refused.
class Entered {
 public:
  explicit Entered(bool& busy) : busy_(busy) {
    if (busy_) {
      PyErr_SetString(PyExc_RuntimeError, "OffloadIndex is already in a call (re-entered from a finalizer or another thread)");
      throw py::error_already_set();
    }
    busy_ = true;
  }
  ~Entered() { busy_ = false; }
  Entered(const Entered&) = delete;
  Entered& operator=(const Entered&) = delete;

 private:
  bool& busy_;
};

// Marks the slots a call collected (so a key listed twice counts once) and clears the marks when
// the call ends, however it ends.
class InCall {
 public:
  InCall(std::vector<std::uint8_t>& marks, const std::vector<BlockId>& slots) : marks_(marks), slots_(slots) {}
  ~InCall() {
    for (const BlockId s : slots_) marks_[static_cast<std::size_t>(s)] = 0;
  }
  InCall(const InCall&) = delete;
  InCall& operator=(const InCall&) = delete;

 private:
  std::vector<std::uint8_t>& marks_;
  const std::vector<BlockId>& slots_;
};

// Removes `key`, which `dict` holds. Cannot fail: an exact bytes key hashes and compares without
// running Python code, and a removal allocates nothing. (A key already gone, taken out through the
// dict's referents by a program that went behind the read-only views, is no error here.)
void drop_key(PyObject* dict, PyObject* key) noexcept {
  if (PyDict_DelItem(dict, key) != 0) PyErr_Clear();
}

// prepare_store's pending entries for its new keys (call[i] == kNoSlot), made before the core's
// reserve with None as the value: a later assignment of the slot only replaces a value, which cannot
// fail. Removed again when the call ends without keep() (a refusal or a failure).
class Placeholders {
 public:
  Placeholders(PyObject* pending, const KeyItems& items, const std::vector<BlockId>& call)
      : pending_(pending), items_(items), call_(call) {
    for (; added_ < items.size(); ++added_) {
      if (call[added_] == OffloadIndex::kNoSlot && PyDict_SetItem(pending, items[added_], Py_None) != 0) {
        py::error_already_set error;  // taken first: the removals run with no error set
        remove();
        throw error;
      }
    }
  }
  ~Placeholders() {
    if (!kept_) remove();
  }
  Placeholders(const Placeholders&) = delete;
  Placeholders& operator=(const Placeholders&) = delete;

  void keep() const noexcept { kept_ = true; }

 private:
  void remove() noexcept {
    for (std::size_t i = 0; i < added_; ++i) {
      if (call_[i] == OffloadIndex::kNoSlot) drop_key(pending_, items_[i]);
    }
  }

  PyObject* pending_;
  const KeyItems& items_;
  const std::vector<BlockId>& call_;
  std::size_t added_ = 0;
  mutable bool kept_ = false;
};

class BoundOffloadIndex {
 public:
  BoundOffloadIndex(std::int64_t num_slots, const std::string& policy, double ttl_seconds, const py::object& slots_type,
                    const py::object& store_type)
      : index_(options(num_slots, policy, ttl_seconds)),
        slots_type_(plain_class(slots_type, "slots_type")),
        store_type_(plain_class(store_type, "store_type")),
        slot_key_(index_.num_slots()),
        slot_value_(index_.num_slots()),
        in_call_(index_.num_slots(), 0),
        resident_view_(py::reinterpret_steal<py::object>(PyDictProxy_New(resident_.ptr()))),
        pending_view_(py::reinterpret_steal<py::object>(PyDictProxy_New(pending_.ptr()))) {
    if (!resident_view_ || !pending_view_) throw py::error_already_set();
    // Every slot's int now, so that a store never has to make one after the core reserved its slots.
    for (std::size_t i = 0; i < slot_value_.size(); ++i) {
      slot_value_[i] = py::reinterpret_steal<py::object>(PyLong_FromSize_t(i));
      if (!slot_value_[i]) throw py::error_already_set();
    }
  }

  // Read-only views of the key maps (the same objects for the index's lifetime).
  [[nodiscard]] const py::object& resident() const noexcept { return resident_view_; }
  [[nodiscard]] const py::object& pending() const noexcept { return pending_view_; }
  [[nodiscard]] std::uint32_t num_slots() const noexcept { return index_.num_slots(); }

  // Pins the resident keys for a load; their slots, in key order (wrapped in slots_type when set).
  py::object prepare_load(const py::handle& keys) {
    const Entered entered(busy_);
    const KeyItems items(keys);
    py::array_t<BlockId> slots(static_cast<py::ssize_t>(items.size()));
    BlockId* out = slots.mutable_data();
    for (std::size_t i = 0; i < items.size(); ++i) {
      out[i] = slot_in(resident_, items[i]);
      if (out[i] == OffloadIndex::kNoSlot) {
        throw py::key_error("prepare_load: key " + key_hex(items[i]) + " is not offloaded and ready");
      }
    }
    py::object answer = wrap_slots(py::array_t<BlockId>(slots));  // first: after the pin nothing may fail
    index_.pin(std::span<const BlockId>(out, items.size()));
    return answer;
  }

  void complete_load(const py::handle& keys) {
    const Entered entered(busy_);
    resident_slots(keys, true, "complete_load: key ", " has no load in flight");
    index_.unpin(scratch_);
  }

  void touch(const py::handle& keys) {
    const Entered entered(busy_);
    resident_slots(keys, false, "", "");
    index_.touch(scratch_);
  }

  // (keys to store, their new slots, evicted keys), or None when there is no room.
  py::object prepare_store(const py::handle& keys, const py::handle& prev) {
    const Entered entered(busy_);
    const KeyItems items(keys);
    call_.clear();
    std::size_t fresh = 0;
    for (std::size_t i = 0; i < items.size(); ++i) {
      BlockId s = slot_in(resident_, items[i]);
      if (s == OffloadIndex::kNoSlot) s = slot_in(pending_, items[i]);
      fresh += s == OffloadIndex::kNoSlot ? 1 : 0;
      call_.push_back(s);
    }
    check_distinct(items, fresh);
    BlockId first_prev = OffloadIndex::kNoSlot;
    if (!prev.is_none()) {
      if (!PyBytes_CheckExact(prev.ptr())) throw py::type_error("prev must be bytes or None");
      first_prev = slot_in(resident_, prev.ptr());
      if (first_prev == OffloadIndex::kNoSlot) first_prev = slot_in(pending_, prev.ptr());
    }
    // --- prepare: the answer's objects and the new keys' pending entries (placeholders), before the
    // core changes anything, so that what follows its reserve cannot fail (it cannot be undone:
    // evicted chunks are gone). Evictions never exceed the new slots, so `gone` is sized by them.
    py::array_t<BlockId> slots(static_cast<py::ssize_t>(fresh));
    BlockId* const new_slots = slots.mutable_data();
    auto to_store = py::reinterpret_steal<py::list>(PyList_New(static_cast<py::ssize_t>(fresh)));
    auto gone = py::reinterpret_steal<py::list>(PyList_New(static_cast<py::ssize_t>(fresh)));
    if (!to_store || !gone) throw py::error_already_set();
    py::object out = answer(to_store, slots, gone);  // shares the lists, filled below
    const Placeholders placeholders(pending_.ptr(), items, call_);  // removed again unless kept
    evicted_.clear();
    if (!index_.reserve(call_, first_prev, std::span<BlockId>(new_slots, fresh), evicted_)) return py::none();
    // --- commit: cannot fail ---
    placeholders.keep();
    assert(evicted_.size() <= fresh);
    PyObject* const gone_out = gone.ptr();
    PyObject* const to_store_out = to_store.ptr();
    for (std::size_t i = 0; i < evicted_.size(); ++i) {
      py::object key = std::move(slot_key_[static_cast<std::size_t>(evicted_[i])]);
      drop_key(resident_.ptr(), key.ptr());
      PyList_SET_ITEM(gone_out, static_cast<py::ssize_t>(i), key.release().ptr());
    }
    Py_SET_SIZE(reinterpret_cast<PyVarObject*>(gone_out), static_cast<py::ssize_t>(evicted_.size()));
    for (std::size_t i = 0, j = 0; i < items.size(); ++i) {
      if (call_[i] != OffloadIndex::kNoSlot) continue;
      PyObject* key = items[i];
      const auto slot = static_cast<std::size_t>(new_slots[j]);
      [[maybe_unused]] const int rc = PyDict_SetItem(pending_.ptr(), key, slot_value_[slot].ptr());  // replaces
      assert(rc == 0);
      slot_key_[slot] = py::reinterpret_borrow<py::object>(key);
      PyList_SET_ITEM(to_store_out, static_cast<py::ssize_t>(j++), Py_NewRef(key));
    }
    return out;
  }

  // Completes (or abandons) the pending stores among `keys`; others are skipped, as is a key's second
  // appearance. The keys stored, in the order they were reserved. All or nothing: the answer and the
  // `resident` entries are made before the core commits (and the entries taken out again when it
  // throws); only removals, which cannot fail, follow it. So a MemoryError or std::bad_alloc leaves
  // every key pending, the maps and the index agreeing.
  py::list complete_store(const py::handle& keys, bool success) {
    const Entered entered(busy_);
    const KeyItems items(keys);
    scratch_.clear();
    const InCall in_call(in_call_, scratch_);
    for (std::size_t i = 0; i < items.size(); ++i) {
      const BlockId s = slot_in(pending_, items[i]);
      if (s == OffloadIndex::kNoSlot || in_call_[static_cast<std::size_t>(s)] != 0) continue;
      scratch_.push_back(s);
      in_call_[static_cast<std::size_t>(s)] = 1;
    }
    auto done = py::reinterpret_steal<py::list>(PyList_New(success ? static_cast<py::ssize_t>(scratch_.size()) : 0));
    if (!done) throw py::error_already_set();
    if (!success) {
      index_.abandon(scratch_);  // refuses (changing nothing) only on a broken invariant
      for (const BlockId s : scratch_) {
        drop_key(pending_.ptr(), slot_key_[static_cast<std::size_t>(s)].ptr());
        slot_key_[static_cast<std::size_t>(s)] = py::object();
      }
      return done;
    }
    std::size_t added = 0;
    try {
      for (; added < scratch_.size(); ++added) {
        const auto slot = static_cast<std::size_t>(scratch_[added]);
        if (PyDict_SetItem(resident_.ptr(), slot_key_[slot].ptr(), slot_value_[slot].ptr()) != 0) {
          throw py::error_already_set();
        }
      }
      index_.commit(scratch_);  // on a throw nothing changed, scratch_ in its order
    } catch (...) {
      for (std::size_t i = 0; i < added; ++i) {
        drop_key(resident_.ptr(), slot_key_[static_cast<std::size_t>(scratch_[i])].ptr());
      }
      throw;
    }
    // Cannot fail from here on.
    for (std::size_t i = 0; i < scratch_.size(); ++i) {
      PyObject* key = slot_key_[static_cast<std::size_t>(scratch_[i])].ptr();
      drop_key(pending_.ptr(), key);
      PyList_SET_ITEM(done.ptr(), static_cast<py::ssize_t>(i), Py_NewRef(key));
    }
    return done;
  }

  // A C function answering `hit` / `hit_pending` / `miss` for a key (see lookup_key).
  py::object lookup_function(const py::object& hit, const py::object& hit_pending, const py::object& miss) const {
    const py::tuple state = py::make_tuple(resident_, pending_, hit, hit_pending, miss);
    PyObject* fn = PyCFunction_NewEx(&lookup_def, state.ptr(), nullptr);
    if (fn == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(fn);
  }

  void reset() {
    const Entered entered(busy_);
    index_.reset();
    resident_.clear();
    pending_.clear();
    for (auto& key : slot_key_) key = py::object();
  }

  [[nodiscard]] py::dict stats() const {
    const OffloadIndexStats s = index_.stats();
    py::dict d = prefix_stats_dict(s.trie);
    d["num_slots"] = s.num_slots;
    d["free_slots"] = s.free_slots;
    d["pending_slots"] = s.pending_slots;
    d["resident_slots"] = s.resident_slots;
    d["evictions"] = s.evictions;  // the index's (its trie never evicts on its own)
    return d;
  }

  void check_invariants() const {
    index_.check_invariants();
    const OffloadIndexStats s = index_.stats();
    if (py::len(resident_) != s.resident_slots || py::len(pending_) != s.pending_slots) {
      throw Error(ErrorCode::kInternal, "offload index: key maps and slot counts disagree");
    }
    for (const auto& [dict, want] : {std::pair{&resident_, SlotState::kResident}, std::pair{&pending_, SlotState::kPending}}) {
      for (const auto& [key, value] : *dict) {
        const auto slot = value.cast<BlockId>();
        const auto& held = slot_key_.at(static_cast<std::size_t>(slot));
        if (index_.state(slot) != want || !held || !held.equal(key)) {
          throw Error(ErrorCode::kInternal, "offload index: key " + key_hex(key.ptr()) + " and slot " +
                                                std::to_string(slot) + " disagree");
        }
      }
    }
  }

 private:
  // None, or a class that object.__new__ can make (no __new__ / __init__ of its own is run).
  static py::object plain_class(const py::object& cls, const char* what) {
    if (cls.is_none()) return cls;
    if (!PyType_Check(cls.ptr()) || reinterpret_cast<PyTypeObject*>(cls.ptr())->tp_new != PyBaseObject_Type.tp_new) {
      throw py::type_error(std::string(what) + " must be None or a class made by object.__new__, got " +
                           std::string(py::str(cls)));
    }
    return cls;
  }

  // prepare_store's answer around its (still unfilled) lists: a tuple, or a store_type instance.
  py::object answer(const py::list& to_store, py::array_t<BlockId> slots, const py::list& gone) const {
    if (store_type_.is_none()) return py::make_tuple(to_store, std::move(slots), gone);
    static PyObject* const keys_name = interned("keys_to_store");
    static PyObject* const spec_name = interned("store_spec");
    static PyObject* const evicted_name = interned("evicted_keys");
    py::object out = new_bare(store_type_.ptr());
    set_generic(out.ptr(), keys_name, to_store.ptr());
    set_generic(out.ptr(), spec_name, wrap_slots(std::move(slots)).ptr());
    set_generic(out.ptr(), evicted_name, gone.ptr());
    return out;
  }

  // The slots as they are, or as a slots_type instance whose block_ids they are.
  py::object wrap_slots(py::array_t<BlockId>&& slots) const {
    if (slots_type_.is_none()) return std::move(slots);
    static PyObject* const ids_name = interned("block_ids");
    py::object spec = new_bare(slots_type_.ptr());
    set_generic(spec.ptr(), ids_name, slots.ptr());
    return spec;
  }

  static OffloadIndexOptions options(std::int64_t num_slots, const std::string& policy, double ttl_seconds) {
    OffloadIndexOptions o;
    o.num_slots = checked_count(num_slots, "num_slots");
    o.policy = parse_eviction_policy(policy);
    o.ttl_seconds = ttl_seconds;
    return o;
  }

  // The slot `key` maps to in `map` (resident_ or pending_), or kNoSlot. The maps are this object's,
  // shown read-only, but a program can still reach them (gc.get_referents of a view, __self__ of the
  // lookup function) and store anything: an entry is used only when it names a slot in range that
  // holds this key in the matching state, else Error(kInternal) and nothing changes. Never runs
  // Python code.
  BlockId slot_in(const py::dict& map, PyObject* key) const {
    PyObject* v = value_in(map.ptr(), key);
    if (v == nullptr) return OffloadIndex::kNoSlot;
    long long slot = -1;
    if (!small_int(v, slot) && PyLong_CheckExact(v)) {  // slots from 2**30 up
      int overflow = 0;
      slot = PyLong_AsLongLongAndOverflow(v, &overflow);
      if (overflow != 0) slot = -1;
    }
    const SlotState want = &map == &resident_ ? SlotState::kResident : SlotState::kPending;
    if (slot < 0 || slot >= static_cast<long long>(slot_key_.size()) || !slot_key_[static_cast<std::size_t>(slot)] ||
        !same_bytes(slot_key_[static_cast<std::size_t>(slot)].ptr(), key) ||
        index_.state(static_cast<BlockId>(slot)) != want) {
      throw Error(ErrorCode::kInternal, "offload index: key " + key_hex(key) + " maps to " +
                                            std::string(py::repr(v)) + " in the " +
                                            (want == SlotState::kResident ? "resident" : "pending") +
                                            " map, which is not its slot: the maps were changed outside the index");
    }
    return static_cast<BlockId>(slot);
  }

  // Fills scratch_ with the slots of the resident keys; a key that is not resident raises KeyError
  // (`strict`) or is skipped.
  void resident_slots(const py::handle& keys, bool strict, const char* before, const char* after) {
    const KeyItems items(keys);
    scratch_.clear();
    for (std::size_t i = 0; i < items.size(); ++i) {
      const BlockId s = slot_in(resident_, items[i]);
      if (s != OffloadIndex::kNoSlot) {
        scratch_.push_back(s);
      } else if (strict) {
        throw py::key_error(before + key_hex(items[i]) + after);
      }
    }
  }

  // ValueError when a key that is neither resident nor pending appears twice (nothing changed).
  void check_distinct(const KeyItems& items, std::size_t fresh) {
    if (fresh < 2) return;
    hashed_.clear();
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (call_[i] == OffloadIndex::kNoSlot) hashed_.emplace_back(PyObject_Hash(items[i]), items[i]);  // cached
    }
    std::sort(hashed_.begin(), hashed_.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (std::size_t i = 1; i < hashed_.size(); ++i) {
      PyObject* a = hashed_[i - 1].second;
      PyObject* b = hashed_[i].second;
      if (hashed_[i - 1].first == hashed_[i].first && PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b) &&
          std::memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), static_cast<std::size_t>(PyBytes_GET_SIZE(a))) == 0) {
        throw py::value_error("prepare_store: duplicate keys in one call (" + key_hex(a) + ")");
      }
    }
  }

  OffloadIndex index_;
  py::object slots_type_;              // None, or the class prepare_load / prepare_store wrap slots in
  py::object store_type_;              // None, or the class prepare_store answers with
  py::dict resident_;                  // key -> slot (int), committed chunks
  py::dict pending_;                   // key -> slot (int), stores in flight
  std::vector<py::object> slot_key_;   // the key a pending or resident slot holds
  std::vector<py::object> slot_value_; // each slot's number as an int object (the dicts' values), made up front
  std::vector<std::uint8_t> in_call_;  // per slot: collected by the call in progress (see InCall)
  py::object resident_view_;           // mappingproxy over resident_
  py::object pending_view_;            // mappingproxy over pending_
  bool busy_ = false;                  // a call is in progress (see Entered)
  std::vector<BlockId> call_;          // scratch, used with the GIL held
  std::vector<BlockId> scratch_;
  std::vector<BlockId> evicted_;
  std::vector<std::pair<Py_hash_t, PyObject*>> hashed_;
};

}  // namespace

void bind_offload(py::module_& m) {
  py::class_<BoundOffloadIndex>(m, "OffloadIndex")
      .def(py::init<std::int64_t, const std::string&, double, const py::object&, const py::object&>(),
           py::arg("num_slots"), py::arg("policy") = "lru", py::arg("ttl_seconds") = 300.0,
           py::arg("slots_type") = py::none(), py::arg("store_type") = py::none(),
           "slots_type: None, or a class whose instances (made by object.__new__, `block_ids` set to the slots) "
           "prepare_load returns and store outputs carry; store_type: None (prepare_store returns a tuple), or "
           "a class whose instances prepare_store returns with keys_to_store, store_spec and evicted_keys set.")
      .def_property_readonly("resident", &BoundOffloadIndex::resident,
                             "Committed chunks: a read-only mapping key -> slot (live).")
      .def_property_readonly("pending", &BoundOffloadIndex::pending,
                             "Stores in flight: a read-only mapping key -> slot (live).")
      .def_property_readonly("num_slots", &BoundOffloadIndex::num_slots)
      .def("prepare_load", &BoundOffloadIndex::prepare_load, py::arg("keys"),
           "Pins resident keys (and their chains) for a load; returns their slots (int32), in key order "
           "(as a slots_type instance when set).")
      .def("complete_load", &BoundOffloadIndex::complete_load, py::arg("keys"),
           "Releases a prepare_load of the same keys (any order).")
      .def("touch", &BoundOffloadIndex::touch, py::arg("keys"), "Marks the resident keys among `keys` used.")
      .def("prepare_store", &BoundOffloadIndex::prepare_store, py::arg("keys"), py::arg("prev") = py::none(),
           "Reserves slots for the keys neither resident nor pending, each chained after the key before it "
           "(the first after `prev`), evicting as needed: (keys_to_store, slots int32, evicted_keys) (as a store_type "
           "instance when set), or None when there is no room.")
      .def("complete_store", &BoundOffloadIndex::complete_store, py::arg("keys"), py::arg("success") = true,
           "Commits (or, success=False, frees) the pending keys among `keys`; returns the keys committed.")
      .def("lookup_function", &BoundOffloadIndex::lookup_function, py::arg("hit"), py::arg("hit_pending"),
           py::arg("miss"),
           "A builtin lookup(key, req_context=None) over the key maps: `hit` for a resident key, `hit_pending` "
           "for a pending one, else `miss` (no Python frame per call).")
      .def("reset", &BoundOffloadIndex::reset)
      .def("stats", &BoundOffloadIndex::stats)
      .def("check_invariants", &BoundOffloadIndex::check_invariants)
      .def_static("slot_digest", [](std::int64_t slot) {
             const BlockHash d = OffloadIndex::slot_digest(static_cast<BlockId>(checked_count(slot, "slot", true)));
             return py::bytes(reinterpret_cast<const char*>(d.bytes.data()), d.bytes.size());
           }, py::arg("slot"), "The trie digest naming a slot (8-byte little-endian number, then a fixed tag).");
}

}  // namespace sagellm::kv::bindings
