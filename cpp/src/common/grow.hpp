// Private: geometric capacity growth for containers that are reserved before every insert.
#pragma once

#include <algorithm>
#include <cstddef>

namespace sagellm::kv::detail {

/// Makes room for `n` elements in `c` (a vector, or an unordered container), at least doubling the
/// capacity when it grows. Reserving "size() + k" exactly before each insert, as exception-safe
/// code does so that the insert itself cannot fail, would otherwise reallocate (and copy or rehash)
/// the whole container on every call.
template <class Vector>
void grow_to(Vector& c, std::size_t n) {
  if (c.capacity() < n) c.reserve(std::max(n, 2 * c.capacity()));
}

/// As grow_to, for unordered containers (bucket-based, no capacity()).
template <class Unordered>
void grow_buckets_to(Unordered& c, std::size_t n) {
  const auto room = static_cast<std::size_t>(static_cast<double>(c.bucket_count()) * c.max_load_factor());
  if (room < n) c.reserve(std::max(n, 2 * room));
}

}  // namespace sagellm::kv::detail
