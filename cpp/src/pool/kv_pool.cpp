#include "sagellm_kv/kv_pool.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <string>

#include "common/copy.hpp"
#include "sagellm_kv/error.hpp"
#include "sagellm_kv/segment_sum.hpp"

namespace sagellm::kv {
namespace {

struct DTypeInfo {
  DType dtype;
  std::size_t size;
  std::string_view name;
  std::array<std::string_view, 2> aliases;
};

constexpr std::array<DTypeInfo, 5> kDTypes = {{
    {DType::kFloat32, 4, "fp32", {"float32", "float"}},
    {DType::kFloat16, 2, "fp16", {"float16", "half"}},
    {DType::kBFloat16, 2, "bf16", {"bfloat16", ""}},
    {DType::kFloat8E4M3, 1, "fp8", {"float8_e4m3fn", "fp8_e4m3"}},
    {DType::kInt8, 1, "int8", {"", ""}},
}};

// Moves up to this size likely stay in cache for their consumer (a transfer chunk is checksummed and
// sent right after its gather): plain stores. Larger moves bypass the cache with streaming stores.
constexpr std::size_t kStreamMinTotalBytes = std::size_t{8} << 20;

const DTypeInfo& info(DType dtype) noexcept { return kDTypes[static_cast<std::size_t>(dtype)]; }

}  // namespace

std::size_t dtype_size(DType dtype) noexcept { return info(dtype).size; }
std::string_view dtype_name(DType dtype) noexcept { return info(dtype).name; }

DType parse_dtype(std::string_view name) {
  for (const auto& d : kDTypes) {
    if (name == d.name || (!name.empty() && (name == d.aliases[0] || name == d.aliases[1]))) return d.dtype;
  }
  throw Error(ErrorCode::kInvalidArgument,
              "unknown dtype '" + std::string(name) + "'; expected one of fp32, fp16, bf16, fp8, int8");
}

void KVCacheSpec::validate() const {
  const auto positive = [](std::uint32_t v, const char* field) {
    if (v == 0) throw Error(ErrorCode::kInvalidArgument, std::string(field) + " must be > 0, got 0");
  };
  positive(num_layers, "num_layers");
  positive(num_kv_heads, "num_kv_heads");
  positive(head_dim, "head_dim");
  positive(block_size, "block_size");
  if (static_cast<std::size_t>(dtype) >= kDTypes.size()) {
    throw Error(ErrorCode::kInvalidArgument, "dtype value " + std::to_string(static_cast<int>(dtype)) + " is unknown");
  }
  // 2^40 bytes per block would already be absurd; this keeps every product below from overflowing.
  const long double bytes = static_cast<long double>(num_layers) * 2 * block_size * num_kv_heads *
                            head_dim * static_cast<long double>(dtype_size(dtype));
  if (bytes > static_cast<long double>(std::size_t{1} << 40)) {
    throw Error(ErrorCode::kInvalidArgument, "spec describes blocks of more than 1 TiB each");
  }
}

std::size_t KVCacheSpec::layer_block_bytes() const noexcept {
  return std::size_t{block_size} * num_kv_heads * head_dim * dtype_size(dtype);
}

std::size_t KVCacheSpec::block_bytes() const noexcept {
  return layer_block_bytes() * 2 * num_layers;
}

namespace {

// The arena, allocated before the allocator's metadata (8 bytes a block, written up front): a pool
// refused for its size or for lack of memory costs nothing first (2^31 blocks were 16 GiB of
// metadata and half a minute before the refusal).
Allocation allocate_arena(DeviceAllocator& device, const KVCacheSpec& spec, std::uint32_t num_blocks, bool on_device,
                          const PoolOptions& options) {
  if (num_blocks == 0 || num_blocks > BlockAllocator::kMaxBlocks) {
    throw Error(ErrorCode::kInvalidArgument, "num_blocks must be in [1, " + std::to_string(BlockAllocator::kMaxBlocks) +
                                                 "], got " + std::to_string(num_blocks));
  }
  const long double total = static_cast<long double>(spec.block_bytes()) * num_blocks;
  if (total > static_cast<long double>(std::numeric_limits<std::size_t>::max() / 2)) {
    throw Error(ErrorCode::kInvalidArgument, "pool of " + std::to_string(num_blocks) +
                                                 " blocks does not fit in the address space");
  }
  AllocationRequest request;
  request.size = spec.block_bytes() * num_blocks;
  request.alignment = 256;
  request.kind = on_device ? MemoryKind::kDevice : MemoryKind::kHost;
  request.zero_fill = options.zero_fill;
  request.huge_pages = options.huge_pages;
  request.lock = options.lock_memory;
  return device.allocate(request);
}

}  // namespace

PagedKVPool::PagedKVPool(const KVCacheSpec& spec, std::uint32_t num_blocks, const PoolOptions& options)
    : spec_((spec.validate(), spec)),
      device_(DeviceId::parse(options.device)),
      on_device_(device_.type != "cpu"),
      device_allocator_(allocator_for(options.device)),
      arena_(allocate_arena(*device_allocator_, spec_, num_blocks, on_device_, options)),
      allocator_(num_blocks) {}

std::byte* PagedKVPool::layer_data(std::uint32_t layer, bool value) const {
  if (layer >= spec_.num_layers) {
    throw Error(ErrorCode::kInvalidArgument, "layer " + std::to_string(layer) + " out of range [0, " +
                                                 std::to_string(spec_.num_layers) + ")");
  }
  const std::size_t plane = spec_.layer_block_bytes() * num_blocks();
  return static_cast<std::byte*>(arena_.data()) + (std::size_t{layer} * 2 + (value ? 1 : 0)) * plane;
}

std::byte* PagedKVPool::block_data(std::uint32_t layer, bool value, BlockId id) const {
  const std::size_t plane = spec_.layer_block_bytes() * num_blocks();
  return static_cast<std::byte*>(arena_.data()) + (std::size_t{layer} * 2 + (value ? 1 : 0)) * plane +
         static_cast<std::size_t>(id) * spec_.layer_block_bytes();
}

std::vector<BlockId> PagedKVPool::checked_ids(std::span<const BlockId> ids, bool must_be_allocated,
                                              const char* what) const {
  std::vector<BlockId> own(ids.begin(), ids.end());  // the one read of the caller's ids
  for (std::size_t i = 0; i < own.size(); ++i) {
    const BlockId id = own[i];
    if (id < 0 || static_cast<std::uint32_t>(id) >= num_blocks()) {
      throw Error(ErrorCode::kInvalidBlock, std::string(what) + ": block id " + std::to_string(id) +
                                                " at position " + std::to_string(i) +
                                                " is out of range [0, " + std::to_string(num_blocks()) + ")");
    }
    if (must_be_allocated && !allocator_.is_allocated(id)) {
      throw Error(ErrorCode::kInvalidBlock, std::string(what) + ": block id " + std::to_string(id) +
                                                " at position " + std::to_string(i) + " is not allocated");
    }
  }
  return own;
}

namespace {

// (id, position) pairs sorted by id, then position: equal ids end up adjacent, earliest first.
std::vector<std::pair<BlockId, std::size_t>> sorted_positions(const std::vector<BlockId>& ids) {
  std::vector<std::pair<BlockId, std::size_t>> out(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) out[i] = {ids[i], i};
  std::sort(out.begin(), out.end());
  return out;
}

void reject_repeats(const std::vector<BlockId>& ids, const char* what) {
  if (ids.size() < 2) return;
  const auto sorted = sorted_positions(ids);
  for (std::size_t j = 1; j < sorted.size(); ++j) {
    if (sorted[j].first == sorted[j - 1].first) {
      throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": block id " + std::to_string(sorted[j].first) +
                                                   " appears at positions " + std::to_string(sorted[j - 1].second) +
                                                   " and " + std::to_string(sorted[j].second) +
                                                   "; each block may be written once per call");
    }
  }
}

void reject_sums_overlap(std::span<const std::byte> staging, std::span<const std::uint64_t> sums,
                         const char* what) {
  if (detail::overlaps(staging.data(), staging.size(), sums.data(), sums.size_bytes())) {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) +
                                                 ": the sums buffer shares memory with the staging buffer; each "
                                                 "must have its own");
  }
}

}  // namespace

void PagedKVPool::reject_arena_overlap(const void* staging, std::size_t bytes, bool staging_on_device,
                                       const char* what) const {
  // Memory of the other kind (a device pool's host staging) cannot be the arena.
  if (staging_on_device != on_device_ || !detail::overlaps(staging, bytes, arena_.data(), arena_.size())) return;
  throw Error(ErrorCode::kInvalidArgument, std::string(what) +
                                               ": the buffer shares memory with the pool's blocks (a view of "
                                               "the pool), so the result would depend on the copy order; use "
                                               "copy_blocks to copy blocks within a pool");
}

void PagedKVPool::copy_blocks(std::span<const BlockId> src, std::span<const BlockId> dst) {
  if (src.size() != dst.size()) {
    throw Error(ErrorCode::kInvalidArgument, "copy_blocks: " + std::to_string(src.size()) +
                                                 " source ids but " + std::to_string(dst.size()) +
                                                 " destination ids");
  }
  const std::vector<BlockId> s = checked_ids(src, true, "copy_blocks source");
  const std::vector<BlockId> d = checked_ids(dst, true, "copy_blocks destination");
  // Order independence: no destination written twice, none read by another pair. Self pairs
  // (s[i] == d[i]) are no-ops and take no part in either rule.
  std::vector<BlockId> written;
  std::vector<BlockId> read;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == d[i]) continue;
    written.push_back(d[i]);
    read.push_back(s[i]);
  }
  reject_repeats(written, "copy_blocks destination");
  std::sort(read.begin(), read.end());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != d[i] && std::binary_search(read.begin(), read.end(), d[i])) {
      throw Error(ErrorCode::kInvalidArgument,
                  "copy_blocks: destination block id " + std::to_string(d[i]) + " at position " + std::to_string(i) +
                      " is also a source of another pair; the result would depend on the copy order");
    }
  }
  const std::size_t bytes = spec_.layer_block_bytes();
  const CopyKind kind = on_device_ ? CopyKind::kDeviceToDevice : CopyKind::kHostToHost;
  const std::size_t plane = bytes * num_blocks();
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == d[i]) continue;
    // Every layer's K and V of a block, one plane apart on both sides.
    device_allocator_->copy_2d(block_data(0, false, d[i]), plane, block_data(0, false, s[i]), plane, bytes,
                               std::size_t{2} * spec_.num_layers, kind);
  }
}

void PagedKVPool::move_block(std::byte* staging, BlockId id, bool to_staging, bool staging_on_device,
                             bool stream) const {
  const std::size_t bytes = spec_.layer_block_bytes();
  const bool pool_on_device = on_device_;
  CopyKind kind = CopyKind::kHostToHost;
  if (pool_on_device && staging_on_device) {
    kind = CopyKind::kDeviceToDevice;
  } else if (pool_on_device) {
    kind = to_staging ? CopyKind::kDeviceToHost : CopyKind::kHostToDevice;
  } else if (staging_on_device) {
    kind = to_staging ? CopyKind::kHostToDevice : CopyKind::kDeviceToHost;
  }
  if (kind == CopyKind::kHostToHost) {
    // Host memory on both sides: skip the virtual call; stream the stores of large moves.
    for (std::uint32_t layer = 0; layer < spec_.num_layers; ++layer) {
      for (bool value : {false, true}) {
        std::byte* block = block_data(layer, value, id);
        std::byte* dst = to_staging ? staging : block;
        const std::byte* src = to_staging ? block : staging;
        if (stream) {
          detail::stream_copy(dst, src, bytes);
        } else {
          std::memcpy(dst, src, bytes);
        }
        staging += bytes;
      }
    }
    return;
  }
  // A block's 2 * num_layers pieces sit one K/V plane apart in the arena and back to back in the
  // staging buffer: one strided copy moves them all.
  const std::size_t plane = bytes * num_blocks();
  std::byte* first = block_data(0, false, id);
  if (to_staging) {
    device_allocator_->copy_2d(staging, bytes, first, plane, bytes, std::size_t{2} * spec_.num_layers, kind);
  } else {
    device_allocator_->copy_2d(first, plane, staging, bytes, bytes, std::size_t{2} * spec_.num_layers, kind);
  }
}

void PagedKVPool::gather(std::span<const BlockId> ids_in, std::span<std::byte> out, bool out_on_device) const {
  const std::vector<BlockId> ids = checked_ids(ids_in, false, "gather");
  check_staging(out.size(), ids.size(), "gather");
  reject_arena_overlap(out.data(), out.size(), out_on_device, "gather");
  for (std::size_t i = 0; i < ids.size(); ++i) {
    move_block(out.data() + i * block_bytes(), ids[i], true, out_on_device, out.size() > kStreamMinTotalBytes);
  }
  detail::stream_fence();
}

void PagedKVPool::scatter(std::span<const std::byte> in, std::span<const BlockId> ids_in, bool in_on_device) {
  const std::vector<BlockId> ids = checked_ids(ids_in, false, "scatter");
  check_staging(in.size(), ids.size(), "scatter");
  reject_repeats(ids, "scatter");
  reject_arena_overlap(in.data(), in.size(), in_on_device, "scatter");
  for (std::size_t i = 0; i < ids.size(); ++i) {
    // move_block only reads through the pointer in this direction.
    move_block(const_cast<std::byte*>(in.data() + i * block_bytes()), ids[i], false, in_on_device,
               in.size() > kStreamMinTotalBytes);
  }
  detail::stream_fence();
}

void PagedKVPool::check_staging(std::size_t staging_bytes, std::size_t num_ids, const char* what) const {
  // gather may repeat ids, so their count is not bounded by the pool: the product can wrap (2^24
  // ids of a 1 TiB block make 2^64 bytes, which would match an empty buffer).
  if (num_ids > std::numeric_limits<std::size_t>::max() / block_bytes()) {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": " + std::to_string(num_ids) + " blocks of " +
                                                 std::to_string(block_bytes()) +
                                                 " bytes exceed the address space");
  }
  if (staging_bytes != num_ids * block_bytes()) {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": staging buffer holds " +
                                                 std::to_string(staging_bytes) + " bytes, " + std::to_string(num_ids) +
                                                 " blocks need " + std::to_string(num_ids * block_bytes()));
  }
}

void PagedKVPool::check_sums(std::size_t staging_bytes, std::size_t num_sums, const char* what) {
  if (num_sums != segment_count(staging_bytes)) {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": " + std::to_string(staging_bytes) +
                                                 " bytes have " + std::to_string(segment_count(staging_bytes)) +
                                                 " segment sums, got room for " + std::to_string(num_sums));
  }
}

void PagedKVPool::move_block_summed(std::byte* staging, std::size_t offset, BlockId id, bool to_staging,
                                    std::span<std::uint64_t> sums, bool stream) const {
  const std::size_t bytes = spec_.layer_block_bytes();
  for (std::uint32_t layer = 0; layer < spec_.num_layers; ++layer) {
    for (bool value : {false, true}) {
      std::byte* block = block_data(layer, value, id);
      if (to_staging) {
        detail::copy_sum(staging + offset, block, bytes, offset, sums, stream);
      } else {
        detail::copy_sum(block, staging + offset, bytes, offset, sums, stream);
      }
      offset += bytes;
    }
  }
}

void PagedKVPool::gather_summed(std::span<const BlockId> ids_in, std::span<std::byte> out,
                                std::span<std::uint64_t> sums) const {
  const std::vector<BlockId> ids = checked_ids(ids_in, false, "gather_summed");
  check_staging(out.size(), ids.size(), "gather_summed");
  check_sums(out.size(), sums.size(), "gather_summed");
  reject_arena_overlap(out.data(), out.size(), false, "gather_summed");
  reject_arena_overlap(sums.data(), sums.size_bytes(), false, "gather_summed (sums)");
  reject_sums_overlap(out, sums, "gather_summed");
  if (on_device_) {
    for (std::size_t i = 0; i < ids.size(); ++i) move_block(out.data() + i * block_bytes(), ids[i], true, false, false);
    segment_sums(out, sums);
    return;
  }
  std::fill(sums.begin(), sums.end(), std::uint64_t{0});
  for (std::size_t i = 0; i < ids.size(); ++i) move_block_summed(out.data(), i * block_bytes(), ids[i], true, sums, false);
}

void PagedKVPool::scatter_summed(std::span<const std::byte> in, std::span<const BlockId> ids_in,
                                 std::span<std::uint64_t> sums) {
  const std::vector<BlockId> ids = checked_ids(ids_in, false, "scatter_summed");
  check_staging(in.size(), ids.size(), "scatter_summed");
  check_sums(in.size(), sums.size(), "scatter_summed");
  reject_repeats(ids, "scatter_summed");
  reject_arena_overlap(in.data(), in.size(), false, "scatter_summed");
  reject_arena_overlap(sums.data(), sums.size_bytes(), false, "scatter_summed (sums)");
  reject_sums_overlap(in, sums, "scatter_summed");
  // move_block* only read through the staging pointer in this direction.
  auto* staging = const_cast<std::byte*>(in.data());
  if (on_device_) {
    segment_sums(in, sums);
    for (std::size_t i = 0; i < ids.size(); ++i) move_block(staging + i * block_bytes(), ids[i], false, false, false);
    return;
  }
  std::fill(sums.begin(), sums.end(), std::uint64_t{0});
  // Streaming stores into the pool: the blocks are not read again soon by this thread, and they
  // skip the read-for-ownership of every destination line (measured 1.5-2.5x faster here).
  for (std::size_t i = 0; i < ids.size(); ++i) move_block_summed(staging, i * block_bytes(), ids[i], false, sums, true);
  detail::stream_fence();
}

namespace {
template <class Ptr>
void check_each(std::size_t num_ids, std::span<Ptr const> bufs, const char* what) {
  if (bufs.size() != num_ids) {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": " + std::to_string(bufs.size()) +
                                                 " buffers for " + std::to_string(num_ids) + " blocks");
  }
  for (std::size_t i = 0; i < bufs.size(); ++i) {
    if (bufs[i] == nullptr) {
      throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": buffer " + std::to_string(i) + " is null");
    }
  }
}
}  // namespace

void PagedKVPool::gather_each(std::span<const BlockId> ids_in, std::span<std::byte* const> outs,
                              bool out_on_device) const {
  const std::vector<BlockId> ids = checked_ids(ids_in, false, "gather_each");
  check_each(ids.size(), outs, "gather_each");
  for (std::byte* out : outs) reject_arena_overlap(out, block_bytes(), out_on_device, "gather_each");
  const bool stream = ids.size() * block_bytes() > kStreamMinTotalBytes;
  for (std::size_t i = 0; i < ids.size(); ++i) move_block(outs[i], ids[i], true, out_on_device, stream);
  detail::stream_fence();
}

void PagedKVPool::scatter_each(std::span<const std::byte* const> ins, std::span<const BlockId> ids_in,
                               bool in_on_device) {
  const std::vector<BlockId> ids = checked_ids(ids_in, false, "scatter_each");
  check_each(ids.size(), ins, "scatter_each");
  reject_repeats(ids, "scatter_each");
  for (const std::byte* in : ins) reject_arena_overlap(in, block_bytes(), in_on_device, "scatter_each");
  const bool stream = ids.size() * block_bytes() > kStreamMinTotalBytes;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    // move_block only reads through the pointer in this direction.
    move_block(const_cast<std::byte*>(ins[i]), ids[i], false, in_on_device, stream);
  }
  detail::stream_fence();
}

void PagedKVPool::allocate(std::span<BlockId> out) {
  if (!allocator_.allocate(out).ok()) {
    throw Error(ErrorCode::kPoolFull, "cannot allocate " + std::to_string(out.size()) + " blocks: " +
                                          std::to_string(allocator_.num_available()) + " of " +
                                          std::to_string(num_blocks()) + " are free within the budget of " +
                                          std::to_string(allocator_.limit()));
  }
}

void PagedKVPool::free(std::span<const BlockId> ids) {
  const BatchStatus status = allocator_.free(ids);
  if (status.ok()) return;
  const std::string which = "block id " + std::to_string(status.id) + " at position " + std::to_string(status.index);
  switch (status.code) {
    case ErrorCode::kDoubleFree:
      throw Error(ErrorCode::kDoubleFree,
                  "free: " + which + " is not allocated (double free); " +
                      (status.partial ? "it raced a concurrent free of the same block, and every other id was freed"
                                      : "nothing was freed"));
    case ErrorCode::kInvalidBlock:
      throw Error(status.code, "free: " + which + " is out of range [0, " + std::to_string(num_blocks()) +
                                   "); nothing was freed");
    default:
      throw Error(status.code, "free of " + std::to_string(ids.size()) + " ids: no scratch memory; nothing was freed");
  }
}

void PagedKVPool::incref(std::span<const BlockId> ids) {
  const BatchStatus status = allocator_.incref(ids);
  if (status.ok()) return;
  if (status.code != ErrorCode::kInvalidBlock) {
    throw Error(status.code, "incref of " + std::to_string(ids.size()) + " ids: no scratch memory; no count changed");
  }
  throw Error(ErrorCode::kInvalidBlock, "incref: block id " + std::to_string(status.id) + " at position " +
                                            std::to_string(status.index) + " is not allocated or out of range [0, " +
                                            std::to_string(num_blocks()) + "); no count changed");
}

void PagedKVPool::set_budget_bytes(std::size_t bytes) {
  const std::size_t blocks = bytes / block_bytes();
  if (blocks > num_blocks()) {
    throw Error(ErrorCode::kInvalidArgument, "budget of " + std::to_string(bytes) + " bytes (" +
                                                 std::to_string(blocks) + " blocks) exceeds the pool's " +
                                                 std::to_string(num_blocks()) + " blocks");
  }
  allocator_.set_limit(static_cast<std::uint32_t>(blocks));
}

bool PagedKVPool::can_admit_tokens(std::size_t num_tokens) const noexcept {
  const std::size_t blocks = (num_tokens + spec_.block_size - 1) / spec_.block_size;
  return blocks <= allocator_.num_available();
}

}  // namespace sagellm::kv
