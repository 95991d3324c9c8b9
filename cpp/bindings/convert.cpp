// Argument converters shared by the bindings: Python objects in, spans of the core's types out.
#include <bit>
#include <cstring>
#include <string>

#include "bindings.hpp"

namespace sagellm::kv::bindings {

py::array as_array(const py::handle& obj, const char* what, const char* expected) {
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  py::array arr;
  try {
    arr = py::array::ensure(obj);
  } catch (const py::error_already_set&) {
    arr = py::array();
  }
  if (!arr) {
    throw py::type_error(std::string(what) + " must be " + expected + ", got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  return arr;
}

bool is_native_int(const py::dtype& dt, py::ssize_t bytes) {
  if (dt.kind() != 'i' || dt.itemsize() != bytes) return false;
  const char order = dt.byteorder();
  constexpr char kNative = std::endian::native == std::endian::little ? '<' : '>';
  return order == '=' || order == '|' || order == kNative;
}

BlockId* BlockIds::reserve(std::size_t n) {
  size_ = n;
  if (n <= kInline) {
    data_ = inline_.data();
  } else {
    heap_.resize(n);
    data_ = heap_.data();
  }
  return data_;
}

bool BlockIds::read_int_sequence(PyObject* seq) {
  // No Python code runs in this loop (exact ints only), so the size cannot change under it.
  const bool list = PyList_Check(seq);
  const Py_ssize_t n = list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq);
  BlockId* dst = reserve(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i);
    if (!PyLong_CheckExact(item)) return false;  // bool, numpy scalars, ...: the general path
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0 || v < INT32_MIN || v > INT32_MAX) return false;
    dst[i] = static_cast<BlockId>(v);
  }
  return true;
}

BlockIds::BlockIds(const py::handle& obj, const char* what) {
  // Hot path: a C-contiguous 1-D native int32 array (what allocate() returns): one memcpy.
  if (py::isinstance<py::array>(obj)) {
    const auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() == 1 && is_native_int(arr.dtype(), 4) && (arr.flags() & py::array::c_style) != 0) {
      const auto n = static_cast<std::size_t>(arr.shape(0));
      if (n != 0) std::memcpy(reserve(n), arr.data(), n * sizeof(BlockId));
      else reserve(0);
      return;
    }
  }
  if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
    if (read_int_sequence(obj.ptr())) return;
  }
  py::array arr = as_array(obj, what, "a sequence of integers");
  if (arr.size() == 0) {
    reserve(0);
    return;
  }
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(what) + " must hold integers, got dtype " +
                         std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(what) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
  }
  // Range-check before narrowing: an id beyond int32 must not wrap into a valid one. uint64 ids
  // above int64 are refused as such rather than wrapped by the cast.
  if (kind == 'u' && arr.dtype().itemsize() == 8) {
    auto u = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
    if (!u) throw py::type_error(std::string(what) + " could not be read as integers");
    const auto* src = u.data();
    for (py::ssize_t i = 0; i < u.size(); ++i) {
      if (src[i] > static_cast<std::uint64_t>(INT32_MAX)) {
        throw py::value_error(std::string(what) + ": id " + std::to_string(src[i]) + " at position " +
                              std::to_string(i) + " is out of the int32 range");
      }
    }
  }
  auto wide = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  if (!wide) throw py::type_error(std::string(what) + " could not be read as integers");
  const auto* src = wide.data();
  BlockId* dst = reserve(static_cast<std::size_t>(wide.size()));
  for (py::ssize_t i = 0; i < wide.size(); ++i) {
    if (src[i] < INT32_MIN || src[i] > INT32_MAX) {
      throw py::value_error(std::string(what) + ": id " + std::to_string(src[i]) + " at position " +
                            std::to_string(i) + " is out of the int32 range");
    }
    dst[i] = static_cast<std::int32_t>(src[i]);
  }
}

ResizeGuard::ResizeGuard(const py::handle& obj) {
  PyObject* cur = obj.ptr();
  for (int depth = 0; cur != nullptr && depth < 64; ++depth) {  // base chains are short; a bound for safety
    if (PyMemoryView_Check(cur)) {
      cur = PyMemoryView_GET_BUFFER(cur)->obj;
      continue;
    }
    if (!py::isinstance<py::array>(cur)) break;
    PyObject* ref = PyWeakref_NewRef(cur, nullptr);
    if (ref == nullptr) throw py::error_already_set();
    refs_.push_back(py::reinterpret_steal<py::object>(ref));
    cur = py::detail::array_proxy(cur)->base;
  }
}

std::optional<std::string> optional_key(const py::handle& obj, const char* what) {
  PyObject* p = obj.ptr();
  if (p == Py_None) return std::nullopt;
  if (PyBytes_Check(p)) return std::string(PyBytes_AS_STRING(p), static_cast<std::size_t>(PyBytes_GET_SIZE(p)));
  if (PyByteArray_Check(p)) {
    return std::string(PyByteArray_AS_STRING(p), static_cast<std::size_t>(PyByteArray_GET_SIZE(p)));
  }
  if (PyUnicode_Check(p)) {
    Py_ssize_t n = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(p, &n);
    if (utf8 == nullptr) {
      PyErr_Clear();
      throw py::value_error(std::string(what) + " must be encodable as UTF-8, got " +
                            std::string(py::repr(obj)));
    }
    return std::string(utf8, static_cast<std::size_t>(n));
  }
  throw py::type_error(std::string(what) + " must be bytes, str or None, got " + Py_TYPE(p)->tp_name);
}

std::uint32_t checked_count(std::int64_t n, const char* what, bool allow_zero) {
  if (n < 0 || (n == 0 && !allow_zero) || n > static_cast<std::int64_t>(BlockAllocator::kMaxBlocks)) {
    throw py::value_error(std::string(what) + " must be " + (allow_zero ? "in [0, " : "in [1, ") +
                          std::to_string(BlockAllocator::kMaxBlocks) + "], got " + std::to_string(n));
  }
  return static_cast<std::uint32_t>(n);
}

}  // namespace sagellm::kv::bindings
