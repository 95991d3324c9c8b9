#include "sagellm_kv/request_manager.hpp"

#include <algorithm>
#include <cassert>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>

#include "allocator/free_held.hpp"
#include "common/grow.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv {
namespace {

// Tokens of a partial block reserved per request at admit (a whole block for any usual block size).
constexpr std::size_t kTailReserveTokens = 4096;
// Finished requests whose records (map node and vectors) are kept for the next admits, and the
// most blocks' worth of room a kept record holds on to (beyond it its vectors are given back).
constexpr std::size_t kSpareRequests = 16;
constexpr std::size_t kSpareBlocks = 1024;

// Empties `v`, keeping its room unless it exceeds `limit` elements (then it is given back).
template <class Vector>
void clear_keeping(Vector& v, std::size_t limit) noexcept {
  if (v.capacity() > limit) {
    Vector().swap(v);
  } else {
    v.clear();
  }
}

std::string id_text(RequestId id) { return "request " + std::to_string(id); }

// Stored KV events carry a block's token ids, which routers read as unsigned 32-bit integers: with
// events on, a negative id is refused before anything changes (the cache's insert would refuse it
// when the block is published, too late to tell the caller).
void refuse_negative_token(std::span<const std::int32_t> tokens, const char* call, RequestId id) {
  const auto bad = std::ranges::find_if(tokens, [](std::int32_t t) { return t < 0; });
  if (bad == tokens.end()) return;
  throw Error(ErrorCode::kInvalidArgument, std::string(call) + ": " + id_text(id) + " has token id " +
                                               std::to_string(*bad) + " at position " +
                                               std::to_string(bad - tokens.begin()) +
                                               ": negative ids cannot go into KV events (unsigned 32-bit there)");
}

std::size_t blocks_for(std::uint64_t tokens, std::uint32_t block_size) {
  return static_cast<std::size_t>((tokens + block_size - 1) / block_size);
}

// One running request.
struct Request {
  std::vector<BlockId> blocks;        // block table
  std::vector<BlockHash> digests;     // digests of the full blocks (cache present only)
  std::vector<std::int32_t> tail;     // tokens of the trailing partial block (cache present only)
  std::vector<std::int32_t> tokens;   // every token, kept only when the cache emits events (a stored
                                      // event carries its blocks' tokens)
  std::string salt;                   // chain key, kept for blocks that fill later
  std::string extra;
  std::uint64_t num_tokens = 0;
  std::uint32_t num_shared = 0;       // leading blocks matched from the cache: no allocator ref of ours
  std::uint32_t num_held = 0;         // leading digests we hold a cache use on (>= num_shared)
  // Block positions [first, second) whose allocator reference the cache adopted when we published
  // them (InsertOptions::adopt): cached with our blocks, kept by our use, no reference of ours.
  // Ascending, within [num_shared, num_held); adjacent runs are merged, so usually one.
  std::vector<std::pair<std::uint32_t, std::uint32_t>> adopted;
  std::uint64_t visit = 0;            // last batch call that named it: finds repeated ids in O(1)
  bool opaque = false;                // admitted by count: token ids unknown, never hashed

  [[nodiscard]] BlockHashKey key() const noexcept { return {salt, extra}; }
  // Back to a default request, keeping (bounded) room for the next one to reuse.
  void recycle(std::uint32_t block_size) noexcept {
    clear_keeping(blocks, kSpareBlocks);
    clear_keeping(digests, kSpareBlocks);
    clear_keeping(tail, std::min<std::size_t>(block_size, kTailReserveTokens));
    clear_keeping(tokens, kSpareBlocks * block_size);
    clear_keeping(adopted, 16);
    clear_keeping(salt, 64);
    clear_keeping(extra, 64);
    num_tokens = 0;
    num_shared = num_held = 0;
    visit = 0;
    opaque = false;
  }
  // Calls f(span) for each run of blocks we hold an allocator reference on: the table after the
  // shared prefix, less the adopted runs.
  template <class F>
  void for_each_own_run(const F& f) const {
    std::size_t at = num_shared;
    for (const auto& [first, end] : adopted) {
      if (first > at) f(std::span<const BlockId>(blocks).subspan(at, first - at));
      at = end;
    }
    if (blocks.size() > at) f(std::span<const BlockId>(blocks).subspan(at));
  }
  // Records that the cache adopted positions [first, end); room was reserved (prepare phases).
  void add_adopted(std::uint32_t first, std::uint32_t end) noexcept {
    if (first == end) return;
    if (!adopted.empty() && adopted.back().second == first) {
      adopted.back().second = end;
    } else {
      assert(adopted.size() < adopted.capacity());
      adopted.emplace_back(first, end);
    }
  }
};


using RequestMap = std::unordered_map<RequestId, Request>;

// Per-thread scratch for hashing prompts outside the manager's mutex.
struct AdmitScratch {
  std::vector<BlockHash> digests;
  std::vector<std::size_t> digest_offsets;
};

}  // namespace

void RequestManagerOptions::validate() const {
  if (block_size == 0) throw Error(ErrorCode::kInvalidArgument, "block_size must be > 0, got 0");
  if (!hash_algorithm_available(hash_algorithm)) {
    throw Error(ErrorCode::kInvalidArgument,
                "hash algorithm " + std::string(hash_algorithm_name(hash_algorithm)) + " is not built in");
  }
}

struct RequestManager::Impl {
  BlockAllocator& allocator;
  PrefixCache* cache;
  std::uint32_t block_size;
  HashAlgorithm hash_algorithm;
  bool match_last_token;
  bool keep_tokens;  // the cache emits events: stored events need the published blocks' tokens

  mutable std::mutex mutex;
  RequestMap requests;
  // Records of finished requests, reused by admit: their map nodes and vectors come without
  // allocating. Capacity kSpareRequests, reserved up front, so a finish never allocates to keep one.
  std::vector<RequestMap::node_type> spare;
  RequestMap staged;  // admit: the batch's requests until the commit moves them to `requests`
  RequestManagerStats counters;
  std::uint64_t owned_blocks = 0;
  // Scratch reused across calls (guarded by `mutex`).
  std::vector<BlockId> ids;
  std::vector<std::uint32_t> matched;
  std::vector<std::size_t> need;
  std::vector<Request*> targets;
  std::vector<BlockHash> new_digests;  // append: digests of the blocks the requests fill
  std::vector<std::size_t> digest_at;  // append: request i's new digests start at digest_at[i]
  std::vector<std::int32_t> joined;    // append: a request's tail, then its new tokens
  std::vector<RequestId> sorted_ids;   // admit: the batch's ids, sorted to find a repeated one
  std::uint64_t visit = 0;

  explicit Impl(RequestManager& s)
      : allocator(s.allocator_),
        cache(s.cache_),
        block_size(s.options_.block_size),
        hash_algorithm(s.options_.hash_algorithm),
        match_last_token(s.options_.match_last_token),
        keep_tokens(s.cache_ != nullptr && s.cache_->options().event_queue_capacity != 0) {
    spare.reserve(kSpareRequests);
  }

  Request& find(RequestId id) {
    const auto it = requests.find(id);
    if (it == requests.end()) throw Error(ErrorCode::kInvalidArgument, id_text(id) + " is not running");
    return it->second;
  }
  const Request& find(RequestId id) const {
    const auto it = requests.find(id);
    if (it == requests.end()) throw Error(ErrorCode::kInvalidArgument, id_text(id) + " is not running");
    return it->second;
  }

  // Takes n blocks into out, evicting unused cached blocks when the allocator is short; evicts
  // nothing when even all of them would not make room (a refusal leaves the cache's content alone).
  bool allocate(std::span<BlockId> out) {
    if (allocator.allocate(out).ok()) return true;
    const auto want = static_cast<std::int64_t>(out.size());
    if (cache == nullptr || want > reach()) return false;
    for (;;) {
      const std::int64_t short_by = std::clamp<std::int64_t>(want - headroom(), 1, std::numeric_limits<std::uint32_t>::max());
      const std::uint32_t evicted = cache->evict(static_cast<std::uint32_t>(short_by));
      counters.evicted_for_room += evicted;
      if (allocator.allocate(out).ok()) return true;
      if (evicted == 0) return false;
    }
  }

  // Blocks the allocator can hand out now, signed: under a limit lowered below the blocks in use it
  // is short by the excess (num_available() reads 0 then), which evicted blocks make up for first.
  // Two reads, so a snapshot only while no set_limit runs; an estimate for deciding to evict.
  [[nodiscard]] std::int64_t headroom() const noexcept {
    return static_cast<std::int64_t>(allocator.limit()) - static_cast<std::int64_t>(allocator.num_allocated());
  }

  // How many blocks the allocator could give once every unused cached block were evicted (negative
  // when even that leaves it short): an estimate from above (a cached block that is also held
  // elsewhere frees nothing when evicted).
  [[nodiscard]] std::int64_t reach() const {
    std::int64_t n = headroom();
    if (cache != nullptr) {
      const PrefixCacheStats st = cache->stats();
      n += std::int64_t{st.cached_blocks} - std::int64_t{st.in_use_blocks};
    }
    return n;
  }

  // Hashes the `full` blocks that request `r`'s tail and `run` complete into new_digests[at...],
  // for append's commit to take (hashing may allocate: it must not run after blocks are taken).
  void prepare_digests(const Request& r, std::span<const std::int32_t> run, std::size_t full, std::size_t at) {
    joined.assign(r.tail.begin(), r.tail.end());
    joined.insert(joined.end(), run.begin(), run.begin() + static_cast<std::ptrdiff_t>(full * block_size - r.tail.size()));
    new_digests.resize(at + full);
    const BlockHash parent = r.digests.empty() ? kRootBlockHash : r.digests.back();
    // The salt belongs to the chain's first block only; the hasher applies it when parent is the root.
    const BlockHashKey key{r.digests.empty() ? std::string_view(r.salt) : std::string_view{}, r.extra};
    (void)hash_blocks(hash_algorithm, joined, block_size, parent, key, std::span<BlockHash>(new_digests).subspan(at));
  }

  // Marks `r` as named by the current batch call; false when it already was (a repeated id).
  bool visit_once(Request& r) noexcept {
    if (r.visit == visit) return false;
    r.visit = visit;
    return true;
  }

  // Publishes the request's full blocks from its first unpublished one. Best effort: the cache
  // refuses only on a broken protocol (someone else released our digests), and then the blocks
  // simply stay private.
  void publish(Request& r) noexcept {
    try {
      publish_or_throw(r);
    } catch (const Error&) {
      assert(!"publishing a request's blocks was refused");
    } catch (...) {
      // No memory (or a throwing clock_ns of the cache's options): the cache changed nothing (its
      // insert has the strong guarantee whatever throws), so the blocks stay private and the
      // request's next publish retries them.
    }
  }
  void publish_or_throw(Request& r) {
    const auto full = static_cast<std::uint32_t>(r.digests.size());
    if (cache == nullptr || r.num_held >= full) return;
    InsertOptions o;
    o.acquire = true;
    o.trusted_chain = true;  // our own chain of digests over blocks we just allocated
    // The cache takes our reference on the blocks it caches (no incref now, no free at finish);
    // our use keeps them cached until release.
    o.adopt = true;
    if (r.num_held != 0) o.parent = r.digests[r.num_held - 1];
    const std::span<const BlockHash> digests = std::span<const BlockHash>(r.digests).subspan(r.num_held);
    const std::span<const BlockId> blocks = std::span<const BlockId>(r.blocks).subspan(r.num_held, digests.size());
    if (keep_tokens) {
      o.token_ids = std::span<const std::int32_t>(r.tokens).subspan(std::size_t{r.num_held} * block_size,
                                                                    digests.size() * block_size);
      if (!r.extra.empty()) o.extra_key = std::string_view(r.extra);
      if (!r.salt.empty()) o.cache_salt = std::string_view(r.salt);  // every block of a salted request
    }
    const InsertResult res = cache->insert(digests, blocks, o);
    r.add_adopted(r.num_held + res.num_redundant, r.num_held + res.num_cached());
    r.num_held += res.num_cached();
    owned_blocks -= res.num_inserted;
    counters.published_blocks += res.num_inserted;
  }

  // Returns a request's cache uses and blocks. Its uses form a chain from the root, and its own
  // blocks are allocated by construction, so neither call can be refused; neither allocates
  // (PrefixCache::release never does, free_held falls back to stack-sized pieces), so no lack of
  // memory can stop a finish, abort or preempt half way. The adopted blocks are the cache's: only
  // our uses of them go.
  void release(Request& r) noexcept {
    if (cache != nullptr && r.num_held != 0) {
      try {
        cache->release(std::span<const BlockHash>(r.digests).first(r.num_held));
      } catch (...) {  // Error(kRefCountUnderflow), or no memory to build its message
        assert(!"a digest held by the request manager was released outside it");
      }
    }
    r.for_each_own_run([&](std::span<const BlockId> own) noexcept {
      [[maybe_unused]] const BatchStatus st = detail::free_held(allocator, own);
      assert(st.ok());
      owned_blocks -= own.size();
    });
  }

  // Keeps a finished (or never admitted) request's record for the next admits while the reserved
  // room lasts; beyond it the node is dropped.
  void keep_spare(RequestMap::node_type node) noexcept {
    if (spare.size() < spare.capacity()) {  // within the reserved room: no allocation
      node.mapped().recycle(block_size);
      spare.push_back(std::move(node));
    }
  }

  // An admit that did not commit (refused, or thrown out of) gives the records it staged back to
  // `spare`: the ones it took from there and fresh ones alike, so the next admits reuse them.
  void unstage() noexcept {
    while (!staged.empty()) keep_spare(staged.extract(staged.begin()));
  }

  std::uint64_t end_requests(std::span<const RequestId> ids_in, std::uint64_t& counter) {
    const std::lock_guard lock(mutex);
    targets.clear();
    ++visit;
    for (RequestId id : ids_in) {
      Request& r = find(id);
      if (!visit_once(r)) throw Error(ErrorCode::kInvalidArgument, id_text(id) + " appears twice in one call");
      targets.push_back(&r);
    }
    std::uint64_t tokens = 0;
    for (std::size_t i = 0; i < ids_in.size(); ++i) {
      tokens += targets[i]->num_tokens;
      release(*targets[i]);
      keep_spare(requests.extract(ids_in[i]));
    }
    counter += ids_in.size();
    return tokens;
  }
};

RequestManager::RequestManager(BlockAllocator& allocator, PrefixCache* cache, const RequestManagerOptions& options)
    : options_(options), allocator_(allocator), cache_(cache) {
  options_.validate();
  if (cache != nullptr) {
    if (cache->block_size() != options_.block_size) {
      throw Error(ErrorCode::kInvalidArgument, "prefix cache block_size " + std::to_string(cache->block_size()) +
                                                   " differs from the manager's " +
                                                   std::to_string(options_.block_size));
    }
    if (cache->allocator() != &allocator) {
      throw Error(ErrorCode::kInvalidArgument, "the prefix cache must use the manager's block allocator");
    }
    (void)BlockHasher(options_.hash_algorithm);  // fails now, not on the first admit
  }
  impl_ = std::make_unique<Impl>(*this);
}

RequestManager::~RequestManager() {
  for (auto& [id, r] : impl_->requests) impl_->release(r);
}

BatchStatus RequestManager::admit(std::span<const AdmitRequest> requests, std::span<std::uint32_t> num_cached_tokens,
                                  std::vector<BlockId>* block_tables) {
  const std::size_t n = requests.size();
  if (num_cached_tokens.size() < n) {
    throw Error(ErrorCode::kInvalidArgument, "admit: num_cached_tokens holds " +
                                                 std::to_string(num_cached_tokens.size()) + " entries for " +
                                                 std::to_string(n) + " requests");
  }
  const std::uint32_t bs = options_.block_size;
  const auto count_of = [&](std::size_t i) -> std::uint64_t {
    return requests[i].tokens.empty() ? requests[i].num_opaque_tokens : requests[i].tokens.size();
  };
  for (std::size_t i = 0; i < n; ++i) {
    if (count_of(i) == 0) {
      throw Error(ErrorCode::kInvalidArgument, "admit: " + id_text(requests[i].id) + " has no tokens");
    }
    if (count_of(i) > (std::uint64_t{BlockAllocator::kMaxBlocks} * bs)) {
      throw Error(ErrorCode::kInvalidArgument, "admit: " + id_text(requests[i].id) + " has " +
                                                   std::to_string(count_of(i)) + " tokens, more than any pool holds");
    }
    if (impl_->keep_tokens) refuse_negative_token(requests[i].tokens, "admit", requests[i].id);
  }
  // Hash every prompt before taking the mutex: the expensive part runs in parallel across threads.
  thread_local AdmitScratch scratch;
  scratch.digest_offsets.assign(1, 0);
  if (cache_ != nullptr) {
    std::size_t total = 0;
    for (const AdmitRequest& r : requests) total += num_full_blocks(r.tokens.size(), bs);
    scratch.digests.resize(total);
    std::size_t at = 0;
    for (const AdmitRequest& r : requests) {
      const std::size_t full = num_full_blocks(r.tokens.size(), bs);
      if (r.digests.size() == full) {
        std::copy(r.digests.begin(), r.digests.end(), scratch.digests.begin() + static_cast<std::ptrdiff_t>(at));
        at += full;
      } else {
        at += hash_blocks(options_.hash_algorithm, r.tokens, bs, kRootBlockHash, r.key,
                          std::span<BlockHash>(scratch.digests).subspan(at));
      }
      scratch.digest_offsets.push_back(at);
    }
  }
  const auto digests_of = [&](std::size_t i) {
    if (cache_ == nullptr) return std::span<const BlockHash>{};
    return std::span<const BlockHash>(scratch.digests)
        .subspan(scratch.digest_offsets[i], scratch.digest_offsets[i + 1] - scratch.digest_offsets[i]);
  };

  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  // --- checks ------------------------------------------------------------------------------------
  for (std::size_t i = 0; i < n; ++i) {
    const RequestId id = requests[i].id;
    if (s.requests.contains(id)) throw Error(ErrorCode::kInvalidArgument, "admit: " + id_text(id) + " is already running");
  }
  if (n > 1) {
    std::vector<RequestId>& sorted = s.sorted_ids;
    sorted.resize(n);
    for (std::size_t i = 0; i < n; ++i) sorted[i] = requests[i].id;
    std::sort(sorted.begin(), sorted.end());
    if (const auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end()) {
      throw Error(ErrorCode::kInvalidArgument, "admit: " + id_text(*dup) + " appears twice in one call");
    }
  }
  // --- prepare: every allocation the commit needs, before any block is taken or use held ------------
  s.matched.assign(n, 0);
  s.need.assign(n + 1, 0);
  std::size_t total_blocks = 0;
  for (std::size_t i = 0; i < n; ++i) {
    total_blocks += blocks_for(count_of(i), bs);
    if (total_blocks > allocator_.num_blocks()) {  // can never fit: refuse before reserving anything
      ++s.counters.refused;
      return {ErrorCode::kPoolFull, static_cast<std::int64_t>(i)};
    }
  }
  s.ids.resize(total_blocks);
  // The requests are built here, in map nodes of their own (kept ones first: see `spare`); the
  // commit moves the nodes over. An admit refused or thrown out of from here on gives them back.
  RequestMap& staged = s.staged;
  struct Unstage {
    Impl& s;
    ~Unstage() { s.unstage(); }  // after the commit: nothing left to give back
  } const unstage_on_exit{s};
  detail::grow_buckets_to(staged, n);
  for (std::size_t i = 0; i < n; ++i) {
    const AdmitRequest& in = requests[i];
    Request* slot = nullptr;
    if (!s.spare.empty()) {
      RequestMap::node_type node = std::move(s.spare.back());
      s.spare.pop_back();
      node.key() = in.id;
      slot = &staged.insert(std::move(node)).position->second;  // the buckets are grown: no rehash
    } else {
      slot = &staged[in.id];
    }
    Request& r = *slot;
    r.blocks.reserve(blocks_for(count_of(i), bs));
    r.num_tokens = count_of(i);
    r.opaque = in.tokens.empty();
    if (cache_ != nullptr && !r.opaque) {
      const auto d = digests_of(i);
      r.digests.assign(d.begin(), d.end());
      // Room for a block's decode tokens, capped: the tail grows as tokens come (append reserves
      // before it commits), and a block of 2^31 tokens must not cost 8 GiB per request up front.
      r.tail.reserve(std::min<std::size_t>(bs, kTailReserveTokens));
      r.tail.assign(in.tokens.begin() + static_cast<std::ptrdiff_t>(d.size() * bs), in.tokens.end());
      r.salt = in.key.salt;
      r.extra = in.key.extra;
      r.adopted.reserve(1);  // the commit's publish records at most one run
      if (s.keep_tokens) r.tokens.assign(in.tokens.begin(), in.tokens.end());
    }
  }
  detail::grow_buckets_to(s.requests, s.requests.size() + n);
  if (block_tables != nullptr) detail::grow_to(*block_tables, block_tables->size() + total_blocks);
  // --- reserve: match every request, then take the blocks they still need; undo everything on a
  // refusal or a throw. A batch that would not fit even once every unused cached block were evicted
  // is refused before anything is evicted.
  std::size_t num_matched = 0;    // requests [0, num_matched) hold their match
  std::size_t num_allocated = 0;  // requests [0, num_allocated) hold their own blocks too
  const auto own_blocks = [&](std::size_t i) {
    return std::span<BlockId>(s.ids).subspan(s.need[i] + s.matched[i], s.need[i + 1] - s.need[i] - s.matched[i]);
  };
  const auto unreserve = [&]() noexcept {  // in reverse order
    for (std::size_t j = num_matched; j-- > 0;) {
      if (cache_ != nullptr && s.matched[j] != 0) {
        try {
          cache_->release(digests_of(j).first(s.matched[j]));
        } catch (...) {
          assert(!"releasing a match just taken was refused");
        }
      }
      if (j < num_allocated) {
        [[maybe_unused]] const BatchStatus st = detail::free_held(allocator_, own_blocks(j));
        assert(st.ok());
      }
    }
  };
  const auto refuse = [&](std::size_t i) noexcept {
    unreserve();
    ++s.counters.refused;
    return BatchStatus{ErrorCode::kPoolFull, static_cast<std::int64_t>(i)};
  };
  try {
    std::size_t at = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t blocks = blocks_for(count_of(i), bs);
      std::uint32_t m = 0;
      if (cache_ != nullptr && !requests[i].tokens.empty()) {
        const std::size_t limit =
            s.match_last_token ? digests_of(i).size() : num_full_blocks(requests[i].tokens.size() - 1, bs);
        m = cache_->match(digests_of(i).first(limit), std::span<BlockId>(s.ids).subspan(at, blocks));
      }
      s.matched[i] = m;
      num_matched = i + 1;
      at += blocks;
      s.need[i + 1] = at;
    }
    std::uint64_t wanted = 0;
    for (std::size_t i = 0; i < n; ++i) wanted += own_blocks(i).size();
    if (wanted > allocator_.num_available()) {
      const std::int64_t reach = s.reach();
      std::int64_t sum = 0;
      for (std::size_t i = 0; i < n; ++i) {
        sum += static_cast<std::int64_t>(own_blocks(i).size());
        if (sum > reach) return refuse(i);
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (!s.allocate(own_blocks(i))) return refuse(i);  // may evict: may throw
      num_allocated = i + 1;
    }
  } catch (...) {
    unreserve();
    throw;
  }
  // --- commit: allocates nothing (the nodes, tables and map buckets were made above) ---------------
  for (std::size_t i = 0; i < n; ++i) {
    auto node = staged.extract(requests[i].id);
    Request& r = node.mapped();
    r.blocks.assign(s.ids.begin() + static_cast<std::ptrdiff_t>(s.need[i]),
                    s.ids.begin() + static_cast<std::ptrdiff_t>(s.need[i + 1]));
    r.num_shared = r.num_held = s.matched[i];
    if (cache_ != nullptr && !r.opaque) {
      s.counters.queried_blocks += r.digests.size();
      s.counters.hit_blocks += r.num_shared;
    }
    s.owned_blocks += r.blocks.size() - r.num_shared;
    num_cached_tokens[i] = r.num_shared * bs;
    if (block_tables != nullptr) block_tables->insert(block_tables->end(), r.blocks.begin(), r.blocks.end());
    Request& stored = s.requests.insert(std::move(node)).position->second;
    s.publish(stored);
  }
  s.counters.admitted += n;
  return {};
}

BatchStatus RequestManager::append(std::span<const RequestId> ids, std::span<const std::int32_t> tokens,
                                   std::span<const std::size_t> offsets, std::span<std::uint32_t> new_blocks,
                                   std::vector<BlockId>* new_block_ids) {
  const std::size_t n = ids.size();
  if (offsets.size() != n + 1 || offsets[0] != 0 || offsets[n] > tokens.size()) {
    throw Error(ErrorCode::kInvalidArgument, "append: offsets must be " + std::to_string(n + 1) +
                                                 " values from 0 to at most " + std::to_string(tokens.size()));
  }
  if (new_blocks.size() < n) {
    throw Error(ErrorCode::kInvalidArgument, "append: new_blocks holds " + std::to_string(new_blocks.size()) +
                                                 " entries for " + std::to_string(n) + " requests");
  }
  const std::uint32_t bs = options_.block_size;
  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  // --- checks and prepare: every allocation, and the hashing, before any block is taken -------------
  s.targets.resize(n);
  s.digest_at.assign(n + 1, 0);
  ++s.visit;
  std::size_t total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (offsets[i + 1] <= offsets[i]) {
      throw Error(ErrorCode::kInvalidArgument, "append: " + id_text(ids[i]) + " at position " + std::to_string(i) +
                                                   (offsets[i + 1] == offsets[i] ? " has no tokens" : ": offsets decrease"));
    }
    Request& r = s.find(ids[i]);
    if (!s.visit_once(r)) {
      throw Error(ErrorCode::kInvalidArgument, "append: " + id_text(ids[i]) + " appears twice in one call");
    }
    s.targets[i] = &r;
    const std::size_t have = r.blocks.size();
    const auto run = tokens.subspan(offsets[i], offsets[i + 1] - offsets[i]);
    if (s.keep_tokens && !r.opaque) refuse_negative_token(run, "append", ids[i]);
    const std::size_t want = blocks_for(r.num_tokens + run.size(), bs);
    // Room for the commit phase now, so it cannot fail after blocks are taken.
    detail::grow_to(r.blocks, want);
    std::size_t full = 0;
    if (cache_ != nullptr && !r.opaque) {
      detail::grow_to(r.tail, r.tail.size() + run.size());
      if (s.keep_tokens) detail::grow_to(r.tokens, r.tokens.size() + run.size());
      full = (r.tail.size() + run.size()) / bs;
      detail::grow_to(r.digests, r.digests.size() + full);
      if (full != 0) {
        detail::grow_to(r.adopted, r.adopted.size() + 1);  // the commit's publish: at most one run
        s.prepare_digests(r, run, full, s.digest_at[i]);
      }
    }
    s.digest_at[i + 1] = s.digest_at[i] + full;
    new_blocks[i] = static_cast<std::uint32_t>(want - have);
    total += want - have;
  }
  if (new_block_ids != nullptr) detail::grow_to(*new_block_ids, new_block_ids->size() + total);
  s.ids.resize(total);
  // --- reserve -----------------------------------------------------------------------------------
  if (total != 0 && !s.allocate(s.ids)) {
    // Name the first request whose cumulative need does not fit what is available now.
    const std::uint32_t available = allocator_.num_available();
    std::size_t cumulative = 0;
    std::size_t index = n - 1;
    for (std::size_t i = 0; i < n; ++i) {
      cumulative += new_blocks[i];
      if (cumulative > available) {
        index = i;
        break;
      }
    }
    return {ErrorCode::kPoolFull, static_cast<std::int64_t>(index)};
  }
  // --- commit: allocates nothing (every container was grown above) ---------------------------------
  if (new_block_ids != nullptr) new_block_ids->insert(new_block_ids->end(), s.ids.begin(), s.ids.end());
  s.owned_blocks += total;
  std::size_t at = 0;
  for (std::size_t i = 0; i < n; ++i) {
    Request& r = *s.targets[i];
    r.blocks.insert(r.blocks.end(), s.ids.begin() + static_cast<std::ptrdiff_t>(at),
                    s.ids.begin() + static_cast<std::ptrdiff_t>(at + new_blocks[i]));
    at += new_blocks[i];
    const auto run = tokens.subspan(offsets[i], offsets[i + 1] - offsets[i]);
    r.num_tokens += run.size();
    if (cache_ == nullptr || r.opaque) continue;
    r.tail.insert(r.tail.end(), run.begin(), run.end());
    if (s.keep_tokens) r.tokens.insert(r.tokens.end(), run.begin(), run.end());
    const std::size_t full = s.digest_at[i + 1] - s.digest_at[i];
    if (full == 0) continue;
    r.digests.insert(r.digests.end(), s.new_digests.begin() + static_cast<std::ptrdiff_t>(s.digest_at[i]),
                     s.new_digests.begin() + static_cast<std::ptrdiff_t>(s.digest_at[i + 1]));
    r.tail.erase(r.tail.begin(), r.tail.begin() + static_cast<std::ptrdiff_t>(full * bs));
    s.publish(r);
  }
  return {};
}

void RequestManager::finish(std::span<const RequestId> ids) { (void)impl_->end_requests(ids, impl_->counters.finished); }

void RequestManager::abort(std::span<const RequestId> ids) { (void)impl_->end_requests(ids, impl_->counters.aborted); }

std::uint64_t RequestManager::preempt(std::span<const RequestId> ids) {
  return impl_->end_requests(ids, impl_->counters.preempted);
}

bool RequestManager::contains(RequestId id) const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->requests.contains(id);
}

std::uint64_t RequestManager::num_tokens(RequestId id) const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->find(id).num_tokens;
}

std::vector<BlockId> RequestManager::block_table(RequestId id) const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->find(id).blocks;
}

std::uint32_t RequestManager::block_tables(std::span<const RequestId> ids, std::span<BlockId> out,
                                           std::size_t row_stride, BlockId pad) const {
  if (out.size() / std::max<std::size_t>(row_stride, 1) < ids.size() || (row_stride == 0 && !ids.empty())) {
    throw Error(ErrorCode::kInvalidArgument, "block_tables: output of " + std::to_string(out.size()) +
                                                 " ids cannot hold " + std::to_string(ids.size()) + " rows of " +
                                                 std::to_string(row_stride));
  }
  const Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  std::uint32_t longest = 0;
  for (RequestId id : ids) {
    const Request& r = s.find(id);
    if (r.blocks.size() > row_stride) {
      throw Error(ErrorCode::kInvalidArgument, "block_tables: " + id_text(id) + " has " +
                                                   std::to_string(r.blocks.size()) + " blocks, more than the row of " +
                                                   std::to_string(row_stride));
    }
    longest = std::max(longest, static_cast<std::uint32_t>(r.blocks.size()));
  }
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const Request& r = s.requests.find(ids[i])->second;
    BlockId* row = out.data() + i * row_stride;
    std::copy(r.blocks.begin(), r.blocks.end(), row);
    std::fill(row + r.blocks.size(), row + row_stride, pad);
  }
  return longest;
}

RequestManagerStats RequestManager::stats() const {
  const std::lock_guard lock(impl_->mutex);
  RequestManagerStats st = impl_->counters;
  st.running = static_cast<std::uint32_t>(impl_->requests.size());
  st.owned_blocks = impl_->owned_blocks;
  return st;
}

std::vector<RequestId> RequestManager::running() const {
  const std::lock_guard lock(impl_->mutex);
  std::vector<RequestId> out;
  out.reserve(impl_->requests.size());
  for (const auto& [id, r] : impl_->requests) out.push_back(id);
  return out;
}

void RequestManager::check_invariants() const {
  const Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  const std::uint32_t bs = options_.block_size;
  std::uint64_t owned = 0;
  const auto fail = [](RequestId id, const std::string& what) {
    throw Error(ErrorCode::kInternal, "request manager: " + id_text(id) + ": " + what);
  };
  for (const auto& [id, r] : s.requests) {
    if (r.blocks.size() != blocks_for(r.num_tokens, bs)) fail(id, "block table does not cover its tokens");
    if (r.num_held < r.num_shared) fail(id, "holds fewer cached blocks than it matched");
    if (cache_ != nullptr && !r.opaque) {
      if (r.digests.size() != r.num_tokens / bs) fail(id, "digest count differs from its full blocks");
      if (r.tail.size() != r.num_tokens % bs) fail(id, "partial block tokens differ from its token count");
      if (s.keep_tokens && r.tokens.size() != r.num_tokens) fail(id, "kept tokens differ from its token count");
      if (r.num_held > r.digests.size()) fail(id, "holds more cached blocks than it has digests");
      for (std::uint32_t j = 0; j < r.num_held; ++j) {
        const auto info = cache_->lookup(r.digests[j]);
        if (!info || info->users == 0) fail(id, "a held digest is not cached in use at block " + std::to_string(j));
        if (j < r.num_shared && info->block_id != r.blocks[j]) fail(id, "a shared block differs from the cache's");
      }
      std::uint32_t at = r.num_shared;
      for (const auto& [first, end] : r.adopted) {
        if (first < at || end <= first || end > r.num_held) fail(id, "adopted runs are out of order or not held");
        for (std::uint32_t j = first; j < end; ++j) {
          if (cache_->lookup(r.digests[j])->block_id != r.blocks[j]) {
            fail(id, "block " + std::to_string(j) + " was adopted but the cache holds another");
          }
        }
        at = end;
      }
    }
    for (BlockId b : r.blocks) {
      if (!allocator_.is_allocated(b)) fail(id, "block " + std::to_string(b) + " is not allocated");
    }
    r.for_each_own_run([&](std::span<const BlockId> own) { owned += own.size(); });
  }
  if (owned != s.owned_blocks) {
    throw Error(ErrorCode::kInternal, "request manager: owned block count " + std::to_string(s.owned_blocks) +
                                          " differs from the tables' " + std::to_string(owned));
  }
}

}  // namespace sagellm::kv
