// sagellm_kv_cache._core: the private binding module. Public Python API lives in the package.
#include <array>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>

#include "bindings.hpp"
#include "sagellm_kv/version.hpp"

namespace {

namespace py = pybind11;

// pybind11 gives a bound class the default object.__new__ path: `Class.__new__(Class)` returns an
// instance whose C++ value was never constructed, and the first method called on it has pybind11
// allocate raw storage (through type_info::operator_new) and run the method on it: garbage reads,
// or a crash (PrefixCache.__len__). That lazy allocation is only ever reached for such an instance
// (every __init__ here is a factory or a plain constructor, which set the value themselves), so
// each class's hook refuses instead, naming the class. A method that takes the instance's holder
// (a shared_ptr) fails earlier, in pybind11's holder cast, with a bare RuntimeError; that one is
// retold as the same TypeError.
constexpr std::size_t kMaxGuardedClasses = 16;
std::array<std::string, kMaxGuardedClasses> g_unconstructed_messages;

template <std::size_t I>
void* refuse_unconstructed(std::size_t /*size*/) {
  throw py::type_error(g_unconstructed_messages[I]);
}

template <std::size_t... I>
constexpr std::array<void* (*)(std::size_t), sizeof...(I)> refusers(std::index_sequence<I...> /*unused*/) {
  return {&refuse_unconstructed<I>...};
}

void guard_unconstructed_instances(const py::module_& m) {
  static constexpr auto kRefusers = refusers(std::make_index_sequence<kMaxGuardedClasses>{});
  std::size_t next = 0;
  for (const auto& item : m.attr("__dict__").cast<py::dict>()) {
    if (!PyType_Check(item.second.ptr())) continue;
    auto* type = reinterpret_cast<PyTypeObject*>(item.second.ptr());
    py::detail::type_info* info = py::detail::get_type_info(type);
    if (info == nullptr || info->type != type) continue;  // not a class bound here (an error class)
    if (next == kMaxGuardedClasses) py::pybind11_fail("_core: raise kMaxGuardedClasses");
    const auto name = item.first.cast<std::string>();
    g_unconstructed_messages[next] = name + " object was made without running __init__ (" + name +
                                     ".__new__ alone); create it by calling " + name + "(...)";
    info->operator_new = kRefusers[next++];
  }
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const py::cast_error& e) {
      if (std::string_view(e.what()).starts_with("Unable to cast from non-held to held instance")) {
        PyErr_SetString(PyExc_TypeError,
                        "this _core object was made without running __init__ (its class's __new__ alone); "
                        "create it by calling its class");
        return;
      }
      throw;
    }
  });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Private C++ core of sagellm_kv_cache; use the public package instead.";
  m.attr("__version__") = SAGELLM_KV_VERSION;
  // pybind11 looks numpy's C API up on first use, running Python code (numpy's version check) inside
  // a once-only initialiser. Lazily, that first use is some later call, and a signal handler, trace
  // hook or finaliser run by that Python code which calls back into this module would wait on the
  // initialiser its own thread is running: a hang. Done here, while nothing can call the module yet.
  (void)pybind11::detail::npy_api::get();
  sagellm::kv::bindings::bind_errors(m);
  sagellm::kv::bindings::bind_pool(m);
  sagellm::kv::bindings::bind_prefix(m);
  sagellm::kv::bindings::bind_manager(m);
  sagellm::kv::bindings::bind_tier(m);
  sagellm::kv::bindings::bind_objects(m);
  sagellm::kv::bindings::bind_offload(m);
  sagellm::kv::bindings::bind_seed_pool(m);
  guard_unconstructed_instances(m);
}
