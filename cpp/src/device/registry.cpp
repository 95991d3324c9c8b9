// Device string parsing, the Allocation handle, and the backend registry.
#include <algorithm>
#include <charconv>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "device/backends.hpp"
#include "sagellm_kv/device.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv {

std::string DeviceId::str() const {
  return type == "cpu" && index == 0 ? type : type + ":" + std::to_string(index);
}

DeviceId DeviceId::parse(std::string_view text) {
  const auto bad = [&](const char* why) {
    return Error(ErrorCode::kUnknownDevice,
                 "invalid device string '" + std::string(text) + "': " + why);
  };
  const auto colon = text.find(':');
  DeviceId id;
  id.type = std::string(text.substr(0, colon));
  if (id.type.empty()) throw bad("empty device type");
  if (!std::all_of(id.type.begin(), id.type.end(),
                   [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; })) {
    throw bad("device type must be lower-case letters, digits or '_'");
  }
  if (colon != std::string_view::npos) {
    const std::string_view digits = text.substr(colon + 1);
    const auto* end = digits.data() + digits.size();
    const auto [ptr, ec] = std::from_chars(digits.data(), end, id.index);
    if (digits.empty() || ec != std::errc() || ptr != end || id.index < 0) {
      throw bad("device index must be a non-negative integer");
    }
    if (digits.size() > 1 && digits.front() == '0') {  // "cuda:01" is not a spelling of "cuda:1" (nor in torch)
      throw bad("device index must not have leading zeros");
    }
  }
  return id;
}

Allocation::Allocation(void* data, std::size_t size, MemoryKind kind,
                       std::shared_ptr<DeviceAllocator> owner)
    : data_(data), size_(size), kind_(kind), owner_(std::move(owner)) {}

Allocation::Allocation(Allocation&& other) noexcept
    : data_(other.data_), size_(other.size_), kind_(other.kind_), owner_(std::move(other.owner_)) {
  other.data_ = nullptr;
  other.size_ = 0;
}

Allocation& Allocation::operator=(Allocation&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = other.data_;
    size_ = other.size_;
    kind_ = other.kind_;
    owner_ = std::move(other.owner_);
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

Allocation::~Allocation() { reset(); }

void Allocation::reset() noexcept {
  if (data_ != nullptr && owner_) owner_->do_deallocate(data_, size_, kind_);
  data_ = nullptr;
  size_ = 0;
  owner_.reset();
}

Allocation DeviceAllocator::allocate(const AllocationRequest& request) {
  if (request.size == 0) {
    throw Error(ErrorCode::kInvalidArgument, "allocation size must be > 0 on " + device().str());
  }
  if (request.alignment == 0 || (request.alignment & (request.alignment - 1)) != 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "alignment must be a power of two, got " + std::to_string(request.alignment));
  }
  void* data = do_allocate(request);
  return Allocation(data, request.size, request.kind, shared_from_this());
}

void DeviceAllocator::copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
                              std::size_t row_bytes, std::size_t rows, CopyKind kind) {
  auto* d = static_cast<std::byte*>(dst);
  const auto* s = static_cast<const std::byte*>(src);
  for (std::size_t r = 0; r < rows; ++r) copy(d + r * dst_pitch, s + r * src_pitch, row_bytes, kind);
}

namespace {

struct Backend {
  BackendFactory factory;
  std::uint64_t version = 0;  // bumped by each register_backend, so a replaced factory is noticed
};

// The mutex guards the two maps only; factories run outside it (see allocator_for).
struct Registry {
  std::mutex mutex;
  std::uint64_t next_version = 1;
  std::map<std::string, Backend> backends;
  std::map<std::string, std::shared_ptr<DeviceAllocator>> allocators;  // keyed by DeviceId::str()
};

Registry& registry() {
  static Registry* instance = [] {
    auto* r = new Registry();  // leaked on purpose: allocators may outlive static destruction
    r->backends["cpu"] = Backend{detail::make_cpu_allocator, r->next_version++};
    r->backends["cuda"] = Backend{detail::make_cuda_allocator, r->next_version++};
    return r;
  }();
  return *instance;
}

std::string join_names(const std::map<std::string, Backend>& backends) {
  std::string out;
  for (const auto& [name, _] : backends) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

// The devices whose factory is running on this thread: a factory that asks for its own device
// would otherwise recurse until the stack overflows.
thread_local std::vector<std::string> t_making;

class MakingGuard {
 public:
  explicit MakingGuard(const std::string& key) { t_making.push_back(key); }
  ~MakingGuard() { t_making.pop_back(); }
  MakingGuard(const MakingGuard&) = delete;
  MakingGuard& operator=(const MakingGuard&) = delete;
};

}  // namespace

void register_backend(const std::string& type, BackendFactory factory) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  r.backends[type] = Backend{std::move(factory), r.next_version++};
  // Drop the cached allocators of exactly this type: "cuda" and "cuda:N", never "cudax" or "cpu"
  // for "c".
  std::erase_if(r.allocators, [&](const auto& kv) {
    const std::string& key = kv.first;
    return key == type || (key.size() > type.size() && key.compare(0, type.size(), type) == 0 && key[type.size()] == ':');
  });
}

std::vector<std::string> registered_backends() {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  std::vector<std::string> names;
  for (const auto& [name, _] : r.backends) names.push_back(name);
  return names;
}

std::shared_ptr<DeviceAllocator> allocator_for(std::string_view device) {
  const DeviceId id = DeviceId::parse(device);
  const std::string key = id.str();
  if (std::find(t_making.begin(), t_making.end(), key) != t_making.end()) {
    throw Error(ErrorCode::kInvalidArgument,
                "the backend factory for '" + key + "' asked for '" + key + "' itself");
  }
  Registry& r = registry();
  // Double-checked insert: look up and copy the factory under the lock, call it without the lock
  // (it may load a library for seconds, or ask for another device), then insert under the lock
  // unless another thread got there first (its allocator wins, ours is dropped) or the factory was
  // replaced meanwhile (then try again with the new one, so no stale allocator is cached). A
  // factory that throws has registered nothing.
  for (;;) {
    Backend backend;
    {
      std::lock_guard lock(r.mutex);
      const auto found = r.backends.find(id.type);
      if (found == r.backends.end()) {
        throw Error(ErrorCode::kUnknownDevice, "unknown device '" + std::string(device) +
                                                   "'; known device types: " +
                                                   join_names(r.backends));
      }
      if (const auto cached = r.allocators.find(key); cached != r.allocators.end()) return cached->second;
      backend = found->second;
    }
    std::shared_ptr<DeviceAllocator> made;
    {
      const MakingGuard making(key);
      made = backend.factory(id);
    }
    std::lock_guard lock(r.mutex);
    if (const auto cached = r.allocators.find(key); cached != r.allocators.end()) return cached->second;
    const auto current = r.backends.find(id.type);
    if (current == r.backends.end() || current->second.version != backend.version) continue;
    r.allocators.emplace(key, made);
    return made;
  }
}

}  // namespace sagellm::kv
