// One translator: every sagellm::kv::Error becomes the matching KV*Error of the package, built by
// sagellm_kv_cache.errors._from_core_error(code, message).
#include <string>

#include "bindings.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv::bindings {

void bind_errors(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::object factory = py::module_::import("sagellm_kv_cache.errors").attr("_from_core_error");
      py::object exc = factory(static_cast<int>(e.code()), e.what());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });
  m.def("error_code_name", [](int code) { return std::string(error_code_name(static_cast<ErrorCode>(code))); });
  m.def("_raise_core_error", [](int code, const std::string& message) {
    throw Error(static_cast<ErrorCode>(code), message);
  }, "Test hook: raises a core error so the translation can be checked from Python.");
}

}  // namespace sagellm::kv::bindings
