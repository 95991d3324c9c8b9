// Token ids from what an engine holds (lists of Python ints, array.array, numpy, torch CPU tensors)
// into int32 without building a numpy array first. A list of 1,280 ints costs about as much as
// copying it; np.asarray on the same list costs ~30 us.
#include <bit>
#include <cstring>
#include <limits>
#include <string>

#include "bindings.hpp"

namespace sagellm::kv::bindings {
namespace {

constexpr long long kMin = std::numeric_limits<std::int32_t>::min();
constexpr long long kMax = std::numeric_limits<std::int32_t>::max();

std::string type_name_of(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

[[noreturn]] void out_of_range(const char* what, const std::string& value, std::size_t pos) {
  throw py::value_error(std::string(what) + ": token id " + value + " at position " + std::to_string(pos) +
                        " is outside the int32 range");
}

// Any other int-like item (numpy integer, big int): through __index__, which may run Python
// code, so the item is held while it does.
long long slow_int(PyObject* item, const char* what, std::size_t pos) {
  // A bool has __index__ but is no token id: [True] read as token 1.
  if (PyFloat_Check(item) || PyBool_Check(item) || !PyIndex_Check(item)) {
    throw py::type_error(std::string(what) + " must hold integers, got " + type_name_of(item) + " at position " +
                         std::to_string(pos));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(item));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) out_of_range(what, std::string(py::str(index)), pos);
  if (v == -1 && PyErr_Occurred() != nullptr) throw py::error_already_set();
  return v;
}

// The careful loop: the item is held while its __index__ runs, the size re-read every step.
void append_slow(PyObject* seq, bool is_list, Py_ssize_t start, std::vector<std::int32_t>& out, std::size_t base,
                 const char* what) {
  out.resize(base + static_cast<std::size_t>(start));
  for (Py_ssize_t i = start;; ++i) {
    const Py_ssize_t n = is_list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq);
    if (i >= n) break;
    py::object item = py::reinterpret_borrow<py::object>(is_list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i));
    long long v = 0;
    if (!small_int(item.ptr(), v)) v = slow_int(item.ptr(), what, static_cast<std::size_t>(i));
    if (v < kMin || v > kMax) out_of_range(what, std::to_string(v), static_cast<std::size_t>(i));
    out.push_back(static_cast<std::int32_t>(v));
  }
}

// `Feed`: digest each full block as soon as its last item is read (see BlockFeed).
template <bool Feed>
void append_sequence(PyObject* seq, bool is_list, std::vector<std::int32_t>& out, const char* what,
                     BlockFeed* feed) {
  const std::size_t base = out.size();
  const Py_ssize_t n = is_list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq);
  out.resize(base + static_cast<std::size_t>(n));
  PyObject** items = is_list ? reinterpret_cast<PyListObject*>(seq)->ob_item : reinterpret_cast<PyTupleObject*>(seq)->ob_item;
  std::int32_t* dst = out.data() + base;
  std::uint32_t left = 0;  // items until the current block is full
  if constexpr (Feed) {
    feed->digests->clear();
    feed->digests->reserve(static_cast<std::size_t>(n) / feed->block_size);
    left = feed->block_size;
  }
  constexpr Py_ssize_t kAhead = 64;  // the int objects are scattered: keep many misses in flight
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(items[i + kAhead]);
    long long v = 0;
    if (!small_int(items[i], v)) {
      // __index__ of an odd item may run Python code that changes the list: from here on, re-read
      // the list item by item (and let the caller hash).
      if constexpr (Feed) feed->digests->clear();
      return append_slow(seq, is_list, i, out, base, what);
    }
    if (v < kMin || v > kMax) out_of_range(what, std::to_string(v), static_cast<std::size_t>(i));
    dst[i] = static_cast<std::int32_t>(v);
    if constexpr (Feed) {
      if (--left == 0) {
        left = feed->block_size;
        feed->hasher->next_block(dst + i + 1 - feed->block_size, feed->digests->emplace_back());
      }
    }
  }
}

// Items of a buffer in the other byte order (numpy '>i4' on this little-endian build) are swapped
// as they are read: a token id is read by value whatever its byte order.
template <class T>
T load_item(const char* src, bool swapped) noexcept {
  T v;
  if (!swapped) {
    std::memcpy(&v, src, sizeof v);
  } else {
    unsigned char bytes[sizeof(T)];
    for (std::size_t b = 0; b < sizeof(T); ++b) bytes[b] = static_cast<unsigned char>(src[sizeof(T) - 1 - b]);
    std::memcpy(&v, bytes, sizeof v);
  }
  return v;
}

template <class T>
void copy_items(const Py_buffer& view, std::vector<std::int32_t>& out, const char* what, bool swapped) {
  const auto n = static_cast<std::size_t>(view.shape != nullptr ? view.shape[0] : view.len / view.itemsize);
  const Py_ssize_t stride = view.strides != nullptr ? view.strides[0] : view.itemsize;
  const auto* p = static_cast<const char*>(view.buf);
  const std::size_t base = out.size();
  out.resize(base + n);
  std::int32_t* dst = out.data() + base;
  for (std::size_t i = 0; i < n; ++i) {
    const T v = load_item<T>(p + static_cast<Py_ssize_t>(i) * stride, swapped);
    if constexpr (sizeof(T) >= sizeof(std::int32_t)) {
      if constexpr (std::numeric_limits<T>::is_signed) {
        if (static_cast<long long>(v) < kMin || static_cast<long long>(v) > kMax) {
          out.resize(base);
          out_of_range(what, std::to_string(v), i);
        }
      } else if (static_cast<unsigned long long>(v) > static_cast<unsigned long long>(kMax)) {
        out.resize(base);
        out_of_range(what, std::to_string(v), i);
      }
    }
    dst[i] = static_cast<std::int32_t>(v);
  }
}

// Returns false when `obj` does not export a buffer.
bool append_buffer(PyObject* obj, std::vector<std::int32_t>& out, const char* what) {
  if (PyObject_CheckBuffer(obj) == 0) return false;
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_RECORDS_RO) != 0) {
    PyErr_Clear();
    return false;
  }
  struct Release {
    Py_buffer* v;
    ~Release() { PyBuffer_Release(v); }
  } release{&view};
  if (view.ndim != 1) {
    throw py::value_error(std::string(what) + " must be 1-D, got " + std::to_string(view.ndim) + " dimensions");
  }
  const char* fmt = view.format != nullptr ? view.format : "B";
  constexpr bool kLittle = std::endian::native == std::endian::little;
  bool swapped = false;
  if (*fmt == '@' || *fmt == '=') {
    ++fmt;
  } else if (*fmt == '<' || *fmt == '>' || *fmt == '!') {
    swapped = (*fmt == '<') != kLittle;
    ++fmt;
  }
  const bool single = fmt[0] != '\0' && fmt[1] == '\0';
  const char code = single ? fmt[0] : '\0';
  const Py_ssize_t size = view.itemsize;
  switch (code) {
    case 'b': copy_items<signed char>(view, out, what, false); return true;
    case 'B': copy_items<unsigned char>(view, out, what, false); return true;
    case 'h': if (size != 2) break; copy_items<std::int16_t>(view, out, what, swapped); return true;
    case 'H': if (size != 2) break; copy_items<std::uint16_t>(view, out, what, swapped); return true;
    case 'i': case 'l': case 'q': case 'n':
      if (size == 4) copy_items<std::int32_t>(view, out, what, swapped);
      else if (size == 8) copy_items<std::int64_t>(view, out, what, swapped);
      else break;
      return true;
    case 'I': case 'L': case 'Q': case 'N':
      if (size == 4) copy_items<std::uint32_t>(view, out, what, swapped);
      else if (size == 8) copy_items<std::uint64_t>(view, out, what, swapped);
      else break;
      return true;
    default: break;
  }
  throw py::type_error(std::string(what) + " must hold integers, got a buffer of format '" +
                       (view.format != nullptr ? view.format : "B") + "'");
}

}  // namespace

void append_tokens(const py::handle& obj, std::vector<std::int32_t>& out, const char* what) {
  PyObject* p = obj.ptr();
  const std::size_t base = out.size();
  try {
    if (PyList_Check(p) || PyTuple_Check(p)) {
      append_sequence<false>(p, PyList_Check(p), out, what, nullptr);
      return;
    }
    // bytes and bytearray export a buffer of unsigned chars, but they are text or raw data, not token ids.
    if (PyUnicode_Check(p) || PyBytes_Check(p) || PyByteArray_Check(p) || PyLong_Check(p)) {
      throw py::type_error(std::string(what) + " must be a sequence of integers, got " + type_name_of(p));
    }
    if (append_buffer(p, out, what)) return;
    // torch tensors and other array-likes: numpy's view of them (no copy for CPU memory).
    py::object arr;
    try {
      arr = py::module_::import("numpy").attr("asarray")(obj);
    } catch (const py::error_already_set&) {
      arr = py::object();
    }
    if (!arr || (py::isinstance<py::array>(arr) && py::reinterpret_borrow<py::array>(arr).dtype().kind() == 'O')) {
      throw py::type_error(std::string(what) + " must be a sequence of integers, got " + type_name_of(p));
    }
    if (!append_buffer(arr.ptr(), out, what)) {
      throw py::type_error(std::string(what) + " must be a sequence of integers, got " + type_name_of(p));
    }
  } catch (...) {
    out.resize(base);
    throw;
  }
}

void append_tokens(const py::handle& obj, std::vector<std::int32_t>& out, const char* what, BlockFeed& feed) {
  PyObject* p = obj.ptr();
  feed.digests->clear();
  if (!PyList_Check(p) && !PyTuple_Check(p)) return append_tokens(obj, out, what);
  const std::size_t base = out.size();
  try {
    append_sequence<true>(p, PyList_Check(p), out, what, &feed);
  } catch (...) {
    out.resize(base);
    feed.digests->clear();
    throw;
  }
}

std::uint64_t request_id_value(PyObject* obj, const char* what) {
  long long small = 0;
  if (small_int(obj, small) && small >= 0) return static_cast<std::uint64_t>(small);
  // A bool has __index__ but names no request: finish(True) ended request 1.
  if (PyFloat_Check(obj) || PyBool_Check(obj) || !PyIndex_Check(obj)) {
    throw py::type_error(std::string(what) + " must be an int, got " + type_name_of(obj));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj));
  if (!index) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    throw py::value_error(std::string(what) + " must be in [0, 2**64), got " + std::string(py::str(index)));
  }
  return static_cast<std::uint64_t>(v);
}

}  // namespace sagellm::kv::bindings
