// Private: factories of the built-in backends, one per folder under src/device/.
#pragma once

#include <memory>

#include "sagellm_kv/device.hpp"

namespace sagellm::kv::detail {

std::shared_ptr<DeviceAllocator> make_cpu_allocator(const DeviceId& id);
std::shared_ptr<DeviceAllocator> make_cuda_allocator(const DeviceId& id);

}  // namespace sagellm::kv::detail
