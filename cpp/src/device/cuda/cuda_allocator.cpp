// CUDA backend ("cuda:N"): device memory and pinned host memory through the CUDA runtime, loaded
// with dlopen at first use so the library has no link-time CUDA dependency and imports on machines
// without a GPU. Only the few runtime entry points below are used; their C signatures are stable.
//
// Every call that needs a device selects it through DeviceGuard, which restores the calling
// thread's previous current device afterwards: the library never changes a caller's CUDA state.
// Strided copies whose pitch exceeds the device's cudaDevAttrMaxPitch (2^31 - 1 on current GPUs;
// a 4 GiB layer plane exceeds it) fall back to one cudaMemcpy per row.
#include <dlfcn.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>

#include "device/backends.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv::detail {
namespace {

using cuda_error_t = int;  // cudaError_t is a C enum; 0 is cudaSuccess
constexpr cuda_error_t kCudaSuccess = 0;
// cudaMemcpyKind values of the runtime API.
constexpr int kMemcpyHostToHost = 0;
constexpr int kMemcpyHostToDevice = 1;
constexpr int kMemcpyDeviceToHost = 2;
constexpr int kMemcpyDeviceToDevice = 3;
// cudaDeviceAttr value of cudaDevAttrMaxPitch; the limit assumed when the query fails.
constexpr int kDevAttrMaxPitch = 11;
constexpr std::size_t kDefaultMaxPitch = 2147483647;

struct CudaRuntime {
  void* library = nullptr;
  std::string load_error;
  cuda_error_t (*get_device_count)(int*) = nullptr;
  cuda_error_t (*set_device)(int) = nullptr;
  cuda_error_t (*get_device)(int*) = nullptr;
  cuda_error_t (*device_get_attribute)(int*, int, int) = nullptr;
  cuda_error_t (*malloc)(void**, std::size_t) = nullptr;
  cuda_error_t (*free)(void*) = nullptr;
  cuda_error_t (*malloc_host)(void**, std::size_t) = nullptr;
  cuda_error_t (*free_host)(void*) = nullptr;
  cuda_error_t (*memcpy)(void*, const void*, std::size_t, int) = nullptr;
  cuda_error_t (*memcpy_2d)(void*, std::size_t, const void*, std::size_t, std::size_t, std::size_t, int) = nullptr;
  cuda_error_t (*memset)(void*, int, std::size_t) = nullptr;
  cuda_error_t (*device_synchronize)() = nullptr;
  const char* (*get_error_string)(cuda_error_t) = nullptr;

  [[nodiscard]] std::string describe(cuda_error_t err) const {
    return get_error_string != nullptr ? get_error_string(err) : "cuda error " + std::to_string(err);
  }
};

template <typename Fn>
bool bind(void* library, const char* name, Fn*& fn, std::string& error) {
  fn = reinterpret_cast<Fn*>(::dlsym(library, name));
  if (fn == nullptr) error = std::string("symbol ") + name + " missing from the CUDA runtime";
  return fn != nullptr;
}

const CudaRuntime& runtime() {
  static CudaRuntime rt;
  static std::once_flag once;
  std::call_once(once, [] {
    // SAGELLM_KV_CUDART names the runtime explicitly (e.g. the one inside a pip-installed CUDA);
    // otherwise the loader's search path decides, newest major version first.
    // An explicit path that does not load is an error naming it, not a silent fallback to another
    // runtime.
    if (const char* path = std::getenv("SAGELLM_KV_CUDART"); path != nullptr && *path != '\0') {
      rt.library = ::dlopen(path, RTLD_NOW | RTLD_LOCAL);
      if (rt.library == nullptr) {
        const char* why = ::dlerror();
        rt.load_error = std::string("SAGELLM_KV_CUDART=") + path + " could not be loaded: " +
                        (why != nullptr ? why : "unknown error");
        return;
      }
    }
    // A runtime the process already loaded (torch's, inside its pip-installed CUDA) comes first, so
    // that our pinned memory and torch's streams belong to one runtime even where a system toolkit
    // puts another libcudart.so on the loader's path.
    constexpr std::array<const char*, 4> kNames = {"libcudart.so", "libcudart.so.13", "libcudart.so.12",
                                                   "libcudart.so.11.0"};
    for (const int mode : {RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, RTLD_NOW | RTLD_LOCAL}) {
      for (const char* name : kNames) {
        if (rt.library == nullptr) rt.library = ::dlopen(name, mode);
      }
    }
    if (rt.library == nullptr) {
      const char* why = ::dlerror();
      rt.load_error = std::string("the CUDA runtime (libcudart.so) could not be loaded: ") +
                      (why != nullptr ? why : "not found");
      return;
    }
    std::string& e = rt.load_error;
    const bool ok = bind(rt.library, "cudaGetDeviceCount", rt.get_device_count, e) &&
                    bind(rt.library, "cudaSetDevice", rt.set_device, e) &&
                    bind(rt.library, "cudaGetDevice", rt.get_device, e) &&
                    bind(rt.library, "cudaDeviceGetAttribute", rt.device_get_attribute, e) &&
                    bind(rt.library, "cudaMalloc", rt.malloc, e) &&
                    bind(rt.library, "cudaFree", rt.free, e) &&
                    bind(rt.library, "cudaMallocHost", rt.malloc_host, e) &&
                    bind(rt.library, "cudaFreeHost", rt.free_host, e) &&
                    bind(rt.library, "cudaMemcpy", rt.memcpy, e) &&
                    bind(rt.library, "cudaMemcpy2D", rt.memcpy_2d, e) &&
                    bind(rt.library, "cudaMemset", rt.memset, e) &&
                    bind(rt.library, "cudaDeviceSynchronize", rt.device_synchronize, e) &&
                    bind(rt.library, "cudaGetErrorString", rt.get_error_string, e);
    if (!ok) {
      ::dlclose(rt.library);
      rt.library = nullptr;
    }
  });
  return rt;
}

int to_memcpy_kind(CopyKind kind) {
  switch (kind) {
    case CopyKind::kHostToHost: return kMemcpyHostToHost;
    case CopyKind::kHostToDevice: return kMemcpyHostToDevice;
    case CopyKind::kDeviceToHost: return kMemcpyDeviceToHost;
    case CopyKind::kDeviceToDevice: return kMemcpyDeviceToDevice;
  }
  return kMemcpyDeviceToDevice;
}

void check(const CudaRuntime& rt, cuda_error_t err, const char* what, const DeviceId& id) {
  if (err != kCudaSuccess) {
    throw Error(ErrorCode::kBackendUnavailable, std::string(what) + " failed on " + id.str() + ": " + rt.describe(err));
  }
}

// Makes `id` the calling thread's current device for the guard's lifetime, then restores the one
// that was current before (only when they differ: cudaSetDevice is not free).
class DeviceGuard {
 public:
  DeviceGuard(const CudaRuntime& rt, const DeviceId& id) : rt_(rt) {
    check(rt, rt.get_device(&previous_), "cudaGetDevice", id);
    if (previous_ != id.index) {
      check(rt, rt.set_device(id.index), "cudaSetDevice", id);
      restore_ = true;
    }
  }
  /// No-throw form for cleanup paths: selection errors are ignored (the call that follows fails).
  DeviceGuard(const CudaRuntime& rt, int device, std::nothrow_t) noexcept : rt_(rt) {
    if (rt.get_device(&previous_) == kCudaSuccess && previous_ != device) {
      restore_ = rt.set_device(device) == kCudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (restore_) (void)rt_.set_device(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  const CudaRuntime& rt_;
  int previous_ = 0;
  bool restore_ = false;
};

class CudaAllocator final : public DeviceAllocator {
 public:
  CudaAllocator(DeviceId id, const CudaRuntime& rt) : id_(std::move(id)), rt_(rt) {
    const DeviceGuard guard(rt_, id_);
    int pitch = 0;
    if (rt_.device_get_attribute(&pitch, kDevAttrMaxPitch, id_.index) == kCudaSuccess && pitch > 0) {
      max_pitch_ = static_cast<std::size_t>(pitch);
    }
  }

  const DeviceId& device() const noexcept override { return id_; }

  void copy(void* dst, const void* src, std::size_t bytes, CopyKind kind) override {
    if (bytes == 0) return;
    const DeviceGuard guard(rt_, id_);
    check(rt_, rt_.memcpy(dst, src, bytes, to_memcpy_kind(kind)), "cudaMemcpy", id_);
  }

  void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t row_bytes,
               std::size_t rows, CopyKind kind) override {
    if (row_bytes == 0 || rows == 0) return;
    const DeviceGuard guard(rt_, id_);
    const int memcpy_kind = to_memcpy_kind(kind);
    if (dst_pitch <= max_pitch_ && src_pitch <= max_pitch_) {
      check(rt_, rt_.memcpy_2d(dst, dst_pitch, src, src_pitch, row_bytes, rows, memcpy_kind), "cudaMemcpy2D", id_);
      return;
    }
    // The runtime rejects pitches above the device limit: one copy per row instead.
    auto* d = static_cast<std::byte*>(dst);
    const auto* s = static_cast<const std::byte*>(src);
    for (std::size_t r = 0; r < rows; ++r) {
      check(rt_, rt_.memcpy(d + r * dst_pitch, s + r * src_pitch, row_bytes, memcpy_kind), "cudaMemcpy", id_);
    }
  }

  void zero(void* dst, std::size_t bytes, MemoryKind kind) override {
    if (bytes == 0) return;
    if (kind == MemoryKind::kDevice) {
      const DeviceGuard guard(rt_, id_);
      check(rt_, rt_.memset(dst, 0, bytes), "cudaMemset", id_);
      check(rt_, rt_.device_synchronize(), "cudaDeviceSynchronize", id_);
    } else {
      std::memset(dst, 0, bytes);
    }
  }

  /// Largest pitch cudaMemcpy2D accepts on this device.
  [[nodiscard]] std::size_t max_pitch() const noexcept { return max_pitch_; }

 protected:
  void* do_allocate(const AllocationRequest& request) override {
    void* data = nullptr;
    cuda_error_t err = kCudaSuccess;
    {
      const DeviceGuard guard(rt_, id_);
      if (request.kind == MemoryKind::kDevice) {
        err = rt_.malloc(&data, request.size);  // 256-byte aligned by the runtime
      } else {
        err = rt_.malloc_host(&data, request.size);  // page-locked, page aligned
      }
    }
    if (err != kCudaSuccess || data == nullptr) {
      throw Error(ErrorCode::kMemoryExhausted, "cannot allocate " + std::to_string(request.size) +
                                                   " bytes on " + id_.str() + ": " + rt_.describe(err));
    }
    if (request.zero_fill) {
      try {
        zero(data, request.size, request.kind);
      } catch (...) {
        do_deallocate(data, request.size, request.kind);
        throw;
      }
    }
    return data;
  }

  void do_deallocate(void* data, std::size_t /*size*/, MemoryKind kind) noexcept override {
    const DeviceGuard guard(rt_, id_.index, std::nothrow);
    if (kind == MemoryKind::kDevice) {
      (void)rt_.free(data);
    } else {
      (void)rt_.free_host(data);
    }
  }

 private:
  DeviceId id_;
  const CudaRuntime& rt_;
  std::size_t max_pitch_ = kDefaultMaxPitch;
};

}  // namespace

std::shared_ptr<DeviceAllocator> make_cuda_allocator(const DeviceId& id) {
  const CudaRuntime& rt = runtime();
  if (rt.library == nullptr) {
    throw Error(ErrorCode::kBackendUnavailable,
                "device '" + id.str() + "' is unavailable: " + rt.load_error);
  }
  int count = 0;
  const cuda_error_t err = rt.get_device_count(&count);
  if (err != kCudaSuccess) {
    throw Error(ErrorCode::kBackendUnavailable,
                "device '" + id.str() + "' is unavailable: cudaGetDeviceCount failed: " + rt.describe(err));
  }
  if (id.index >= count) {
    throw Error(ErrorCode::kBackendUnavailable, "device '" + id.str() + "' does not exist: " +
                                                    std::to_string(count) + " CUDA device(s) visible");
  }
  return std::make_shared<CudaAllocator>(id, rt);
}

}  // namespace sagellm::kv::detail
