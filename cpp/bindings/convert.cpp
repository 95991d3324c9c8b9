// Argument converters shared by the bindings: Python objects in, spans of the core's types out.
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

BlockIds::BlockIds(const py::handle& obj, const char* what) {
  // Hot path: a C-contiguous 1-D int32 array (what allocate() returns) is borrowed as is.
  if (py::array_t<std::int32_t, py::array::c_style>::check_(obj)) {
    auto arr = py::reinterpret_borrow<py::array_t<std::int32_t>>(obj);
    if (arr.ndim() == 1) {
      owner_ = std::move(arr);
      data_ = owner_.data();
      size_ = static_cast<std::size_t>(owner_.shape(0));
      return;
    }
  }
  py::array arr = as_array(obj, what, "a sequence of integers");
  const char kind = arr.dtype().kind();
  if (arr.size() == 0) {
    owner_ = py::array_t<std::int32_t>(0);
    data_ = owner_.data();
    return;
  }
  if (kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(what) + " must hold integers, got dtype " +
                         std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(what) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
  }
  if (arr.dtype().is(py::dtype::of<std::int32_t>()) && (arr.flags() & py::array::c_style) != 0) {
    owner_ = py::reinterpret_borrow<py::array_t<std::int32_t>>(arr);
  } else {
    // Range-check before narrowing: an id beyond int32 must not wrap into a valid one.
    auto wide = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
    if (!wide) throw py::type_error(std::string(what) + " could not be read as integers");
    const auto* src = wide.data();
    owner_ = py::array_t<std::int32_t>(wide.size());
    auto* dst = owner_.mutable_data();
    for (py::ssize_t i = 0; i < wide.size(); ++i) {
      if (src[i] < INT32_MIN || src[i] > INT32_MAX) {
        throw py::value_error(std::string(what) + ": id " + std::to_string(src[i]) + " at position " +
                              std::to_string(i) + " is out of the int32 range");
      }
      dst[i] = static_cast<std::int32_t>(src[i]);
    }
  }
  data_ = owner_.data();
  size_ = static_cast<std::size_t>(owner_.size());
}

std::uint32_t checked_count(std::int64_t n, const char* what, bool allow_zero) {
  if (n < 0 || (n == 0 && !allow_zero) || n > static_cast<std::int64_t>(BlockAllocator::kMaxBlocks)) {
    throw py::value_error(std::string(what) + " must be " + (allow_zero ? "in [0, " : "in [1, ") +
                          std::to_string(BlockAllocator::kMaxBlocks) + "], got " + std::to_string(n));
  }
  return static_cast<std::uint32_t>(n);
}

}  // namespace sagellm::kv::bindings
