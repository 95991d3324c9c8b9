// Paged KV pool: real KV memory for a model's attention, cut into fixed-size blocks.
//
// Memory layout (one arena from the device allocator):
//   [layer][K|V][block][token in block][kv head][head dim]
// so each layer's K (and V) is one contiguous array of shape
//   (num_blocks, block_size, num_kv_heads, head_dim)
// which is what a paged-attention kernel indexes through a block table.
//
// Staging layout used by gather/scatter (and the transfer wire format):
//   [block in list][layer][K|V][token][head][dim]
// so every block's bytes are contiguous and a transfer can be cut between any two blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/device.hpp"

namespace sagellm::kv {

/// Element type of the cache.
enum class DType : std::uint8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3, kInt8 = 4 };

/// Bytes per element of `dtype`.
[[nodiscard]] std::size_t dtype_size(DType dtype) noexcept;
/// Canonical short name: "fp32", "fp16", "bf16", "fp8", "int8".
[[nodiscard]] std::string_view dtype_name(DType dtype) noexcept;
/// Parses a dtype name (also accepts "float32", "float16", "bfloat16", "float8_e4m3fn").
/// Throws Error(kInvalidArgument) naming the value and the accepted names.
[[nodiscard]] DType parse_dtype(std::string_view name);

/// Shape of the cache of one model (or one tensor-parallel shard of it).
struct KVCacheSpec {
  std::uint32_t num_layers = 0;
  std::uint32_t num_kv_heads = 0;
  std::uint32_t head_dim = 0;
  DType dtype = DType::kFloat16;
  std::uint32_t block_size = 16;  ///< tokens per block

  /// Throws Error(kInvalidArgument) naming the first field that is zero or too large.
  void validate() const;
  /// Bytes of K (or of V) of one block in one layer.
  [[nodiscard]] std::size_t layer_block_bytes() const noexcept;
  /// Bytes of one block across all layers, K and V.
  [[nodiscard]] std::size_t block_bytes() const noexcept;

  bool operator==(const KVCacheSpec&) const = default;
};

/// Options for `PagedKVPool`.
struct PoolOptions {
  std::string device = "cpu";
  bool zero_fill = true;
  bool huge_pages = false;
  bool lock_memory = false;
};

/// Blocks of KV memory plus the allocator of their ids.
///
/// Thread safety: allocation, free and ref counting are lock-free and safe from any thread (see
/// BlockAllocator for the batch contract). Data movement (copy/gather/scatter) is safe
/// concurrently as long as no block that one call writes (a scatter's or copy's destination) is
/// read or written by another call at the same time: any number of calls may read one block at
/// once. The pool does not lock block contents; a block passes from its last holder's free to its
/// next owner's allocation ordered by the allocator (tests/cpp/kv_pool_stress_test.cpp). Every
/// call that takes a list of ids reads it exactly once, into a private copy, before checking it: a
/// caller changing its array meanwhile cannot make the pool touch memory outside the ids it
/// checked.
class PagedKVPool {
 public:
  /// Allocates `num_blocks` blocks of memory on `options.device`. Throws Error(kInvalidArgument)
  /// for a bad spec or zero blocks, Error(kUnknownDevice) / Error(kBackendUnavailable) for the
  /// device, Error(kMemoryExhausted) when the memory cannot be had.
  PagedKVPool(const KVCacheSpec& spec, std::uint32_t num_blocks, const PoolOptions& options = {});

  [[nodiscard]] const KVCacheSpec& spec() const noexcept { return spec_; }
  [[nodiscard]] const DeviceId& device() const noexcept { return device_; }
  /// kHost for a "cpu" pool, kDevice for an accelerator's.
  [[nodiscard]] MemoryKind memory_kind() const noexcept { return arena_.kind(); }
  [[nodiscard]] std::uint32_t num_blocks() const noexcept { return allocator_.num_blocks(); }
  [[nodiscard]] std::size_t block_bytes() const noexcept { return spec_.block_bytes(); }
  [[nodiscard]] std::size_t total_bytes() const noexcept { return arena_.size(); }

  /// Allocates `out.size()` blocks (reference count 1). Throws Error(kPoolFull) naming the shortfall
  /// when not enough are free within the budget; then nothing was taken.
  void allocate(std::span<BlockId> out);
  /// Drops one reference per id (see BlockAllocator::free). Throws Error(kInvalidBlock) or
  /// Error(kDoubleFree) naming the id and its position; then no count changed, except when a double
  /// free raced the last legitimate free of the same block (the message then says the other ids
  /// were freed; see the batch contract in block_allocator.hpp).
  void free(std::span<const BlockId> ids);
  /// Adds one reference per id. Throws Error(kInvalidBlock) naming the id; then no count changed.
  void incref(std::span<const BlockId> ids);
  /// Blocks that can be allocated now (free and within the budget).
  [[nodiscard]] std::uint32_t num_free_blocks() const noexcept { return allocator_.num_available(); }

  [[nodiscard]] BlockAllocator& allocator() noexcept { return allocator_; }
  [[nodiscard]] const BlockAllocator& allocator() const noexcept { return allocator_; }

  /// Start of layer `layer`'s K (`value == false`) or V cache. Throws Error(kInvalidArgument)
  /// when `layer` is out of range.
  [[nodiscard]] std::byte* layer_data(std::uint32_t layer, bool value) const;
  /// Address of block `id` in layer `layer`'s K or V cache (no allocation check).
  [[nodiscard]] std::byte* block_data(std::uint32_t layer, bool value, BlockId id) const;

  /// Copies block contents src[i] -> dst[i] for all layers, K and V (copy-on-write). Ids must be in
  /// range and allocated, and the lists of equal length. The pairs must not depend on each other's
  /// order: a destination may appear only once, and never as the source of another pair (a pair
  /// with src[i] == dst[i] is a no-op). So the result equals copying from a snapshot taken before
  /// the call. Throws Error(kInvalidBlock/kInvalidArgument) naming the id before copying anything.
  void copy_blocks(std::span<const BlockId> src, std::span<const BlockId> dst);

  /// Writes the blocks `ids` into `out` in staging layout. `out` must hold
  /// `ids.size() * block_bytes()` bytes of host memory (or device memory when
  /// `out_on_device`). Ids must be in range (allocation is not required: a caller may gather
  /// before publishing). Throws Error(kInvalidArgument/kInvalidBlock) before touching `out`, also
  /// when `out` shares memory with the pool's blocks (the result would depend on the copy order).
  void gather(std::span<const BlockId> ids, std::span<std::byte> out, bool out_on_device = false) const;

  /// Inverse of gather: writes `in` (staging layout) into the blocks `ids`. An id may appear only
  /// once (Error(kInvalidArgument) naming both positions, before anything is written), so the
  /// result does not depend on the order of the writes; for the same reason `in` may not share
  /// memory with the pool's blocks.
  void scatter(std::span<const std::byte> in, std::span<const BlockId> ids, bool in_on_device = false);

  /// gather into host memory computing, in the same pass over the bytes, the segment sums of `out`
  /// (sagellm_kv/segment_sum.hpp) into `sums`, which must hold exactly segment_count(out.size())
  /// entries. Same checks as gather, plus that size and that `sums` shares memory with neither `out`
  /// nor the pool, all before anything is written. Plain stores:
  /// `out` is meant to be read next (sent, or scattered by a peer) while it is still in cache. A
  /// device pool copies first and sums `out` afterwards (two passes).
  void gather_summed(std::span<const BlockId> ids, std::span<std::byte> out, std::span<std::uint64_t> sums) const;

  /// scatter from host memory computing, in the same pass, the segment sums of `in` as it was read:
  /// the sums describe exactly the bytes that went into the blocks, even when another process may
  /// write `in` meanwhile (a shared staging ring). Same checks as scatter, plus the size of `sums`
  /// and that it shares memory with neither `in` nor the pool, all before anything is written. A
  /// device pool sums `in` first, then copies (two passes).
  void scatter_summed(std::span<const std::byte> in, std::span<const BlockId> ids, std::span<std::uint64_t> sums);

  /// Like gather, but block `ids[i]` goes to its own buffer `outs[i]` of block_bytes() (e.g. the
  /// slots of a host tier), host memory unless `out_on_device`. Same checks as gather, before any
  /// byte moves; also Error(kInvalidArgument) when the lengths differ or a buffer is null.
  void gather_each(std::span<const BlockId> ids, std::span<std::byte* const> outs, bool out_on_device = false) const;

  /// Inverse of gather_each: block `ids[i]` receives `ins[i]`. Same checks as scatter.
  void scatter_each(std::span<const std::byte* const> ins, std::span<const BlockId> ids, bool in_on_device = false);

  /// Budget in blocks (at most num_blocks); allocation beyond it is refused with kPoolFull.
  void set_budget_blocks(std::uint32_t blocks) { allocator_.set_limit(blocks); }
  [[nodiscard]] std::uint32_t budget_blocks() const noexcept { return allocator_.limit(); }
  /// Sets the budget in bytes, rounded down to whole blocks.
  void set_budget_bytes(std::size_t bytes);
  /// True when `num_tokens` more tokens (rounded up to blocks) can be allocated now.
  [[nodiscard]] bool can_admit_tokens(std::size_t num_tokens) const noexcept;

 private:
  [[nodiscard]] std::vector<BlockId> checked_ids(std::span<const BlockId> ids, bool must_be_allocated,
                                                 const char* what) const;
  void move_block(std::byte* staging, BlockId id, bool to_staging, bool staging_on_device, bool stream) const;
  void move_block_summed(std::byte* staging, std::size_t offset, BlockId id, bool to_staging,
                         std::span<std::uint64_t> sums, bool stream) const;
  void check_staging(std::size_t staging_bytes, std::size_t num_ids, const char* what) const;
  static void check_sums(std::size_t staging_bytes, std::size_t num_sums, const char* what);
  // Error(kInvalidArgument) when `bytes` at `staging` (device memory when `staging_on_device`)
  // overlap the arena: a copy between the blocks and a view of them depends on its order.
  void reject_arena_overlap(const void* staging, std::size_t bytes, bool staging_on_device, const char* what) const;

  KVCacheSpec spec_;
  DeviceId device_;
  bool on_device_;  // the arena is accelerator memory (decided once, not per block)
  std::shared_ptr<DeviceAllocator> device_allocator_;
  Allocation arena_;
  BlockAllocator allocator_;
};

}  // namespace sagellm::kv
