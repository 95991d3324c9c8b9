// Bindings of the device registry, the block allocator and the paged KV pool.
#include <pybind11/stl.h>

#include <array>
#include <memory>
#include <string>
#include <type_traits>

#include "bindings.hpp"
#include "dlpack_abi.hpp"
#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/device.hpp"
#include "sagellm_kv/kv_pool.hpp"
#include "sagellm_kv/segment_sum.hpp"

namespace sagellm::kv::bindings {
namespace {

using PoolPtr = std::shared_ptr<PagedKVPool>;

py::array_t<BlockId> allocate_ids(PagedKVPool& pool, std::int64_t n) {
  const std::uint32_t count = checked_count(n, "num_blocks", /*allow_zero=*/true);
  py::array_t<BlockId> out(count);
  std::span<BlockId> span(out.mutable_data(), count);
  {
    MaybeReleaseGil release(count >= kGilReleaseMinBlocks);
    pool.allocate(span);
  }
  return out;
}

// Shape and element type of one layer's K or V cache: (num_blocks, block_size, heads, head_dim).
struct LayerLayout {
  std::array<std::int64_t, 4> shape;
  dlpack::DataType dl_dtype;
};

LayerLayout layer_layout(const PagedKVPool& pool) {
  const KVCacheSpec& s = pool.spec();
  LayerLayout l{{pool.num_blocks(), s.block_size, s.num_kv_heads, s.head_dim}, {}};
  switch (s.dtype) {
    case DType::kFloat32: l.dl_dtype = {dlpack::kFloat, 32, 1}; break;
    case DType::kFloat16: l.dl_dtype = {dlpack::kFloat, 16, 1}; break;
    case DType::kBFloat16: l.dl_dtype = {dlpack::kBfloat, 16, 1}; break;
    case DType::kFloat8E4M3: l.dl_dtype = {dlpack::kUInt, 8, 1}; break;  // raw bytes: no portable fp8 code
    case DType::kInt8: l.dl_dtype = {dlpack::kInt, 8, 1}; break;
  }
  return l;
}

// numpy has no bf16 or fp8: those come out as their raw bit patterns (uint16 / uint8).
py::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return py::dtype("float32");
    case DType::kFloat16: return py::dtype("float16");
    case DType::kBFloat16: return py::dtype("uint16");
    case DType::kFloat8E4M3: return py::dtype("uint8");
    case DType::kInt8: return py::dtype("int8");
  }
  return py::dtype("uint8");
}

bool on_host(const PagedKVPool& pool) { return pool.device().type == "cpu"; }

// A zero-copy numpy view of host pool memory; the array's base owns a reference to the pool, so
// the memory outlives the Python pool object as long as any view exists.
py::array host_view(const PoolPtr& pool, std::uint32_t layer, bool value) {
  if (!on_host(*pool)) {
    throw py::type_error("pool on " + pool->device().str() + " is not host memory; use the __dlpack__ view");
  }
  const LayerLayout l = layer_layout(*pool);
  std::byte* data = pool->layer_data(layer, value);
  const py::capsule base = keep_alive_capsule(pool);
  const py::dtype dt = numpy_dtype(pool->spec().dtype);
  const auto item = static_cast<py::ssize_t>(dt.itemsize());
  std::vector<py::ssize_t> shape(l.shape.begin(), l.shape.end());
  std::vector<py::ssize_t> strides(4);
  strides[3] = item;
  for (int i = 2; i >= 0; --i) strides[static_cast<std::size_t>(i)] = strides[static_cast<std::size_t>(i) + 1] * shape[static_cast<std::size_t>(i) + 1];
  return py::array(dt, shape, strides, data, base);
}

// DLPack export: the context holds the shape and what owns the memory (a reference to the pool, or
// the copy); the deleter may run on any thread without the GIL, which is fine because it touches no
// Python. One context serves both capsule kinds; only the one exported is filled in.
struct DLContext {
  PoolPtr pool;
  Allocation copy;
  std::array<std::int64_t, 4> shape;
  dlpack::ManagedTensor managed;
  dlpack::ManagedTensorVersioned versioned;
};

// Where an export's bytes live: the pool's own memory, or a fresh copy in host memory or on the
// pool's device (the DLPack `copy` / `dl_device` keywords; LayerView.__dlpack__ decides).
enum class DLExport : std::uint8_t { kShared = 0, kHostCopy = 1, kDeviceCopy = 2 };

// A copy of one layer's K or V cache made through the backends' synchronous copies, GIL released.
Allocation copy_layer(const PagedKVPool& pool, const std::byte* src, std::size_t bytes, DLExport where) {
  const bool from_host = on_host(pool);
  const bool to_host = where == DLExport::kHostCopy || from_host;
  const std::shared_ptr<DeviceAllocator> source = allocator_for(pool.device().str());
  const std::shared_ptr<DeviceAllocator> target = to_host ? allocator_for("cpu") : source;
  py::gil_scoped_release release;
  AllocationRequest request;
  request.size = bytes;
  request.kind = to_host ? MemoryKind::kHost : MemoryKind::kDevice;
  Allocation out = target->allocate(request);
  const CopyKind kind = from_host ? CopyKind::kHostToHost : to_host ? CopyKind::kDeviceToHost : CopyKind::kDeviceToDevice;
  source->copy(out.data(), src, bytes, kind);
  return out;
}

template <class Managed>
py::capsule tensor_capsule(Managed* managed, const char* name, std::unique_ptr<DLContext>& ctx) {
  // A capsule that was never consumed still owns the tensor; a consumer renames it and takes over.
  // The destructor cannot see the name it was made with, so the two kinds get their own.
  PyCapsule_Destructor destroy = [](PyObject* capsule) {
    const char* kName = std::is_same_v<Managed, dlpack::ManagedTensor> ? dlpack::kCapsuleName
                                                                        : dlpack::kVersionedCapsuleName;
    if (PyCapsule_IsValid(capsule, kName) != 0) {
      auto* m = static_cast<Managed*>(PyCapsule_GetPointer(capsule, kName));
      if (m != nullptr && m->deleter != nullptr) m->deleter(m);
    }
  };
  PyObject* cap = PyCapsule_New(managed, name, destroy);
  if (cap == nullptr) throw py::error_already_set();
  (void)ctx.release();  // owned by the capsule (or its consumer) from here
  return py::reinterpret_steal<py::capsule>(cap);
}

py::capsule dlpack_capsule(const PoolPtr& pool, std::uint32_t layer, bool value, bool versioned, DLExport where) {
  const LayerLayout l = layer_layout(*pool);
  auto ctx = std::make_unique<DLContext>();
  ctx->shape = l.shape;
  dlpack::Tensor t{};
  t.data = pool->layer_data(layer, value);
  t.device = on_host(*pool) ? dlpack::Device{dlpack::kCPU, 0}
                            : dlpack::Device{dlpack::kCUDA, pool->device().index};
  if (where == DLExport::kShared) {
    ctx->pool = pool;
  } else {
    std::size_t bytes = dtype_size(pool->spec().dtype);
    for (const std::int64_t d : l.shape) bytes *= static_cast<std::size_t>(d);
    ctx->copy = copy_layer(*pool, static_cast<const std::byte*>(t.data), bytes, where);
    t.data = ctx->copy.data();
    if (ctx->copy.kind() == MemoryKind::kHost) t.device = dlpack::Device{dlpack::kCPU, 0};
  }
  t.ndim = 4;
  t.dtype = l.dl_dtype;
  t.shape = ctx->shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  if (versioned) {
    dlpack::ManagedTensorVersioned& m = ctx->versioned;
    m.version = dlpack::kVersion;
    m.manager_ctx = ctx.get();
    m.deleter = [](dlpack::ManagedTensorVersioned* self) { delete static_cast<DLContext*>(self->manager_ctx); };
    m.flags = where == DLExport::kShared ? 0 : dlpack::kFlagIsCopied;
    m.dl_tensor = t;
    return tensor_capsule(&m, dlpack::kVersionedCapsuleName, ctx);
  }
  dlpack::ManagedTensor& m = ctx->managed;
  m.manager_ctx = ctx.get();
  m.deleter = [](dlpack::ManagedTensor* self) { delete static_cast<DLContext*>(self->manager_ctx); };
  m.dl_tensor = t;
  return tensor_capsule(&m, dlpack::kCapsuleName, ctx);
}

std::uint32_t checked_layer(const PagedKVPool& pool, std::int64_t layer) {
  if (layer < 0 || layer >= static_cast<std::int64_t>(pool.spec().num_layers)) {
    throw py::index_error("layer " + std::to_string(layer) + " out of range [0, " +
                          std::to_string(pool.spec().num_layers) + ")");
  }
  return static_cast<std::uint32_t>(layer);
}

// `obj` as a buffer (numpy array, bytearray, memoryview, ...); TypeError naming `what` otherwise.
py::buffer buffer_arg(const py::handle& obj, const char* what) {
  if (PyObject_CheckBuffer(obj.ptr()) == 0) {
    throw py::type_error(std::string(what) + " must be a C-contiguous buffer (numpy array, bytearray, memoryview), got " +
                         Py_TYPE(obj.ptr())->tp_name);
  }
  return py::reinterpret_borrow<py::buffer>(obj);
}

// A (writable when asked) contiguous byte buffer (numpy array, bytearray, memoryview) of the exact size.
py::buffer_info byte_buffer(const py::handle& obj, std::size_t expected, bool writable, const char* what) {
  const py::buffer buf = buffer_arg(obj, what);
  if (writable) {  // a read-only buffer: say which argument, not only "Object is not writable"
    Py_buffer probe;
    if (PyObject_GetBuffer(buf.ptr(), &probe, PyBUF_WRITABLE | PyBUF_STRIDES) != 0) {
      PyErr_Clear();
      throw py::value_error(std::string(what) + " must be writable, got a read-only " + Py_TYPE(buf.ptr())->tp_name);
    }
    PyBuffer_Release(&probe);
  }
  py::buffer_info info = buf.request(writable);
  const auto nbytes = static_cast<std::size_t>(info.size * info.itemsize);
  bool contiguous = true;
  py::ssize_t stride = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.strides[static_cast<std::size_t>(d)] != stride) contiguous = false;
    stride *= info.shape[static_cast<std::size_t>(d)];
  }
  if (!contiguous) throw py::value_error(std::string(what) + " must be C-contiguous");
  if (nbytes != expected) {
    throw py::value_error(std::string(what) + " holds " + std::to_string(nbytes) + " bytes, expected " +
                          std::to_string(expected));
  }
  return info;
}

// A writable C-contiguous numpy uint64 array of exactly `expected` entries (the segment sums).
std::span<std::uint64_t> sums_buffer(const py::handle& obj, std::size_t expected) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error("sums must be a uint64 numpy array, got " + std::string(Py_TYPE(obj.ptr())->tp_name));
  }
  auto sums = py::reinterpret_borrow<py::array>(obj);
  if (!sums.dtype().equal(py::dtype::of<std::uint64_t>())) {
    throw py::type_error("sums must be a uint64 array, got dtype " + py::str(sums.dtype()).cast<std::string>());
  }
  if (!(sums.flags() & py::array::c_style) || !sums.writeable()) {
    throw py::value_error("sums must be a writable C-contiguous array");
  }
  if (static_cast<std::size_t>(sums.size()) != expected) {
    throw py::value_error("sums holds " + std::to_string(sums.size()) + " entries, expected " +
                          std::to_string(expected) + " (one per full segment of " +
                          std::to_string(kSegmentBytes) + " bytes)");
  }
  return {static_cast<std::uint64_t*>(sums.mutable_data()), expected};
}

}  // namespace

void bind_pool(py::module_& m) {
  m.attr("SEGMENT_BYTES") = kSegmentBytes;
  m.def("segment_sums", [](const py::handle& data, const py::handle& sums) {
          py::buffer_info info = buffer_arg(data, "data").request(false);
          const auto nbytes = static_cast<std::size_t>(info.size * info.itemsize);
          py::buffer_info in = byte_buffer(data, nbytes, false, "data");
          std::span<std::uint64_t> out = sums_buffer(sums, segment_count(nbytes));
          const ResizeGuard guard_data(data), guard_sums(sums);
          py::gil_scoped_release release;
          segment_sums({static_cast<const std::byte*>(in.ptr), nbytes}, out);
        }, py::arg("data"), py::arg("sums"),
        "Sums of each full 4 KiB segment's little-endian 64-bit words (mod 2**64), into ``sums``.");
  m.def("registered_backends", &registered_backends, "Names of the registered device backends.");
  m.def("check_device", [](const std::string& device) { return allocator_for(device)->device().str(); },
        py::arg("device"), "Canonical name of a usable device; raises when it cannot be used here.");
  m.def("dtype_size", [](const std::string& name) { return dtype_size(parse_dtype(name)); }, py::arg("dtype"));
  m.def("dtype_name", [](const std::string& name) { return std::string(dtype_name(parse_dtype(name))); },
        py::arg("dtype"));

  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init([](std::int64_t n) { return std::make_unique<BlockAllocator>(checked_count(n, "num_blocks")); }),
           py::arg("num_blocks"))
      .def("allocate", [](BlockAllocator& a, std::int64_t n) {
             const std::uint32_t count = checked_count(n, "num_blocks", true);
             py::array_t<BlockId> out(count);
             BatchStatus st;
             {
               MaybeReleaseGil release(count >= kGilReleaseMinBlocks);
               st = a.allocate(std::span<BlockId>(out.mutable_data(), count));
             }
             if (!st.ok()) {
               throw Error(st.code, "cannot allocate " + std::to_string(count) + " blocks: " +
                                        std::to_string(a.num_available()) + " available");
             }
             return out;
           }, py::arg("num_blocks"))
      .def("free", [](BlockAllocator& a, const py::handle& ids) {
             BlockIds b(ids, "block_ids");
             BatchStatus st;
             {
               MaybeReleaseGil release(b.span().size() >= kGilReleaseMinBlocks);
               st = a.free(b.span());
             }
             if (!st.ok()) {
               const std::string which = "free: block id " + std::to_string(st.id) + " at position " +
                                         std::to_string(st.index);
               switch (st.code) {
                 case ErrorCode::kDoubleFree:
                   throw Error(st.code, which + " is not allocated (double free); " +
                                            (st.partial ? "it raced a concurrent free; every other id was freed"
                                                        : "nothing was freed"));
                 case ErrorCode::kInvalidBlock:
                   throw Error(st.code, which + " is out of range; nothing was freed");
                 default:
                   throw Error(st.code, "free: no scratch memory for the batch; nothing was freed");
               }
             }
           }, py::arg("block_ids"))
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block_id"))
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("num_available", &BlockAllocator::num_available)
      .def_property_readonly("num_allocated", &BlockAllocator::num_allocated)
      .def_property_readonly_static("metadata_bytes_per_block",
                                    [](const py::object&) { return BlockAllocator::metadata_bytes_per_block(); });

  py::class_<PagedKVPool, PoolPtr>(m, "PagedKVPool")
      .def(py::init([](std::int64_t num_layers, std::int64_t num_kv_heads, std::int64_t head_dim,
                       const std::string& dtype, std::int64_t block_size, std::int64_t num_blocks,
                       const std::string& device, bool zero_fill, bool huge_pages, bool lock_memory) {
             KVCacheSpec spec;
             spec.num_layers = checked_count(num_layers, "num_layers");
             spec.num_kv_heads = checked_count(num_kv_heads, "num_kv_heads");
             spec.head_dim = checked_count(head_dim, "head_dim");
             spec.block_size = checked_count(block_size, "block_size");
             spec.dtype = parse_dtype(dtype);
             PoolOptions options{device, zero_fill, huge_pages, lock_memory};
             const std::uint32_t blocks = checked_count(num_blocks, "num_blocks");
             py::gil_scoped_release release;  // zero-filling a large arena takes a while
             return std::make_shared<PagedKVPool>(spec, blocks, options);
           }),
           py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("dtype"),
           py::arg("block_size"), py::arg("num_blocks"), py::arg("device") = "cpu", py::arg("zero_fill") = true,
           py::arg("huge_pages") = false, py::arg("lock_memory") = false)
      .def("allocate", &allocate_ids, py::arg("num_blocks"))
      .def("free", [](PagedKVPool& p, const py::handle& ids) {
             BlockIds b(ids, "block_ids");
             MaybeReleaseGil release(b.span().size() >= kGilReleaseMinBlocks);
             p.free(b.span());
           }, py::arg("block_ids"))
      .def("incref", [](PagedKVPool& p, const py::handle& ids) {
             BlockIds b(ids, "block_ids");
             MaybeReleaseGil release(b.span().size() >= kGilReleaseMinBlocks);
             p.incref(b.span());
           }, py::arg("block_ids"))
      .def("ref_count", [](const PagedKVPool& p, std::int64_t id) {
             if (id < INT32_MIN || id > INT32_MAX) throw py::value_error("block id " + std::to_string(id) + " out of range");
             return p.allocator().ref_count(static_cast<BlockId>(id));
           }, py::arg("block_id"))
      .def("is_allocated", [](const PagedKVPool& p, std::int64_t id) {
             return id >= INT32_MIN && id <= INT32_MAX && p.allocator().is_allocated(static_cast<BlockId>(id));
           }, py::arg("block_id"))
      .def("copy_blocks", [](PagedKVPool& p, const py::handle& src, const py::handle& dst) {
             BlockIds s(src, "src"), d(dst, "dst");
             py::gil_scoped_release release;
             p.copy_blocks(s.span(), d.span());
           }, py::arg("src"), py::arg("dst"))
      .def("gather", [](const PagedKVPool& p, const py::handle& ids) {
             BlockIds b(ids, "block_ids");
             py::array_t<std::uint8_t> out(static_cast<py::ssize_t>(b.span().size() * p.block_bytes()));
             std::span<std::byte> dst(reinterpret_cast<std::byte*>(out.mutable_data()), static_cast<std::size_t>(out.size()));
             py::gil_scoped_release release;
             p.gather(b.span(), dst);
             return out;
           }, py::arg("block_ids"))
      .def("gather_into", [](const PagedKVPool& p, const py::handle& ids, const py::handle& out) {
             BlockIds b(ids, "block_ids");
             py::buffer_info info = byte_buffer(out, b.span().size() * p.block_bytes(), true, "out");
             std::span<std::byte> dst(static_cast<std::byte*>(info.ptr), b.span().size() * p.block_bytes());
             const ResizeGuard guard(out);
             py::gil_scoped_release release;
             p.gather(b.span(), dst);
           }, py::arg("block_ids"), py::arg("out"))
      .def("scatter", [](PagedKVPool& p, const py::handle& in, const py::handle& ids) {
             BlockIds b(ids, "block_ids");
             py::buffer_info info = byte_buffer(in, b.span().size() * p.block_bytes(), false, "data");
             std::span<const std::byte> src(static_cast<const std::byte*>(info.ptr), b.span().size() * p.block_bytes());
             const ResizeGuard guard(in);
             py::gil_scoped_release release;
             p.scatter(src, b.span());
           }, py::arg("data"), py::arg("block_ids"))
      .def("gather_summed", [](const PagedKVPool& p, const py::handle& ids, const py::handle& out,
                               const py::handle& sums) {
             BlockIds b(ids, "block_ids");
             const std::size_t nbytes = b.span().size() * p.block_bytes();
             py::buffer_info info = byte_buffer(out, nbytes, true, "out");
             std::span<std::uint64_t> s = sums_buffer(sums, segment_count(nbytes));
             const ResizeGuard guard_out(out), guard_sums(sums);
             py::gil_scoped_release release;
             p.gather_summed(b.span(), {static_cast<std::byte*>(info.ptr), nbytes}, s);
           }, py::arg("block_ids"), py::arg("out"), py::arg("sums"))
      .def("scatter_summed", [](PagedKVPool& p, const py::handle& in, const py::handle& ids, const py::handle& sums) {
             BlockIds b(ids, "block_ids");
             const std::size_t nbytes = b.span().size() * p.block_bytes();
             py::buffer_info info = byte_buffer(in, nbytes, false, "data");
             std::span<std::uint64_t> s = sums_buffer(sums, segment_count(nbytes));
             const ResizeGuard guard_in(in), guard_sums(sums);
             py::gil_scoped_release release;
             p.scatter_summed({static_cast<const std::byte*>(info.ptr), nbytes}, b.span(), s);
           }, py::arg("data"), py::arg("block_ids"), py::arg("sums"))
      .def("host_view", [](const PoolPtr& p, std::int64_t layer, bool value) {
             return host_view(p, checked_layer(*p, layer), value);
           }, py::arg("layer"), py::arg("value"))
      .def("dlpack_capsule", [](const PoolPtr& p, std::int64_t layer, bool value, bool versioned, int where) {
             if (where < 0 || where > static_cast<int>(DLExport::kDeviceCopy)) {
               throw py::value_error("where must be 0 (shared), 1 (host copy) or 2 (device copy), got " +
                                     std::to_string(where));
             }
             return dlpack_capsule(p, checked_layer(*p, layer), value, versioned, static_cast<DLExport>(where));
           }, py::arg("layer"), py::arg("value"), py::arg("versioned") = false, py::arg("where") = 0,
           "A DLPack capsule of the layer's K or V cache: legacy or versioned, shared or a copy.")
      .def("layer_address", [](const PagedKVPool& p, std::int64_t layer, bool value) {
             return reinterpret_cast<std::uintptr_t>(p.layer_data(checked_layer(p, layer), value));
           }, py::arg("layer"), py::arg("value"))
      .def("dlpack_device", [](const PagedKVPool& p) {
             return on_host(p) ? std::make_pair(static_cast<int>(dlpack::kCPU), 0)
                               : std::make_pair(static_cast<int>(dlpack::kCUDA), p.device().index);
           })
      .def("set_budget_blocks", [](PagedKVPool& p, std::int64_t n) {
             p.set_budget_blocks(checked_count(n, "budget_blocks", true));
           }, py::arg("blocks"))
      .def("set_budget_bytes", [](PagedKVPool& p, std::int64_t n) {
             if (n < 0) throw py::value_error("budget_bytes must be >= 0, got " + std::to_string(n));
             p.set_budget_bytes(static_cast<std::size_t>(n));
           }, py::arg("nbytes"))
      .def("can_admit_tokens", [](const PagedKVPool& p, std::int64_t n) {
             if (n < 0) throw py::value_error("num_tokens must be >= 0, got " + std::to_string(n));
             return p.can_admit_tokens(static_cast<std::size_t>(n));
           }, py::arg("num_tokens"))
      .def_property_readonly("budget_blocks", &PagedKVPool::budget_blocks)
      .def_property_readonly("num_blocks", &PagedKVPool::num_blocks)
      .def_property_readonly("num_free_blocks", &PagedKVPool::num_free_blocks)
      .def_property_readonly("num_used_blocks", [](const PagedKVPool& p) { return p.allocator().num_allocated(); })
      .def_property_readonly("block_nbytes", &PagedKVPool::block_bytes)
      .def_property_readonly("layer_block_nbytes", [](const PagedKVPool& p) { return p.spec().layer_block_bytes(); })
      .def_property_readonly("total_nbytes", &PagedKVPool::total_bytes)
      .def_property_readonly("device", [](const PagedKVPool& p) { return p.device().str(); })
      .def_property_readonly("dtype", [](const PagedKVPool& p) { return std::string(dtype_name(p.spec().dtype)); })
      .def_property_readonly("num_layers", [](const PagedKVPool& p) { return p.spec().num_layers; })
      .def_property_readonly("num_kv_heads", [](const PagedKVPool& p) { return p.spec().num_kv_heads; })
      .def_property_readonly("head_dim", [](const PagedKVPool& p) { return p.spec().head_dim; })
      .def_property_readonly("block_size", [](const PagedKVPool& p) { return p.spec().block_size; });
}

}  // namespace sagellm::kv::bindings
