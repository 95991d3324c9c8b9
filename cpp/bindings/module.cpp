// sagellm_kv_cache._core: the private binding module. Public Python API lives in the package.
#include "bindings.hpp"
#include "sagellm_kv/version.hpp"

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
}
