// Private, for tests: named points where PrefixCache::insert (and the event queue) can fail, and a
// hook a test installs to make one of them throw. Production code never installs a hook; a point
// then costs one atomic load.
//
// Sites: "clock" (reading the TTL clock), "reserve" (growing the node table, index, heaps, block
// map), "event" (building the stored event), "prepared" (after all of them, before the cache takes
// its references), "emit" (queueing any event; a throw there drops the event and counts it).
#pragma once

namespace sagellm::kv::detail {

using PrefixFaultHook = void (*)(const char* site);

/// Installs `hook` (nullptr removes it). Thread-safe; tests only.
void set_prefix_fault_hook(PrefixFaultHook hook) noexcept;

/// Calls the installed hook, if any, with `site`; the hook may throw.
void prefix_fault_point(const char* site);

}  // namespace sagellm::kv::detail
