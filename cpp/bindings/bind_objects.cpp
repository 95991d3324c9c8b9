// Building Python objects whose every field is already known valid, without running Python code:
// the seed KVPool makes one handle (a pydantic model with a random UUID) per request, and doing
// that field by field in Python costs more than the allocation it records.
#include <pthread.h>

#include <cstdint>
#include <mutex>
#include <random>
#include <string>

#include "bindings.hpp"

namespace sagellm::kv::bindings {
namespace {

// One generator for the process, used with the GIL held; re-seeded in a forked child so parent and
// child never draw the same ids.
std::mt19937_64& uuid_rng() {
  static std::mt19937_64 rng = [] {
    std::random_device device;
    std::seed_seq seq{device(), device(), device(), device(), device(), device(), device(), device()};
    return std::mt19937_64(seq);
  }();
  return rng;
}

void reseed_after_fork() {
  std::random_device device;
  std::seed_seq seq{device(), device(), device(), device(), device(), device(), device(), device()};
  uuid_rng().seed(seq);
}

}  // namespace

// Sets an attribute as object.__setattr__ would (no class-level __setattr__ runs). `name` is an
// interned string made once per attribute.
void set_generic(PyObject* obj, PyObject* name, PyObject* value) {
  if (PyObject_GenericSetAttr(obj, name, value) != 0) throw py::error_already_set();
}

PyObject* interned(const char* text) {
  PyObject* s = PyUnicode_InternFromString(text);  // immortal for our purposes: kept for the process
  if (s == nullptr) throw py::error_already_set();
  return s;
}

void check_plain_class(PyObject* cls, const char* what) {
  if (!PyType_Check(cls) || reinterpret_cast<PyTypeObject*>(cls)->tp_new != PyBaseObject_Type.tp_new) {
    throw py::type_error(std::string(what) + " must be a class made by object.__new__ (no __new__ of its own), got " +
                         std::string(py::repr(cls)));
  }
}

py::object new_bare(PyObject* cls) {
  auto* type = reinterpret_cast<PyTypeObject*>(cls);
  static PyObject* const no_args = PyTuple_New(0);  // kept for the process
  PyObject* obj = PyBaseObject_Type.tp_new(type, no_args, nullptr);  // object.__new__(cls)
  if (obj == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

py::object new_uuid4(PyObject* uuid_cls, PyObject* is_safe, py::object* int_out) {
  // A version-4, RFC 4122 variant UUID, as uuid.uuid4() lays it out, from the process's generator
  // (a Mersenne Twister seeded from the OS): not for secrets.
  std::mt19937_64& rng = uuid_rng();
  std::uint64_t hi = rng();
  std::uint64_t lo = rng();
  hi = (hi & ~std::uint64_t{0xF000}) | std::uint64_t{0x4000};              // version 4
  lo = (lo & ~(std::uint64_t{0xC} << 60)) | (std::uint64_t{0x8} << 60);  // variant 10
  const unsigned char bytes[16] = {
      static_cast<unsigned char>(lo), static_cast<unsigned char>(lo >> 8),
      static_cast<unsigned char>(lo >> 16), static_cast<unsigned char>(lo >> 24),
      static_cast<unsigned char>(lo >> 32), static_cast<unsigned char>(lo >> 40),
      static_cast<unsigned char>(lo >> 48), static_cast<unsigned char>(lo >> 56),
      static_cast<unsigned char>(hi), static_cast<unsigned char>(hi >> 8),
      static_cast<unsigned char>(hi >> 16), static_cast<unsigned char>(hi >> 24),
      static_cast<unsigned char>(hi >> 32), static_cast<unsigned char>(hi >> 40),
      static_cast<unsigned char>(hi >> 48), static_cast<unsigned char>(hi >> 56)};
  auto value = py::reinterpret_steal<py::object>(_PyLong_FromByteArray(bytes, 16, 1, 0));
  if (!value) throw py::error_already_set();
  static PyObject* const int_name = interned("int");
  static PyObject* const safe_name = interned("is_safe");
  py::object out = new_bare(uuid_cls);
  set_generic(out.ptr(), int_name, value.ptr());
  set_generic(out.ptr(), safe_name, is_safe);
  if (int_out != nullptr) *int_out = std::move(value);
  return out;
}

py::object trusted_model(PyObject* cls, PyObject* defaults, std::span<PyObject* const> names,
                         std::span<PyObject* const> values, PyObject* fields_set, PyObject* private_attrs) {
  // What pydantic's model_construct leaves behind, for values the caller has validated:
  // __dict__ = defaults updated with names -> values, a copy of fields_set, no extras.
  if (names.size() != values.size()) {
    throw py::value_error("names and values differ in length: " + std::to_string(names.size()) + " and " +
                          std::to_string(values.size()));
  }
  auto fields = py::reinterpret_steal<py::dict>(PyDict_Copy(defaults));
  if (!fields) throw py::error_already_set();
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (PyDict_SetItem(fields.ptr(), names[i], values[i]) != 0) throw py::error_already_set();
  }
  auto set_copy = py::reinterpret_steal<py::object>(PySet_New(fields_set));
  if (!set_copy) throw py::error_already_set();
  static PyObject* const dict_name = interned("__dict__");
  static PyObject* const set_name = interned("__pydantic_fields_set__");
  static PyObject* const extra_name = interned("__pydantic_extra__");
  static PyObject* const private_name = interned("__pydantic_private__");
  py::object out = new_bare(cls);
  set_generic(out.ptr(), dict_name, fields.ptr());
  set_generic(out.ptr(), set_name, set_copy.ptr());
  set_generic(out.ptr(), extra_name, Py_None);
  set_generic(out.ptr(), private_name, private_attrs);
  return out;
}

// [cls(block_id=i) for i in ids] for the seed's KVBlockRef (a frozen dataclass with slots), without
// running its __init__ per block: all that __init__ does is object.__setattr__(self, "block_id", i),
// done here through the slot's descriptor, found once. The sageLLM engine reads a handle's blocks
// (KVHandle._blocks) to build every block table; made in Python they cost ~270 ns each.
py::list block_refs(PyObject* cls, const BlockIds& ids) {
  static PyObject* const name = interned("block_id");
  // The class's own data descriptor for the attribute (a slot), held for the loop; without one the
  // attribute goes where object.__setattr__ would put it.
  auto descr = py::reinterpret_borrow<py::object>(_PyType_Lookup(reinterpret_cast<PyTypeObject*>(cls), name));
  const descrsetfunc set = descr ? Py_TYPE(descr.ptr())->tp_descr_set : nullptr;
  const std::span<const BlockId> span = ids.span();
  py::list out(span.size());
  for (std::size_t i = 0; i < span.size(); ++i) {
    py::object ref = new_bare(cls);
    auto value = py::reinterpret_steal<py::object>(PyLong_FromLong(span[i]));
    if (!value) throw py::error_already_set();
    if (set != nullptr) {
      if (set(descr.ptr(), ref.ptr(), value.ptr()) != 0) throw py::error_already_set();
    } else {
      set_generic(ref.ptr(), name, value.ptr());
    }
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), ref.release().ptr());
  }
  return out;
}

void bind_objects(py::module_& m) {
  static std::once_flag at_fork;
  std::call_once(at_fork, [] { (void)pthread_atfork(nullptr, nullptr, reseed_after_fork); });

  m.def("uuid4", [](const py::type& uuid_cls, const py::object& is_safe) {
          check_plain_class(uuid_cls.ptr(), "uuid_cls");
          return new_uuid4(uuid_cls.ptr(), is_safe.ptr(), nullptr);
        },
        py::arg("uuid_cls"), py::arg("is_safe"),
        "A random version-4 UUID of class `uuid_cls` (uuid.UUID), built without running its __init__.");

  m.def("trusted_model", [](const py::type& cls, const py::dict& defaults, const py::tuple& names,
                            const py::tuple& values, const py::set& fields_set, const py::dict& private_attrs) {
          check_plain_class(cls.ptr(), "cls");
          auto items = [](const py::tuple& t) {
            return std::span<PyObject* const>(&PyTuple_GET_ITEM(t.ptr(), 0), static_cast<std::size_t>(t.size()));
          };
          return trusted_model(cls.ptr(), defaults.ptr(), items(names), items(values), fields_set.ptr(),
                               private_attrs.ptr());
        },
        py::arg("cls"), py::arg("defaults"), py::arg("names"), py::arg("values"), py::arg("fields_set"),
        py::arg("private_attrs"),
        "An instance of the pydantic model `cls` built without validation (see the seed KVPool).");

  m.def("block_refs", [](const py::type& cls, const py::handle& ids) {
          check_plain_class(cls.ptr(), "cls");
          const BlockIds given(ids, "ids");  // a copy: a finaliser run by the loop cannot change it
          return block_refs(cls.ptr(), given);
        },
        py::arg("cls"), py::arg("ids"),
        "[cls(block_id=i) for i in ids], each built as object.__new__(cls) with its block_id set as "
        "object.__setattr__ would (no __init__ runs): the seed KVHandle's blocks.");
}

}  // namespace sagellm::kv::bindings
