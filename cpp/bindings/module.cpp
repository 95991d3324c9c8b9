// sagellm_kv_cache._core: the private binding module. Public Python API lives in the package.
#include "bindings.hpp"
#include "sagellm_kv/version.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "Private C++ core of sagellm_kv_cache; use the public package instead.";
  m.attr("__version__") = SAGELLM_KV_VERSION;
  sagellm::kv::bindings::bind_errors(m);
  sagellm::kv::bindings::bind_pool(m);
  sagellm::kv::bindings::bind_prefix(m);
  sagellm::kv::bindings::bind_manager(m);
  sagellm::kv::bindings::bind_tier(m);
  sagellm::kv::bindings::bind_objects(m);
  sagellm::kv::bindings::bind_offload(m);
  sagellm::kv::bindings::bind_seed_pool(m);
}
