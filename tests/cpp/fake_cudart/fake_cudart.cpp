// A stand-in for libcudart.so, for tests on machines without a GPU: the few runtime entry points the
// CUDA backend loads, implemented on host memory. It keeps what a real runtime would enforce and
// the tests need to see: a per-thread current device, and cudaMemcpy2D refusing a pitch above the
// device's cudaDevAttrMaxPitch (set small here, FAKE_CUDART_MAX_PITCH bytes, so a small pool
// crosses it). Loaded through SAGELLM_KV_CUDART; never part of the library or the wheel.
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int kSuccess = 0;
constexpr int kErrorInvalidValue = 1;
constexpr int kErrorInvalidDevice = 101;
constexpr int kDeviceCount = 2;
constexpr int kAttrMaxPitch = 11;

thread_local int t_current_device = 0;
std::atomic<int> g_last_device{-1};
std::atomic<long> g_calls_2d{0};
std::atomic<long> g_calls_1d{0};

std::size_t max_pitch() {
  const char* v = std::getenv("FAKE_CUDART_MAX_PITCH");
  return v != nullptr ? static_cast<std::size_t>(std::strtoull(v, nullptr, 10)) : 4096;
}

void used() { g_last_device.store(t_current_device); }

}  // namespace

extern "C" {

int cudaGetDeviceCount(int* count) {
  *count = kDeviceCount;
  return kSuccess;
}
int cudaSetDevice(int device) {
  if (device < 0 || device >= kDeviceCount) return kErrorInvalidDevice;
  t_current_device = device;
  return kSuccess;
}
int cudaGetDevice(int* device) {
  *device = t_current_device;
  return kSuccess;
}
int cudaDeviceGetAttribute(int* value, int attr, int device) {
  if (device < 0 || device >= kDeviceCount) return kErrorInvalidDevice;
  if (attr != kAttrMaxPitch) return kErrorInvalidValue;
  *value = static_cast<int>(max_pitch());
  return kSuccess;
}
int cudaMalloc(void** p, std::size_t n) {
  used();
  *p = std::malloc(n);
  return *p != nullptr ? kSuccess : 2;
}
int cudaFree(void* p) {
  used();
  std::free(p);
  return kSuccess;
}
int cudaMallocHost(void** p, std::size_t n) { return cudaMalloc(p, n); }
int cudaFreeHost(void* p) { return cudaFree(p); }
int cudaMemcpy(void* dst, const void* src, std::size_t n, int /*kind*/) {
  used();
  g_calls_1d.fetch_add(1);
  std::memmove(dst, src, n);
  return kSuccess;
}
int cudaMemcpy2D(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                 std::size_t height, int /*kind*/) {
  used();
  if (dpitch > max_pitch() || spitch > max_pitch() || width > dpitch || width > spitch) return kErrorInvalidValue;
  g_calls_2d.fetch_add(1);
  for (std::size_t r = 0; r < height; ++r) {
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  }
  return kSuccess;
}
int cudaMemset(void* p, int v, std::size_t n) {
  used();
  std::memset(p, v, n);
  return kSuccess;
}
int cudaDeviceSynchronize() { return kSuccess; }
const char* cudaGetErrorString(int err) { return err == kErrorInvalidValue ? "invalid argument" : "fake cuda error"; }

// Test probes.
int fake_cudart_last_device() { return g_last_device.load(); }
long fake_cudart_calls_2d() { return g_calls_2d.load(); }
long fake_cudart_calls_1d() { return g_calls_1d.load(); }

}  // extern "C"
