// Bindings of the tiered store's native parts (tier_storage.hpp): the host slab, slab <-> pool
// block copies (one crossing per batch, GIL released) and the slot checksum.
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/tier_storage.hpp"

namespace sagellm::kv::bindings {

namespace {

using SlabPtr = std::shared_ptr<HostSlab>;

// Slot numbers copied under the GIL and checked against the slab, like BlockIds for pool ids.
std::vector<std::uint32_t> checked_slots(const HostSlab& slab, const py::handle& obj, std::size_t expected) {
  BlockIds ids(obj, "slots");
  if (ids.span().size() != expected) {
    throw py::value_error("slots holds " + std::to_string(ids.span().size()) + " entries, block_ids " +
                          std::to_string(expected));
  }
  std::vector<std::uint32_t> out;
  out.reserve(expected);
  for (BlockId s : ids.span()) {
    if (s < 0 || static_cast<std::uint32_t>(s) >= slab.num_slots()) {
      throw Error(ErrorCode::kInvalidBlock, "HostSlab: slot " + std::to_string(s) + " out of range [0, " +
                                                std::to_string(slab.num_slots()) + ")");
    }
    out.push_back(static_cast<std::uint32_t>(s));
  }
  return out;
}

// Each slot written at most once (copy_from_pool): with a slot listed twice, which block it ends up
// holding depends on the copy order (as for scatter's block ids). ValueError naming both positions.
void reject_repeated_slots(const std::vector<std::uint32_t>& slots) {
  std::vector<std::pair<std::uint32_t, std::size_t>> sorted;
  sorted.reserve(slots.size());
  for (std::size_t i = 0; i < slots.size(); ++i) sorted.emplace_back(slots[i], i);
  std::sort(sorted.begin(), sorted.end());
  for (std::size_t j = 1; j < sorted.size(); ++j) {
    if (sorted[j].first == sorted[j - 1].first) {
      throw py::value_error("copy_from_pool: slot " + std::to_string(sorted[j].first) + " appears at positions " +
                            std::to_string(sorted[j - 1].second) + " and " + std::to_string(sorted[j].second) +
                            "; each slot may be written once per call");
    }
  }
}

void check_fits(const HostSlab& slab, const PagedKVPool& pool) {
  if (pool.block_bytes() > slab.slot_bytes()) {
    throw Error(ErrorCode::kMetadataMismatch, "HostSlab: a pool block of " + std::to_string(pool.block_bytes()) +
                                                  " bytes does not fit a slot of " +
                                                  std::to_string(slab.slot_bytes()) + " bytes");
  }
}

py::array slab_view(const SlabPtr& slab) {
  const py::capsule base = keep_alive_capsule(slab);
  const auto stride = static_cast<py::ssize_t>(slab->slot_stride());
  return py::array(py::dtype::of<std::uint8_t>(), {static_cast<py::ssize_t>(slab->num_slots()), stride},
                   {stride, py::ssize_t{1}}, slab->data(), base);
}

}  // namespace

void bind_tier(py::module_& m) {
  m.def("block_checksum", [](const py::buffer& buf) {
          py::buffer_info info = buf.request(false);
          const auto n = static_cast<std::size_t>(info.size * info.itemsize);
          bool contiguous = true;
          py::ssize_t stride = info.itemsize;
          for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
            if (info.strides[static_cast<std::size_t>(d)] != stride) contiguous = false;
            stride *= info.shape[static_cast<std::size_t>(d)];
          }
          if (!contiguous) throw py::value_error("block_checksum: the buffer must be C-contiguous");
          std::span<const std::byte> bytes(static_cast<const std::byte*>(info.ptr), n);
          const ResizeGuard guard(buf);
          py::gil_scoped_release release;
          return block_checksum(bytes);
        }, py::arg("data"), "64-bit checksum of a contiguous buffer (the disk tier's slot check).");
  m.def("block_checksum_algorithm", [] { return std::string(block_checksum_algorithm()); });

  py::class_<HostSlab, SlabPtr>(m, "HostSlab")
      .def(py::init([](std::int64_t num_slots, std::int64_t slot_bytes, const std::string& device, bool zero_fill) {
             if (slot_bytes <= 0) throw py::value_error("slot_bytes must be > 0, got " + std::to_string(slot_bytes));
             return std::make_shared<HostSlab>(checked_count(num_slots, "num_slots"),
                                               static_cast<std::size_t>(slot_bytes), device, zero_fill);
           }), py::arg("num_slots"), py::arg("slot_bytes"), py::arg("device") = "cpu", py::arg("zero_fill") = false)
      .def("view", &slab_view, "numpy uint8 view (num_slots, slot_stride); keeps the slab alive.")
      .def("copy_from_pool", [](const SlabPtr& slab, const PagedKVPool& pool, const py::handle& block_ids,
                                const py::handle& slots) {
             check_fits(*slab, pool);
             BlockIds ids(block_ids, "block_ids");
             const std::vector<std::uint32_t> s = checked_slots(*slab, slots, ids.span().size());
             reject_repeated_slots(s);
             std::vector<std::byte*> outs(s.size());
             for (std::size_t i = 0; i < s.size(); ++i) outs[i] = slab->slot(s[i]);
             py::gil_scoped_release release;
             pool.gather_each(ids.span(), outs);
           }, py::arg("pool"), py::arg("block_ids"), py::arg("slots"),
           "Copies pool blocks block_ids[i] into slots[i] (staging layout; each slot once), GIL released.")
      .def("copy_to_pool", [](const SlabPtr& slab, PagedKVPool& pool, const py::handle& slots,
                              const py::handle& block_ids) {
             check_fits(*slab, pool);
             BlockIds ids(block_ids, "block_ids");
             const std::vector<std::uint32_t> s = checked_slots(*slab, slots, ids.span().size());
             std::vector<const std::byte*> ins(s.size());
             for (std::size_t i = 0; i < s.size(); ++i) ins[i] = slab->slot(s[i]);
             py::gil_scoped_release release;
             pool.scatter_each(ins, ids.span());
           }, py::arg("pool"), py::arg("slots"), py::arg("block_ids"),
           "Copies slots[i] into pool blocks block_ids[i], GIL released.")
      .def_property_readonly("num_slots", &HostSlab::num_slots)
      .def_property_readonly("slot_bytes", &HostSlab::slot_bytes)
      .def_property_readonly("slot_stride", &HostSlab::slot_stride)
      .def_property_readonly("pinned", &HostSlab::pinned)
      .def_property_readonly("address", [](const HostSlab& s) { return reinterpret_cast<std::uintptr_t>(s.data()); });
}

}  // namespace sagellm::kv::bindings
