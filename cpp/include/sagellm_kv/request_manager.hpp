// Request manager: the KV bookkeeping of running requests (the role of vLLM's KVCacheManager), in
// one native object that composes a BlockAllocator and an optional PrefixCache.
//
// Per request it keeps the token count, the block table (block i holds tokens [i*bs, (i+1)*bs)),
// the chained digests of its full blocks and the tokens of its trailing partial block, so that a
// scheduler step costs one call however many requests it touches.
//
// Life of a request:
//   admit   hash the prompt's full blocks, take the longest cached prefix (shared blocks, no
//           allocator reference of the request's own), allocate the rest, and publish the prompt's
//           full blocks in the cache (vLLM semantics: tokens scheduled in a step count as computed
//           once it runs). All or nothing under the allocator's budget.
//   append  new tokens of a running request (decode output, or the next prefill chunk): a block is
//           allocated when the last one fills, and every block that becomes full is hashed and
//           published. All or nothing.
//   finish / abort / preempt
//           the request's uses of cached blocks are released and its own blocks freed; blocks that
//           were published stay cached until evicted: publishing handed the request's allocator
//           reference on them to the cache (InsertOptions::adopt), and the request's use kept them
//           cached while it ran, so they are not the request's to free. The
//           request is forgotten: a preempted request is resumed by admitting it again with all its
//           tokens (its published blocks are then matched back).
//
// Blocks a running request holds are never evicted: the request holds one use on each cached block
// of its chain (matched or published by it). When the allocator is short, the manager evicts unused
// cached blocks (the cache's policy order) to make room, unless even all of them would not.
//
// Publishing is best effort: a block the cache cannot take (capacity full of blocks in use) stays
// private to the request and later publishes of that request retry from the first unpublished
// block. A block whose digest is already cached by another request stays a private duplicate (its
// KV is being computed anyway). Requests admitted in one batch do not share the blocks they
// introduce; the next step's admissions do.
//
// By default a prompt's match stops one token short of its end (`match_last_token = false`), so at
// least one token is always left to compute and its logits exist, as in vLLM.
//
// Errors: bad input (an unknown or repeated request id, an id already admitted, a request with no
// tokens) throws Error(kInvalidArgument) naming it, before anything changes. Not enough blocks is
// an expected outcome: the batch call returns BatchStatus{kPoolFull, index of the request that did
// not fit} and nothing changed, except match statistics/recency counted (cache content, not request
// state). A batch that would not fit even once every unused cached block were evicted (blocks in
// use above a limit lowered by BlockAllocator::set_limit count as missing) is refused before any is
// evicted; one that falls short all the same (other threads took blocks meanwhile, or
// cached blocks are also held elsewhere, so evicting them freed nothing) may have evicted some
// trying. admit and append make every
// allocation before they take a block, so a std::bad_alloc from them also changes nothing; only a
// publish that runs out of memory is absorbed (the blocks stay private, as above).
//
// Thread safety: every member function may be called from any number of threads at once; one
// internal mutex serialises them. Hashing of admitted prompts runs before that mutex is taken (one
// hasher per thread), so concurrent admits hash in parallel. The allocator and the cache may be used
// by others at the same time (they are thread-safe), but blocks and digests the manager holds must
// not be freed or released by anyone else.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "sagellm_kv/block_allocator.hpp"
#include "sagellm_kv/hashing.hpp"
#include "sagellm_kv/prefix_cache.hpp"

namespace sagellm::kv {

/// Caller-chosen identifier of a request; unique among the manager's running requests.
using RequestId = std::uint64_t;

/// Configuration of a `RequestManager`.
struct RequestManagerOptions {
  std::uint32_t block_size = 16;                       ///< tokens per block; > 0; equals the cache's
  HashAlgorithm hash_algorithm = HashAlgorithm::kSha256;
  bool match_last_token = false;  ///< false: a match covers at most num_tokens - 1 tokens (see above)

  /// Throws Error(kInvalidArgument) naming the first bad field.
  void validate() const;
};

/// One request of an `admit` batch. The views must stay valid during the call.
struct AdmitRequest {
  RequestId id = 0;
  std::span<const std::int32_t> tokens;  ///< the prompt (or all tokens of a resumed request)
  BlockHashKey key;                      ///< salt / extra key of the chain (hashing.hpp)
  /// Used when `tokens` is empty: reserve this many tokens whose ids are not known (a handle-style
  /// allocation, as the seed KVPool's). Such a request is never hashed, matched or published; its
  /// appends only count tokens.
  std::uint64_t num_opaque_tokens = 0;
  /// Optional: the digests of `tokens`' full blocks, from the root under `key` with the manager's
  /// algorithm, as hash_blocks computes them (a caller that hashed while reading the tokens). Used
  /// when it holds exactly one digest per full block, otherwise admit hashes `tokens` itself. The
  /// caller vouches for them: wrong digests make the cache serve wrong blocks.
  std::span<const BlockHash> digests{};
};

/// Counters since construction plus current sizes. A consistent snapshot.
struct RequestManagerStats {
  std::uint64_t admitted = 0;        ///< requests admitted
  std::uint64_t refused = 0;         ///< admit batches refused for lack of blocks
  std::uint64_t finished = 0;
  std::uint64_t aborted = 0;
  std::uint64_t preempted = 0;
  std::uint64_t queried_blocks = 0;  ///< blocks offered for matching at admission
  std::uint64_t hit_blocks = 0;      ///< of those, found cached
  std::uint64_t published_blocks = 0;///< blocks newly cached by the manager's requests
  std::uint64_t evicted_for_room = 0;///< cached blocks evicted because the allocator was short
  std::uint32_t running = 0;         ///< requests now
  std::uint64_t owned_blocks = 0;    ///< blocks the running requests hold an allocator reference on
                                     ///< (not the published ones: that reference is the cache's)
};

/// The request manager (see the file comment).
///
/// Thread safety: every member function may be called from any number of threads at once.
class RequestManager {
 public:
  /// `allocator` must outlive the manager; `cache` (null: no prefix caching, nothing is hashed)
  /// must use `allocator` and the same block size, and outlive the manager. Throws
  /// Error(kInvalidArgument) for bad options or a cache that does not fit.
  RequestManager(BlockAllocator& allocator, PrefixCache* cache, const RequestManagerOptions& options = {});

  /// Ends every running request as `abort` would.
  ~RequestManager();
  RequestManager(const RequestManager&) = delete;
  RequestManager& operator=(const RequestManager&) = delete;

  /// Admits every request of the batch or none. On success writes, per request, the number of its
  /// leading tokens found cached to `num_cached_tokens[i]` and appends its block table
  /// (ceil(num_tokens / block_size) ids) to `block_tables` when it is not null. Returns
  /// {kPoolFull, i} when request i (in order) did not fit; then no request was admitted.
  /// Throws Error(kInvalidArgument) for an id already running or repeated in the batch, an empty
  /// token list, or `num_cached_tokens` shorter than the batch.
  BatchStatus admit(std::span<const AdmitRequest> requests, std::span<std::uint32_t> num_cached_tokens,
                    std::vector<BlockId>* block_tables = nullptr);

  /// Appends tokens to running requests: request ids[i] gets tokens[offsets[i], offsets[i+1]).
  /// All or nothing: returns {kPoolFull, i} (nothing changed) when the blocks needed by requests
  /// 0..i do not fit. On success writes to `new_blocks[i]` how many blocks request i gained and
  /// appends their ids, in request order, to `new_block_ids` when it is not null. Throws
  /// Error(kInvalidArgument) for an unknown or repeated id, an empty token run, offsets that are
  /// not ids.size() + 1 non-decreasing values within `tokens`, or `new_blocks` too short.
  BatchStatus append(std::span<const RequestId> ids, std::span<const std::int32_t> tokens,
                     std::span<const std::size_t> offsets, std::span<std::uint32_t> new_blocks,
                     std::vector<BlockId>* new_block_ids = nullptr);

  /// Ends requests normally: releases their cached blocks' uses, frees their own blocks (published
  /// ones stay cached). All or nothing: an unknown or repeated id throws Error(kInvalidArgument).
  void finish(std::span<const RequestId> ids);

  /// As `finish`, counted as aborted.
  void abort(std::span<const RequestId> ids);

  /// As `finish`, counted as preempted; re-admit a request with all its tokens to resume it.
  /// Returns the total number of tokens the requests held.
  std::uint64_t preempt(std::span<const RequestId> ids);

  /// True when `id` is running.
  [[nodiscard]] bool contains(RequestId id) const;

  /// Tokens of running request `id`. Throws Error(kInvalidArgument) when unknown.
  [[nodiscard]] std::uint64_t num_tokens(RequestId id) const;

  /// Block table of running request `id`. Throws Error(kInvalidArgument) when unknown.
  [[nodiscard]] std::vector<BlockId> block_table(RequestId id) const;

  /// Writes the block tables of `ids` as rows of a row-major matrix: row i starts at
  /// out[i * row_stride], holds the table and then `pad` up to row_stride. Returns the longest
  /// table. Throws Error(kInvalidArgument) for an unknown id, a table longer than row_stride, or
  /// `out` shorter than ids.size() * row_stride; then nothing was written.
  std::uint32_t block_tables(std::span<const RequestId> ids, std::span<BlockId> out, std::size_t row_stride,
                             BlockId pad = -1) const;

  [[nodiscard]] RequestManagerStats stats() const;

  /// Ids of the running requests, in no particular order.
  [[nodiscard]] std::vector<RequestId> running() const;

  [[nodiscard]] const RequestManagerOptions& options() const noexcept { return options_; }
  [[nodiscard]] std::uint32_t block_size() const noexcept { return options_.block_size; }
  [[nodiscard]] BlockAllocator& allocator() const noexcept { return allocator_; }
  [[nodiscard]] PrefixCache* cache() const noexcept { return cache_; }

  /// Verifies internal invariants (each request's table covers its tokens, its digests match its
  /// full blocks, the allocator holds its blocks) and throws Error(kInternal) naming the first broken
  /// one. O(total blocks); for tests.
  void check_invariants() const;

 private:
  struct Impl;

  RequestManagerOptions options_;
  BlockAllocator& allocator_;
  PrefixCache* cache_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sagellm::kv
