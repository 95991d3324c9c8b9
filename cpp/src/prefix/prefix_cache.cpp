#include "sagellm_kv/prefix_cache.hpp"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <iterator>
#include <limits>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "allocator/free_held.hpp"
#include "common/grow.hpp"
#include "prefix/digest_index.hpp"
#include "prefix/eviction_heap.hpp"
#include "prefix/fault_injection.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv {
namespace {

constexpr std::uint32_t kNone = detail::DigestIndex::kNone;

// One cached block: what match, release, insert and LRU eviction read, in one aligned cache line
// (an 88-byte record straddled two, and a prefetch fetched one of them). Free records are chained
// through `parent`. The rest of the node is its NodeCold record, at the same index.
struct alignas(64) Node {
  BlockHash digest;
  std::uint64_t last_access = 0;  // logical clock: deterministic LRU order
  BlockId block = -1;
  std::uint32_t parent = kNone;
  std::uint32_t children = 0;
  std::uint32_t users = 0;
  std::int32_t priority = 0;
  bool live = false;
};
static_assert(sizeof(Node) == 64, "a node record is one cache line");

// The fields of a node that only insertion, FIFO/TTL eviction and invalidate read.
struct NodeCold {
  std::uint64_t owner = 0;
  std::uint64_t insert_tick = 0;  // logical clock: FIFO order
  std::int64_t inserted_ns = 0;   // clock_ns at insertion: TTL expiry
};

std::uint64_t random_key() {
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}

std::string position_text(std::size_t pos) { return " at position " + std::to_string(pos); }

}  // namespace

namespace detail {
namespace {
std::atomic<PrefixFaultHook> g_fault_hook{nullptr};
}  // namespace

void set_prefix_fault_hook(PrefixFaultHook hook) noexcept { g_fault_hook.store(hook, std::memory_order_release); }

void prefix_fault_point(const char* site) {
  if (const PrefixFaultHook hook = g_fault_hook.load(std::memory_order_acquire); hook != nullptr) hook(site);
}
}  // namespace detail

std::string_view eviction_policy_name(EvictionPolicy policy) noexcept {
  switch (policy) {
    case EvictionPolicy::kLru: return "lru";
    case EvictionPolicy::kFifo: return "fifo";
    case EvictionPolicy::kPriority: return "priority";
    case EvictionPolicy::kTtl: return "ttl";
  }
  return "unknown";
}

EvictionPolicy parse_eviction_policy(std::string_view name) {
  for (auto p : {EvictionPolicy::kLru, EvictionPolicy::kFifo, EvictionPolicy::kPriority, EvictionPolicy::kTtl}) {
    if (name == eviction_policy_name(p)) return p;
  }
  throw Error(ErrorCode::kInvalidArgument,
              "unknown eviction policy '" + std::string(name) + "'; expected one of lru, fifo, priority, ttl");
}

void PrefixCacheOptions::validate() const {
  if (block_size == 0) throw Error(ErrorCode::kInvalidArgument, "block_size must be > 0, got 0");
  if (capacity_blocks && *capacity_blocks == 0) {
    throw Error(ErrorCode::kInvalidArgument, "capacity_blocks must be > 0 (or unset for no limit), got 0");
  }
  if (policy != EvictionPolicy::kLru && policy != EvictionPolicy::kFifo && policy != EvictionPolicy::kPriority &&
      policy != EvictionPolicy::kTtl) {
    throw Error(ErrorCode::kInvalidArgument,
                "eviction policy value " + std::to_string(static_cast<int>(policy)) + " is unknown");
  }
  // 9.2e9 s keeps ttl in nanoseconds within int64.
  if (std::isnan(ttl_seconds) ||
      (policy == EvictionPolicy::kTtl && !(ttl_seconds > 0.0 && ttl_seconds < 9.0e9))) {
    throw Error(ErrorCode::kInvalidArgument,
                "ttl_seconds must be > 0 and finite for the ttl policy, got " + std::to_string(ttl_seconds));
  }
}

struct PrefixCache::Impl {
  Impl(const PrefixCacheOptions& options, BlockAllocator* alloc)
      : allocator(alloc),
        policy(options.policy),
        block_size(options.block_size),
        capacity(options.capacity_blocks),
        ttl_ns(static_cast<std::int64_t>(std::llround(options.ttl_seconds * 1e9))),
        event_capacity(options.event_queue_capacity),
        clock_fn(options.clock_ns),
        index(random_key()),
        repeat_key(random_key()) {
    if (capacity) {
      // A bounded cache knows its size: reserve the records now (untouched pages cost no memory
      // until used) so growth never copies the table or leaves doubling slack behind.
      reserve_records(std::min<std::uint32_t>(*capacity, kReserveLimit));
      heap.reserve_nodes(static_cast<std::uint32_t>(nodes.capacity()));
      if (two_heaps()) lru_heap.reserve_nodes(static_cast<std::uint32_t>(nodes.capacity()));
    }
  }

  static constexpr std::uint32_t kReserveLimit = 1u << 22;

  // --- configuration -------------------------------------------------------------------------
  BlockAllocator* allocator;
  EvictionPolicy policy;
  std::uint32_t block_size;
  std::optional<std::uint32_t> capacity;
  std::int64_t ttl_ns;
  std::size_t event_capacity;
  std::function<std::int64_t()> clock_fn;

  // --- state, guarded by `mutex` ---------------------------------------------------------------
  mutable std::mutex mutex;
  std::vector<Node> nodes;
  std::vector<NodeCold> cold;  // cold[i] completes nodes[i]; same size, capacity reserved together
  std::uint32_t free_head = kNone;
  std::uint32_t live_count = 0;
  std::uint32_t in_use_count = 0;
  // Live nodes without children. Every evictable node is one, so heap capacity kept at leaf_count
  // (reserved by insert, the only call that adds leaves) lets release and eviction push into the
  // heaps without allocating: they may run in a caller's noexcept cleanup.
  std::uint32_t leaf_count = 0;
  detail::DigestIndex index;
  detail::EvictionHeap heap;      // the policy's order (TTL: insertion order)
  detail::EvictionHeap lru_heap;  // TTL only: the LRU fallback among unexpired nodes
  // Block id -> node. With an allocator, block_node holds every id. Metadata-only, ids are arbitrary:
  // those below block_node.size() live there, the others (sparse, negative) in block_node_map, never
  // both; block_node only grows over ids within a few times the cached blocks (grow_dense_ids), so
  // dense ids (counted up, as the seed PrefixCache's) cost no allocation per entry.
  std::vector<std::uint32_t> block_node;
  std::unordered_map<BlockId, std::uint32_t> block_node_map;
  std::uint64_t tick = 0;
  std::deque<PrefixCacheEvent> events;
  bool events_lost = false;  // events were dropped since the last drain: it starts with a lost mark
  PrefixCacheStats counters;

  // Scratch reused across calls, so steady-state calls do not allocate.
  std::vector<std::uint32_t> scratch_nodes;
  std::vector<std::pair<std::uint64_t, std::uint32_t>> scratch_pairs;
  std::vector<BlockId> freed_blocks;
  bool detaching = false;  // evict_detached: collect victims' blocks even without an allocator
  std::vector<std::uint8_t> marks;
  std::vector<std::uint32_t> path;
  std::vector<BlockHash> input_digests;  // insert's private copy of its arguments
  std::vector<BlockId> input_ids;
  std::vector<std::uint32_t> scratch_slots;  // repeats_possible's table
  std::uint64_t repeat_key;                  // keys repeats_possible's hash (random, as the index's)

  // --- helpers (all called with `mutex` held) ---------------------------------------------------

  [[nodiscard]] std::uint32_t find(const BlockHash& digest) const noexcept {
    return index.find(digest, [this](std::uint32_t n) -> const BlockHash& { return nodes[n].digest; });
  }

  [[nodiscard]] std::int64_t now_ns() const {
    if (clock_fn) return clock_fn();
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  [[nodiscard]] bool events_on() const noexcept { return event_capacity != 0; }

  static void fault_point(const char* site) { detail::prefix_fault_point(site); }

  // Queues an event. Never throws, so the commit phases that call it stay noexcept: an event the
  // queue cannot take (no memory) counts as dropped, as one pushed out of a full queue does. A
  // loss is marked for the next drain, and only events after the last lost one stay queued: a
  // consumer that restarts from them cannot apply a change whose undoing it missed.
  void emit(PrefixCacheEvent&& event) noexcept {
    if (!events_on()) return;
    if (events.size() >= event_capacity) {
      events.pop_front();  // the oldest: what stays is still contiguous with what comes
      ++counters.events_dropped;
      events_lost = true;
    }
    try {
      fault_point("emit");
      events.push_back(std::move(event));
    } catch (...) {
      // This one is lost in the middle: the queued events before it must go too.
      counters.events_dropped += events.size() + 1;
      events.clear();
      events_lost = true;
    }
  }

  // One "removed" event for a batch of digests; nothing when the batch is empty.
  void emit_removed(std::vector<BlockHash>&& digests) noexcept {
    if (digests.empty()) return;
    PrefixCacheEvent ev;
    ev.type = PrefixCacheEvent::Type::kRemoved;
    ev.digests = std::move(digests);  // a move: no allocation
    emit(std::move(ev));
  }

  [[nodiscard]] detail::HeapKey policy_key(std::uint32_t idx) const noexcept {
    const Node& n = nodes[idx];
    switch (policy) {
      case EvictionPolicy::kLru: return {0, n.last_access};
      case EvictionPolicy::kFifo:
      case EvictionPolicy::kTtl: return {0, cold[idx].insert_tick};
      case EvictionPolicy::kPriority: return {n.priority, n.last_access};
    }
    return {0, n.last_access};
  }
  [[nodiscard]] detail::HeapKey lru_key(std::uint32_t idx) const noexcept { return {0, nodes[idx].last_access}; }
  [[nodiscard]] bool two_heaps() const noexcept { return policy == EvictionPolicy::kTtl; }

  // Within the capacity insert reserved (see leaf_count): cannot fail.
  void make_evictable(std::uint32_t idx) noexcept {
    assert(nodes[idx].children == 0 && nodes[idx].users == 0);
    heap.push(idx, policy_key(idx));
    if (two_heaps()) lru_heap.push(idx, lru_key(idx));
  }
  void unmake_evictable(std::uint32_t idx) noexcept {
    heap.erase(idx);
    if (two_heaps()) lru_heap.erase(idx);
  }
  // Marks a node used now; re-keys it when it is evictable.
  void touch(std::uint32_t idx) noexcept {
    nodes[idx].last_access = ++tick;
    if (heap.contains(idx)) {
      heap.update(idx, policy_key(idx));
      if (two_heaps()) lru_heap.update(idx, lru_key(idx));
    }
  }
  void acquire(std::uint32_t idx) noexcept {
    Node& n = nodes[idx];
    if (n.users == 0) {
      ++in_use_count;
      if (n.children == 0) unmake_evictable(idx);
    }
    ++n.users;
  }
  // Drops one use; the node must have one.
  void drop_use(std::uint32_t idx) noexcept {
    Node& n = nodes[idx];
    assert(n.users > 0);
    if (--n.users == 0) {
      --in_use_count;
      if (n.children == 0 && !heap.contains(idx)) make_evictable(idx);
    }
  }

  [[nodiscard]] std::uint32_t block_owner(BlockId b) const {
    const auto u = static_cast<std::uint32_t>(b);
    if (u < block_node.size()) return block_node[u];
    if (allocator != nullptr || block_node_map.empty()) return kNone;
    const auto it = block_node_map.find(b);
    return it == block_node_map.end() ? kNone : it->second;
  }
  void set_block_owner(BlockId b, std::uint32_t idx) {
    if (allocator != nullptr) {
      const auto u = static_cast<std::uint32_t>(b);
      if (u >= block_node.size()) {
        // Grow geometrically but never past the allocator's size.
        const std::size_t want = std::max<std::size_t>(std::size_t{u} + 1, block_node.size() * 2);
        block_node.resize(std::min<std::size_t>(want, allocator->num_blocks()), kNone);
      }
      block_node[u] = idx;
    } else if (static_cast<std::uint32_t>(b) < block_node.size()) {
      block_node[static_cast<std::uint32_t>(b)] = idx;
    } else {
      block_node_map[b] = idx;
    }
  }
  void prefetch_block_owner(BlockId b) const noexcept {
    const auto u = static_cast<std::uint32_t>(b);
    if (u < block_node.size()) __builtin_prefetch(&block_node[u], 1);
  }
  void clear_block_owner(BlockId b) {
    const auto u = static_cast<std::uint32_t>(b);
    if (allocator != nullptr || u < block_node.size()) {
      block_node[u] = kNone;
    } else {
      block_node_map.erase(b);
    }
  }
  // Metadata-only: extends block_node over the new ids that are dense (below four times the cached
  // blocks plus the new ones, plus 1024), moving the map entries it then covers. Throws (bad_alloc)
  // before changing anything.
  void grow_dense_ids(std::span<const BlockId> new_ids) {
    const std::uint64_t limit = 4 * (std::uint64_t{live_count} + new_ids.size()) + 1024;
    std::uint64_t top = 0;
    bool grow = false;
    for (const BlockId b : new_ids) {
      const auto u = static_cast<std::uint32_t>(b);
      if (u >= block_node.size() && u < limit) {
        top = std::max<std::uint64_t>(top, u);
        grow = true;
      }
    }
    if (!grow) return;
    const std::uint64_t want = std::min<std::uint64_t>(std::max<std::uint64_t>(top + 1, 2 * block_node.size()), limit);
    block_node.resize(static_cast<std::size_t>(want), kNone);
    for (auto it = block_node_map.begin(); it != block_node_map.end();) {
      const auto u = static_cast<std::uint32_t>(it->first);
      if (u < block_node.size()) {
        block_node[u] = it->second;
        it = block_node_map.erase(it);
      } else {
        ++it;
      }
    }
  }

  // Room for `n` node records (both halves). Strong guarantee: only capacities grow.
  void reserve_records(std::size_t n) {
    cold.reserve(n);
    nodes.reserve(n);
  }

  // Stores `init` and `init_cold` in a record from the free list, or appended, and counts it live
  // and a leaf. The record is written once (no reset to defaults first).
  std::uint32_t alloc_node(const Node& init, const NodeCold& init_cold) {
    std::uint32_t idx = free_head;
    if (idx != kNone) {
      free_head = nodes[idx].parent;
      nodes[idx] = init;
      cold[idx] = init_cold;
    } else {
      if (nodes.size() >= kNone) throw Error(ErrorCode::kInternal, "prefix cache node table is full");
      idx = static_cast<std::uint32_t>(nodes.size());
      nodes.push_back(init);  // within reserve_records' room, as is cold's
      cold.push_back(init_cold);
      heap.reserve_nodes(static_cast<std::uint32_t>(nodes.capacity()));
      if (two_heaps()) lru_heap.reserve_nodes(static_cast<std::uint32_t>(nodes.capacity()));
    }
    ++live_count;
    ++leaf_count;
    return idx;
  }
  // A record whose children were removed with it (remove_subtrees) still counts them: not a leaf.
  void free_node(std::uint32_t idx) noexcept {
    Node& n = nodes[idx];
    if (n.children == 0) --leaf_count;
    n.live = false;
    n.parent = free_head;
    free_head = idx;
    --live_count;
  }

  // Returns the cache's references on the blocks of removed nodes, each exactly once. In pieces the
  // allocator copies on its stack, so no lack of memory refuses them. A refusal means someone freed
  // a reference the cache held, breaking the ownership protocol: when it changed nothing, the valid
  // ids go back one by one; when it raced that free (`partial`), every other id was applied already,
  // and freeing them again would drop references that are not the cache's.
  void return_blocks() noexcept {
    if (allocator != nullptr) {
      const std::span<const BlockId> all(freed_blocks);
      for (std::size_t at = 0; at < all.size(); at += BlockAllocator::kStackBatch) {
        const auto piece = all.subspan(at, std::min(BlockAllocator::kStackBatch, all.size() - at));
        const BatchStatus st = allocator->free(piece);
        if (st.ok()) continue;
        if (!st.partial) {
          for (const BlockId b : piece) (void)allocator->free(std::span<const BlockId>(&b, 1));
        }
        assert(!"a block held by the prefix cache was freed outside it");
      }
    }
    freed_blocks.clear();
  }

  // Takes a node out of the index, the heaps and the block map, collecting its block and digest;
  // the caller fixes the parent's child count and frees the record.
  // Callers reserve freed_blocks and `removed` first (reserve_removal), so the pushes cannot throw.
  // Inlined into eviction's loop: as a call its register saves and restores cost a fifth of it.
  [[gnu::always_inline]] void unlink(std::uint32_t idx, std::vector<BlockHash>* removed) noexcept {
    unmake_evictable(idx);
    Node& n = nodes[idx];
    index.erase(n.digest, idx);
    clear_block_owner(n.block);
    if (allocator != nullptr || detaching) freed_blocks.push_back(n.block);
    if (removed != nullptr) removed->push_back(n.digest);
  }

  [[nodiscard]] std::uint32_t pick_victim(std::int64_t now) const noexcept {
    if (heap.empty()) return kNone;
    if (two_heaps()) {
      const std::uint32_t oldest = heap.top();
      if (now - cold[oldest].inserted_ns >= ttl_ns) return oldest;
      return lru_heap.top();
    }
    return heap.top();
  }

  // Room for the bookkeeping of removing up to n nodes (freed blocks, removed digests, heap pushes
  // of parents), so the removal itself cannot fail half way.
  void reserve_removal(std::uint32_t n, std::vector<BlockHash>* removed) {
    const std::size_t k = std::min<std::size_t>(n, live_count);
    if (allocator != nullptr) freed_blocks.reserve(freed_blocks.size() + k);
    if (removed != nullptr) removed->reserve(removed->size() + k);
  }

  // Evicts up to n evictable leaves in policy order; parents left childless join the candidates.
  std::uint32_t evict_locked(std::uint32_t n, std::vector<BlockHash>* removed) {
    if (n == 0 || heap.empty()) return 0;
    reserve_removal(n, removed);
    return evict_reserved(n, removed, two_heaps() ? now_ns() : 0);
  }

  // evict_locked after reserve_removal(n, removed), with the time already read: cannot fail. A
  // victim's parent goes into the heap slot the victim left, so the heap never grows.
  std::uint32_t evict_reserved(std::uint32_t n, std::vector<BlockHash>* removed, std::int64_t now) noexcept {
    if (n == 0 || heap.empty()) return 0;
    std::uint32_t done = 0;
    // A parent left childless by a victim is usually the next victim itself (an evicted chain goes
    // leaf to root). When its key is below every key in the heap it is taken directly, skipping a
    // push and a pop that would give the same order. Not with two heaps (TTL), whose rule is not
    // one key.
    std::uint32_t next = kNone;
    while (done < n) {
      const std::uint32_t victim = next != kNone ? next : pick_victim(now);
      next = kNone;
      if (victim == kNone) break;
      unlink(victim, removed);
      const std::uint32_t parent = nodes[victim].parent;
      if (parent != kNone) {
        Node& p = nodes[parent];
        if (--p.children == 0) ++leaf_count;
        if (p.children == 0 && p.users == 0) {
          if (!two_heaps() && done + 1 < n && (heap.empty() || policy_key(parent) < heap.top_key())) {
            next = parent;
            index.prefetch(p.digest);  // its index slot, for its unlink next round
          } else {
            make_evictable(parent);
          }
        }
      }
      free_node(victim);
      ++done;
    }
    counters.evictions += done;
    return done;
  }

  // Removes every live node for which `doomed(node)` holds (a node is doomed when `selects(index)`
  // holds for it or an ancestor) unless it or a descendant is in use.
  template <class Selects>
  std::uint32_t remove_subtrees(const Selects& selects, std::vector<BlockHash>* removed) {
    constexpr std::uint8_t kBusy = 1, kKnown = 2, kDoomed = 4;
    const auto count = static_cast<std::uint32_t>(nodes.size());
    marks.assign(count, 0);
    for (std::uint32_t i = 0; i < count; ++i) {
      if (!nodes[i].live || nodes[i].users == 0) continue;
      for (std::uint32_t j = i; j != kNone && (marks[j] & kBusy) == 0; j = nodes[j].parent) marks[j] |= kBusy;
    }
    for (std::uint32_t i = 0; i < count; ++i) {
      if (!nodes[i].live || (marks[i] & kKnown) != 0) continue;
      path.clear();
      std::uint32_t j = i;
      while (j != kNone && (marks[j] & kKnown) == 0) {
        path.push_back(j);
        j = nodes[j].parent;
      }
      bool doomed = j != kNone && (marks[j] & kDoomed) != 0;
      for (auto it = path.rbegin(); it != path.rend(); ++it) {
        doomed = doomed || selects(*it);
        marks[*it] |= static_cast<std::uint8_t>(kKnown | (doomed ? kDoomed : 0));
      }
    }
    const auto goes = [&](std::uint32_t i) {
      return nodes[i].live && (marks[i] & (kDoomed | kBusy)) == kDoomed;
    };
    reserve_removal(live_count, removed);  // the last step that can throw: nothing changed yet
    std::uint32_t done = 0;
    for (std::uint32_t i = 0; i < count; ++i) {
      if (goes(i)) {
        unlink(i, removed);
        ++done;
      }
    }
    if (done == 0) return 0;
    // The removed set is closed under descendants, so only surviving parents need their counts.
    for (std::uint32_t i = 0; i < count; ++i) {
      if (!goes(i)) continue;
      const std::uint32_t p = nodes[i].parent;
      if (p != kNone && !goes(p)) {
        Node& pn = nodes[p];
        if (--pn.children == 0) ++leaf_count;
        if (pn.children == 0 && pn.users == 0) make_evictable(p);
      }
    }
    for (std::uint32_t i = 0; i < count; ++i) {
      if (goes(i)) free_node(i);
    }
    counters.removals += done;
    return done;
  }

  // Fast path of release for what match hands out: a run of digests, each the parent of the next.
  // One index lookup for the last, then parent links (no repeat is possible along a chain). Returns
  // false, having changed nothing, when the digests are not such a chain of held nodes. Allocates
  // nothing (two walks instead of a list of the nodes), as all of release: see leaf_count.
  bool release_chain(std::span<const BlockHash> digests) noexcept {
    if (digests.empty()) return true;
    const std::uint32_t last = find(digests.back());
    std::uint32_t idx = last;
    for (std::size_t i = digests.size(); i-- > 0; idx = nodes[idx].parent) {
      if (idx == kNone || nodes[idx].users == 0 || !(nodes[idx].digest == digests[i])) return false;
    }
    // Marked used as match does, root first: position i gets the tick base + i + 1, so a leaf is
    // more recent than its ancestors. A held node is in no heap, so no key changes until drop_use.
    const std::uint64_t base = tick;
    tick += digests.size();
    idx = last;
    for (std::size_t i = digests.size(); i-- > 0; idx = nodes[idx].parent) {
      nodes[idx].last_access = base + i + 1;
      drop_use(idx);
    }
    return true;
  }

  // release of any digests (a digest may appear several times, one use per appearance), all or
  // nothing. Tentative first: only the counts change until every digest is known good; a bad one
  // undoes the counts by looking the earlier digests up again. Allocates nothing but the error.
  void release_any(std::span<const BlockHash> digests) {
    std::uint32_t now_unused = 0;
    for (std::size_t i = 0; i < digests.size(); ++i) {
      const std::uint32_t idx = find(digests[i]);
      if (idx == kNone || nodes[idx].users == 0) {
        for (std::size_t j = 0; j < i; ++j) ++nodes[find(digests[j])].users;  // undo: nothing changed
        throw Error(ErrorCode::kRefCountUnderflow,
                    "release: digest " + digests[i].hex() + position_text(i) +
                        (idx == kNone ? " is not cached" : " has no use left to release"));
      }
      if (--nodes[idx].users == 0) ++now_unused;
    }
    in_use_count -= now_unused;
    for (const BlockHash& d : digests) {
      const std::uint32_t idx = find(d);
      touch(idx);
      const Node& n = nodes[idx];
      if (n.users == 0 && n.children == 0 && !heap.contains(idx)) make_evictable(idx);
    }
  }

  // log2 of repeats_possible's table size for `count` items; 0: too many items for that pass (the
  // sort alone, so that no big table is kept).
  static std::uint32_t repeat_table_bits(std::size_t count) noexcept {
    if (count > (std::size_t{1} << 16)) return 0;
    std::uint32_t bits = 4;
    while ((std::size_t{1} << bits) < 2 * count) ++bits;
    return bits;
  }
  // The linear first pass of check_new_entries' repeat checks: false when no two of `count` items
  // are equal (key_of(j): an item's 8-byte key; equal(a, b): items a and b are equal, which implies
  // equal keys); true when two are, or when the probes run long (keys piled on purpose), and then
  // the exact sort decides and names the pair. The common case costs O(n), not a sort (whose
  // mispredicted compares cost ~1 us per 80 random digests).
  template <class KeyOf, class Equal>
  bool repeats_possible(std::uint32_t count, const KeyOf& key_of, const Equal& equal) {
    const std::uint32_t bits = repeat_table_bits(count);
    if (bits == 0) return true;
    scratch_slots.assign(std::size_t{1} << bits, 0);  // position + 1; 0: empty
    const std::uint32_t mask = (std::uint32_t{1} << bits) - 1;
    std::uint32_t budget = 2 * count + 64;  // probes past the home slots, in all
    for (std::uint32_t j = 0; j < count; ++j) {
      std::uint64_t x = key_of(j) ^ repeat_key;  // splitmix64's finaliser, keyed as the index's mix
      x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
      x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
      x ^= x >> 31;
      auto i = static_cast<std::uint32_t>(x >> (64 - bits));
      while (scratch_slots[i] != 0) {
        if (budget == 0 || equal(scratch_slots[i] - 1, j)) return true;
        --budget;
        i = (i + 1) & mask;
      }
      scratch_slots[i] = j + 1;
    }
    return false;
  }

  // The checks of an insert's new entries (positions k..n-1, after the cached leading ones): no
  // later digest cached elsewhere, no digest or block id twice, every block allocated and caching
  // nothing. Throws naming the first violation; changes nothing.
  void check_new_entries(std::span<const BlockHash> digests, std::span<const BlockId> block_ids, std::size_t k) {
    const std::size_t n = digests.size();
    const auto num_new = static_cast<std::uint32_t>(n - k);
    constexpr std::size_t kAhead = 8;  // the lookups below miss in cache: overlap them
    for (std::size_t j = k + 1; j < n; ++j) {
      if (j + kAhead < n) index.prefetch(digests[j + kAhead]);
      if (find(digests[j]) != kNone) {
        throw Error(ErrorCode::kInvalidArgument, "insert: digest " + digests[j].hex() + position_text(j) +
                                                     " is cached under a different parent than the one before it");
      }
    }
    // Repeats among the new entries: sort (key, position) pairs by value and compare neighbours.
    // A digest's key is its first 8 bytes (full digests compared only when those tie).
    std::vector<std::pair<std::uint64_t, std::uint32_t>>& order = scratch_pairs;
    const auto sort_by = [&](const auto& key_of) {
      order.resize(num_new);
      for (std::uint32_t j = 0; j < num_new; ++j) {
        const auto pos = static_cast<std::uint32_t>(k + j);
        order[j] = {key_of(pos), pos};
      }
      std::sort(order.begin(), order.end());
    };
    const auto key_at = [&](std::uint32_t pos) {
      std::uint64_t w = 0;
      std::memcpy(&w, digests[pos].bytes.data(), sizeof w);
      return w;
    };
    if (num_new > 1 && repeats_possible(
                           num_new, [&](std::uint32_t j) { return key_at(static_cast<std::uint32_t>(k) + j); },
                           [&](std::uint32_t a, std::uint32_t b) { return digests[k + a] == digests[k + b]; })) {
      sort_by(key_at);
      for (std::uint32_t a = 0; a + 1 < num_new; ++a) {
        for (std::uint32_t b = a + 1; b < num_new && order[b].first == order[a].first; ++b) {
          if (digests[order[a].second] == digests[order[b].second]) {
            const auto [p, q] = std::minmax(order[a].second, order[b].second);
            throw Error(ErrorCode::kInvalidArgument, "insert: digest " + digests[p].hex() + " appears at positions " +
                                                         std::to_string(p) + " and " + std::to_string(q));
          }
        }
      }
    }
    constexpr std::size_t kOwnerAhead = 8;
    for (std::size_t j = k; j < n; ++j) {
      if (j + kOwnerAhead < n) prefetch_block_owner(block_ids[j + kOwnerAhead]);
      const BlockId b = block_ids[j];
      if (allocator != nullptr && !allocator->is_allocated(b)) {
        throw Error(ErrorCode::kInvalidBlock, "insert: block id " + std::to_string(b) + position_text(j) +
                                                  " is not allocated (pool of " +
                                                  std::to_string(allocator->num_blocks()) + " blocks)");
      }
      const std::uint32_t owner = block_owner(b);
      if (owner != kNone) {
        throw Error(ErrorCode::kInvalidArgument, "insert: block id " + std::to_string(b) + position_text(j) +
                                                     " already caches digest " + nodes[owner].digest.hex());
      }
    }
    const auto id_key = [&](std::size_t pos) {
      return static_cast<std::uint64_t>(static_cast<std::uint32_t>(block_ids[pos]));
    };
    if (num_new > 1 && repeats_possible(
                           num_new, [&](std::uint32_t j) { return id_key(k + j); },
                           [&](std::uint32_t a, std::uint32_t b) { return block_ids[k + a] == block_ids[k + b]; })) {
      sort_by(id_key);
      for (std::uint32_t a = 0; a + 1 < num_new; ++a) {
        if (order[a].first == order[a + 1].first) {
          throw Error(ErrorCode::kInvalidArgument, "insert: block id " + std::to_string(block_ids[order[a].second]) +
                                                       " appears at positions " + std::to_string(order[a].second) +
                                                       " and " + std::to_string(order[a + 1].second));
        }
      }
    }
  }
  // For assertions on a trusted insert.
  bool trusted_input_holds(std::span<const BlockHash> digests, std::span<const BlockId> block_ids, std::size_t k) {
    try {
      check_new_entries(digests, block_ids, k);
      return true;
    } catch (const Error&) {
      return false;
    }
  }

  // --- insert, in phases: prepare (may throw, changes nothing the cache shows), commit (noexcept) --

  struct InsertPlan {
    std::uint32_t k = 0;        // leading digests already cached
    std::uint32_t num_new = 0;  // digests to add after them
    std::uint32_t attach = kNone;
    std::int64_t now = 0;
    std::vector<BlockHash> removed;  // digests the capacity eviction removes (events on)
    std::optional<PrefixCacheEvent> stored;
  };

  // Reserves room for everything commit_insert adds (node records, index slots, heap slots, block
  // map entries, eviction bookkeeping) and builds the stored event, so commit allocates nothing.
  void prepare_insert(std::span<const BlockHash> digests, std::span<const BlockId> new_ids,
                      const InsertOptions& options, InsertPlan& plan) {
    const std::uint32_t num_new = plan.num_new;
    fault_point("clock");
    plan.now = num_new != 0 ? now_ns() : 0;
    if (num_new == 0) return;
    fault_point("reserve");
    if (std::uint64_t{nodes.size()} + num_new >= kNone) {
      throw Error(ErrorCode::kInternal, "prefix cache node table is full");
    }
    if (nodes.capacity() < nodes.size() + num_new) {
      reserve_records(std::max<std::size_t>(nodes.capacity() * 2, nodes.size() + num_new));
    }
    // Room for every leaf there can be after this insert (it adds at most one), so no later
    // release or eviction grows the heaps (see leaf_count).
    heap.reserve_nodes(static_cast<std::uint32_t>(nodes.capacity()));
    heap.reserve_entries(std::size_t{leaf_count} + 1);
    if (two_heaps()) {
      lru_heap.reserve_nodes(static_cast<std::uint32_t>(nodes.capacity()));
      lru_heap.reserve_entries(std::size_t{leaf_count} + 1);
    }
    index.reserve(index.size() + num_new);
    if (capacity) reserve_removal(num_new, events_on() ? &plan.removed : nullptr);
    if (allocator != nullptr) {
      const BlockId top = *std::max_element(new_ids.begin(), new_ids.end());
      const auto u = static_cast<std::size_t>(top);
      if (u >= block_node.size()) {
        const std::size_t want = std::max<std::size_t>(u + 1, block_node.size() * 2);
        block_node.resize(std::min<std::size_t>(want, allocator->num_blocks()), kNone);
      }
    } else {
      grow_dense_ids(new_ids);
      // The other ids: an unordered_map allocates per entry, so make their entries now (no owner
      // yet) and commit only assigns; abandon_insert or commit_insert erases those that end up unused.
      const auto sparse = [&](BlockId b) { return static_cast<std::uint32_t>(b) >= block_node.size(); };
      const auto num_sparse = static_cast<std::size_t>(std::count_if(new_ids.begin(), new_ids.end(), sparse));
      if (num_sparse != 0) {
        detail::grow_buckets_to(block_node_map, block_node_map.size() + num_sparse);
        for (std::size_t j = 0; j < new_ids.size(); ++j) {
          if (!sparse(new_ids[j])) continue;
          try {
            block_node_map.try_emplace(new_ids[j], kNone);
          } catch (...) {
            for (std::size_t i = 0; i < j; ++i) {
              if (sparse(new_ids[i])) block_node_map.erase(new_ids[i]);
            }
            throw;
          }
        }
      }
    }
    if (events_on()) {
      fault_point("event");
      PrefixCacheEvent& ev = plan.stored.emplace();
      ev.type = PrefixCacheEvent::Type::kStored;
      ev.digests.assign(digests.begin() + static_cast<std::ptrdiff_t>(plan.k), digests.end());
      if (plan.attach != kNone) ev.parent = nodes[plan.attach].digest;
      if (!options.token_ids.empty()) {
        const std::size_t bs = block_size;
        ev.token_ids.assign(options.token_ids.begin() + static_cast<std::ptrdiff_t>(plan.k * bs),
                            options.token_ids.end());
        // insert checked the caller's ids before taking the lock; this copy is what the event
        // carries, so it is the one that must hold no negative id (the caller may have changed
        // its array meanwhile).
        if (const auto bad = std::ranges::find_if(ev.token_ids, [](std::int32_t t) { return t < 0; });
            bad != ev.token_ids.end()) {
          throw Error(ErrorCode::kInvalidArgument,
                      "insert: token id " + std::to_string(*bad) + " at position " +
                          std::to_string(plan.k * bs + static_cast<std::size_t>(bad - ev.token_ids.begin())) +
                          " is negative (KV events carry token ids as unsigned 32-bit integers)");
        }
      }
      ev.block_size = block_size;
      if (options.extra_key) ev.extra_key = std::string(*options.extra_key);
      if (options.cache_salt) ev.cache_salt = std::string(*options.cache_salt);
    }
    fault_point("prepared");
  }

  // Undoes prepare_insert's visible traces (the placeholder map entries); reservations stay.
  void abandon_insert(std::span<const BlockId> new_ids, const InsertPlan& plan) noexcept {
    if (allocator == nullptr && plan.num_new != 0) {
      for (BlockId b : new_ids) {
        const auto it = block_node_map.find(b);
        if (it != block_node_map.end() && it->second == kNone) block_node_map.erase(it);
      }
    }
  }

  InsertResult commit_insert(std::span<const BlockHash> digests, std::span<const BlockId> new_ids,
                             const InsertOptions& options, InsertPlan plan) noexcept {
    for (std::uint32_t idx : scratch_nodes) {  // the reused leading nodes, from the checks
      Node& node = nodes[idx];
      node.priority = std::max(node.priority, options.priority);
      touch(idx);
      if (options.acquire) acquire(idx);
    }
    std::uint32_t cur = plan.attach;
    std::uint32_t fit = plan.num_new;
    if (capacity && fit != 0 && std::uint64_t{live_count} + fit > *capacity) {
      // The attachment point may be an unused leaf: keep it while making room below it.
      if (cur != kNone) acquire(cur);
      const std::uint64_t excess = std::uint64_t{live_count} + fit - *capacity;
      evict_reserved(static_cast<std::uint32_t>(std::min<std::uint64_t>(excess, plan.num_new)),
                     events_on() ? &plan.removed : nullptr, plan.now);
      if (cur != kNone) drop_use(cur);
      fit = live_count >= *capacity ? 0 : std::min(plan.num_new, *capacity - live_count);
      if (allocator != nullptr && fit < plan.num_new && !options.adopt) {
        // Give back the references taken on blocks that do not fit; the caller still holds its
        // own, so none of them reaches zero. (Adopted: the caller's references on them stay its.)
        [[maybe_unused]] const BatchStatus st = detail::free_held(*allocator, new_ids.subspan(fit));
        assert(st.ok());
      }
    }
    return_blocks();
    emit_removed(std::move(plan.removed));
    if (allocator == nullptr) {
      for (std::size_t j = fit; j < new_ids.size(); ++j) block_node_map.erase(new_ids[j]);
    }
    constexpr std::uint32_t kAhead = 8;  // the index slots and owner entries are cold: fetch ahead
    for (std::uint32_t j = 0; j < fit; ++j) {
      const std::size_t pos = plan.k + j;
      if (j + kAhead < fit) {
        index.prefetch(digests[pos + kAhead]);
        prefetch_block_owner(new_ids[j + kAhead]);
      }
      const std::uint64_t t = ++tick;
      const std::uint32_t idx = alloc_node({.digest = digests[pos],  // within the reserved capacity
                                            .last_access = t,
                                            .block = new_ids[j],
                                            .parent = cur,
                                            .children = 0,
                                            .users = options.acquire ? 1u : 0u,
                                            .priority = options.priority,
                                            .live = true},
                                           {.owner = options.owner, .insert_tick = t, .inserted_ns = plan.now});
      index.insert(digests[pos], idx);  // reserved: no rehash
      set_block_owner(new_ids[j], idx);  // reserved: no growth
      if (options.acquire) ++in_use_count;
      if (cur != kNone) {
        Node& p = nodes[cur];
        if (p.children == 0) {
          --leaf_count;
          if (p.users == 0) unmake_evictable(cur);
        }
        ++p.children;
      }
      cur = idx;
    }
    if (fit != 0) {
      if (!options.acquire) make_evictable(cur);
      counters.inserts += fit;
      if (plan.stored) {
        PrefixCacheEvent& ev = *plan.stored;
        ev.digests.resize(fit);  // shrinking: no allocation
        if (!ev.token_ids.empty()) ev.token_ids.resize(std::size_t{fit} * block_size);
        emit(std::move(ev));
      }
    }
    return {plan.k, fit};
  }

  void count_lookup(std::size_t queried, std::uint32_t matched) noexcept {
    ++counters.lookups;
    if (matched != 0) ++counters.hit_lookups;
    counters.queried_blocks += queried;
    counters.hit_blocks += matched;
    counters.queried_tokens += queried * std::uint64_t{block_size};
    counters.hit_tokens += std::uint64_t{matched} * block_size;
  }

  // What a walk does to the nodes it matches: nothing (peek), marks them used (probe), or also
  // takes a use of each (match).
  enum class Walk : std::uint8_t { kPeek, kProbe, kTake };

  [[nodiscard]] std::uint32_t walk(std::span<const BlockHash> digests, std::span<BlockId> out,
                                   Walk mode) noexcept {
    std::uint32_t parent = kNone;
    std::uint32_t m = 0;
    // The index slots and nodes of a long prompt are cold: fetch slots kSlotAhead digests ahead and,
    // once a slot has arrived, its node kNodeAhead ahead, so the misses overlap instead of queueing.
    constexpr std::size_t kSlotAhead = 8;
    constexpr std::size_t kNodeAhead = 4;
    const std::size_t count = digests.size();
    for (std::size_t i = 0; i < count; ++i) {
      if (i + kSlotAhead < count) index.prefetch(digests[i + kSlotAhead]);
      if (i + kNodeAhead < count) {
        const std::uint32_t ahead = index.home_node(digests[i + kNodeAhead]);
        if (ahead != kNone) __builtin_prefetch(&nodes[ahead]);
      }
      const BlockHash& d = digests[i];
      const std::uint32_t idx = find(d);
      if (idx == kNone) break;
      Node& n = nodes[idx];
      if (n.parent != parent) break;  // cached, but not as the continuation of this prefix
      if (mode == Walk::kTake) {
        if (n.users == std::numeric_limits<std::uint32_t>::max()) break;
        acquire(idx);  // no longer evictable: no heap key to update
        n.last_access = ++tick;
      } else if (mode == Walk::kProbe) {
        touch(idx);
      }
      if (!out.empty()) out[m] = n.block;
      ++m;
      parent = idx;
    }
    return m;
  }

  // A lookup that counts in the stats (match, probe): checks `out`, walks under the mutex.
  std::uint32_t counted_walk(const char* what, std::span<const BlockHash> digests, std::span<BlockId> out,
                             Walk mode) {
    if (out.size() < digests.size()) {
      throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": output holds " + std::to_string(out.size()) +
                                                   " ids for " + std::to_string(digests.size()) + " digests");
    }
    const std::lock_guard lock(mutex);
    const std::uint32_t m = walk(digests, out, mode);
    count_lookup(digests.size(), m);
    return m;
  }
};

PrefixCache::PrefixCache(const PrefixCacheOptions& options, BlockAllocator* allocator)
    : options_(options), allocator_(allocator) {
  options_.validate();
  impl_ = std::make_unique<Impl>(options_, allocator_);
}

PrefixCache::~PrefixCache() {
  if (allocator_ == nullptr) return;
  // Block by block: a destructor must not allocate (a batch would need a vector of ids).
  for (const Node& n : impl_->nodes) {
    if (n.live) {
      [[maybe_unused]] const BatchStatus st = allocator_->free(std::span<const BlockId>(&n.block, 1));
      assert(st.ok());
    }
  }
}

std::uint32_t PrefixCache::match(std::span<const BlockHash> digests, std::span<BlockId> out) {
  return impl_->counted_walk("match", digests, out, Impl::Walk::kTake);
}

std::uint32_t PrefixCache::probe(std::span<const BlockHash> digests, std::span<BlockId> out) {
  return impl_->counted_walk("probe", digests, out, Impl::Walk::kProbe);
}

MatchResult PrefixCache::match(std::span<const BlockHash> digests) {
  MatchResult r;
  r.block_ids.resize(digests.size());
  r.num_matched = match(digests, std::span<BlockId>(r.block_ids));
  r.block_ids.resize(r.num_matched);
  return r;
}

std::uint32_t PrefixCache::peek(std::span<const BlockHash> digests, std::span<BlockId> out) const {
  if (!out.empty() && out.size() < digests.size()) {
    throw Error(ErrorCode::kInvalidArgument, "peek: output holds " + std::to_string(out.size()) +
                                                 " ids for " + std::to_string(digests.size()) + " digests");
  }
  const std::lock_guard lock(impl_->mutex);
  return impl_->walk(digests, out, Impl::Walk::kPeek);
}

void PrefixCache::release(std::span<const BlockHash> digests) {
  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  if (!s.release_chain(digests)) s.release_any(digests);
}

namespace {
constexpr std::uint32_t kMaxUsers = std::numeric_limits<std::uint32_t>::max();  // a node's use count
}  // namespace

InsertResult PrefixCache::insert(std::span<const BlockHash> digests_in, std::span<const BlockId> block_ids_in,
                                 const InsertOptions& options) {
  Impl& s = *impl_;
  const std::size_t n = digests_in.size();
  if (block_ids_in.size() != n) {
    throw Error(ErrorCode::kInvalidArgument, "insert: " + std::to_string(block_ids_in.size()) + " block ids for " +
                                                 std::to_string(n) + " digests");
  }
  if (!options.token_ids.empty() && options.token_ids.size() != n * s.block_size) {
    throw Error(ErrorCode::kInvalidArgument,
                "insert: " + std::to_string(options.token_ids.size()) + " token ids for " + std::to_string(n) +
                    " blocks of " + std::to_string(s.block_size) + " tokens (expected " +
                    std::to_string(n * s.block_size) + " or none)");
  }
  if (n >= kNone) throw Error(ErrorCode::kInvalidArgument, "insert: too many digests: " + std::to_string(n));
  // Token ids go into stored events only, which routers read as unsigned 32-bit ids: a negative one
  // would make its batch unencodable, and the publisher would replace it by a clear of everything.
  if (const auto bad = std::ranges::find_if(options.token_ids, [](std::int32_t t) { return t < 0; });
      bad != options.token_ids.end()) {
    throw Error(ErrorCode::kInvalidArgument,
                "insert: token id " + std::to_string(*bad) + " at position " +
                    std::to_string(bad - options.token_ids.begin()) +
                    " is negative (KV events carry token ids as unsigned 32-bit integers)");
  }

  const std::lock_guard lock(s.mutex);
  // The one read of the caller's arrays: everything below checks and uses these copies. A trusted
  // chain's arrays are not checked, so nothing is gained by copying them: they are read in place.
  std::span<const BlockHash> digests = digests_in;
  std::span<const BlockId> block_ids = block_ids_in;
  if (!options.trusted_chain) {
    s.input_digests.assign(digests_in.begin(), digests_in.end());
    s.input_ids.assign(block_ids_in.begin(), block_ids_in.end());
    digests = s.input_digests;
    block_ids = s.input_ids;
  }

  // --- checks: nothing changes until all pass -----------------------------------------------------
  std::uint32_t attach = kNone;
  if (options.parent && *options.parent != kRootBlockHash) {
    attach = s.find(*options.parent);
    if (attach == kNone) {
      throw Error(ErrorCode::kCacheMiss,
                  "insert: parent digest " + options.parent->hex() + " is not cached; nothing was inserted");
    }
  }
  std::vector<std::uint32_t>& reused = s.scratch_nodes;
  reused.clear();
  std::uint32_t cur = attach;
  std::size_t k = 0;
  for (; k < n; ++k) {
    const std::uint32_t idx = s.find(digests[k]);
    if (idx == kNone) break;
    if (s.nodes[idx].parent != cur) {
      throw Error(ErrorCode::kInvalidArgument, "insert: digest " + digests[k].hex() + position_text(k) +
                                                   " is cached under a different parent than the one before it");
    }
    if (options.acquire && s.nodes[idx].users == kMaxUsers) {  // match stops there; insert cannot
      throw Error(ErrorCode::kInvalidArgument, "insert: digest " + digests[k].hex() + position_text(k) +
                                                   " already has " + std::to_string(kMaxUsers) +
                                                   " uses: acquiring it again would overflow; nothing was inserted");
    }
    reused.push_back(idx);
    cur = idx;
  }
  const auto num_new = static_cast<std::uint32_t>(n - k);
  // commit_insert takes one more use of the attachment point while it evicts for capacity.
  if (cur != kNone && num_new != 0 && s.capacity &&
      std::uint64_t{s.nodes[cur].users} + (options.acquire && k != 0 ? 1 : 0) + 1 > kMaxUsers) {
    throw Error(ErrorCode::kInvalidArgument, "insert: the attachment point of the new digests has " +
                                                 std::to_string(s.nodes[cur].users) +
                                                 " uses: one more would overflow; nothing was inserted");
  }
  if (options.trusted_chain) {
    assert(s.trusted_input_holds(digests, block_ids, k));
  } else {
    s.check_new_entries(digests, block_ids, k);
  }
  const std::span<const BlockId> new_ids = block_ids.subspan(k);

  // --- prepare: every allocation and every call that may throw, before any change ---------------
  Impl::InsertPlan plan;
  plan.k = static_cast<std::uint32_t>(k);
  plan.num_new = num_new;
  plan.attach = cur;
  try {
    s.prepare_insert(digests, new_ids, options, plan);
  } catch (...) {
    s.abandon_insert(new_ids, plan);
    throw;
  }

  if (s.allocator != nullptr && num_new != 0 && !options.adopt) {
    // The cache's reference on every new block, taken last so a refusal changes nothing. It can
    // only fail if the caller frees a block concurrently, which the protocol forbids; not for lack
    // of memory (a long batch goes in pieces), so a reserve_insert makes the insert allocation-free.
    const BatchStatus st = detail::incref_held(*s.allocator, new_ids);
    if (!st.ok()) {
      s.abandon_insert(new_ids, plan);
      throw Error(ErrorCode::kInvalidBlock, "insert: block id " + std::to_string(st.id) +
                                                position_text(k + static_cast<std::size_t>(st.index)) +
                                                " is not allocated");
    }
  }

  // --- commit: cannot fail ------------------------------------------------------------------------
  return s.commit_insert(digests, new_ids, options, std::move(plan));
}

void PrefixCache::reserve_insert(std::span<const BlockId> block_ids) {
  Impl& s = *impl_;
  const std::size_t n = block_ids.size();
  if (n == 0) return;
  const BlockId top = *std::max_element(block_ids.begin(), block_ids.end());
  const BlockId bottom = *std::min_element(block_ids.begin(), block_ids.end());
  if (s.allocator != nullptr && (bottom < 0 || static_cast<std::uint32_t>(top) >= s.allocator->num_blocks())) {
    const BlockId bad = bottom < 0 ? bottom : top;
    throw Error(ErrorCode::kInvalidBlock, "reserve_insert: block id " + std::to_string(bad) + " is outside the pool of " +
                                              std::to_string(s.allocator->num_blocks()) + " blocks");
  }
  if (n >= kNone) throw Error(ErrorCode::kInvalidArgument, "reserve_insert: too many blocks: " + std::to_string(n));
  const std::lock_guard lock(s.mutex);
  // What insert's prepare phase reserves, for every insert of the sequence at once: the node table
  // and index grow by at most n, the leaves (the heaps' entries) by at most one per insert.
  if (std::uint64_t{s.nodes.size()} + n >= kNone) throw Error(ErrorCode::kInternal, "prefix cache node table is full");
  if (s.nodes.capacity() < s.nodes.size() + n) {
    s.reserve_records(std::max<std::size_t>(s.nodes.capacity() * 2, s.nodes.size() + n));
  }
  s.heap.reserve_nodes(static_cast<std::uint32_t>(s.nodes.capacity()));
  s.heap.reserve_entries(std::size_t{s.leaf_count} + n);
  if (s.two_heaps()) {
    s.lru_heap.reserve_nodes(static_cast<std::uint32_t>(s.nodes.capacity()));
    s.lru_heap.reserve_entries(std::size_t{s.leaf_count} + n);
  }
  s.index.reserve(static_cast<std::uint32_t>(s.index.size() + n));
  if (s.allocator != nullptr && static_cast<std::size_t>(top) >= s.block_node.size()) {
    const std::size_t want = std::max<std::size_t>(static_cast<std::size_t>(top) + 1, s.block_node.size() * 2);
    s.block_node.resize(std::min<std::size_t>(want, s.allocator->num_blocks()), kNone);
  }
  // insert's private copies of its arguments and the scratch of its checks (the debug build's
  // assertion on a trusted chain runs them too).
  s.input_digests.reserve(n);
  s.input_ids.reserve(n);
  s.scratch_nodes.reserve(n);
  s.scratch_pairs.reserve(n);
  if (const std::uint32_t bits = Impl::repeat_table_bits(n); bits != 0) s.scratch_slots.reserve(std::size_t{1} << bits);
}

std::uint32_t PrefixCache::evict(std::uint32_t n) {
  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  std::vector<BlockHash> removed;
  const std::uint32_t done = s.evict_locked(n, s.events_on() ? &removed : nullptr);
  s.return_blocks();
  s.emit_removed(std::move(removed));
  return done;
}

std::uint32_t PrefixCache::evict_detached(std::uint32_t n, std::vector<BlockHash>& digests,
                                          std::vector<BlockId>& block_ids) {
  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  if (n == 0 || s.heap.empty()) return 0;
  const std::size_t k = std::min<std::size_t>(n, s.live_count);
  // Everything that can throw happens before the first victim leaves.
  std::vector<BlockHash> removed;
  removed.reserve(k);
  digests.reserve(digests.size() + k);
  block_ids.reserve(block_ids.size() + k);
  s.freed_blocks.reserve(s.freed_blocks.size() + k);
  std::vector<BlockHash> events;
  if (s.events_on()) events.reserve(k);
  const std::int64_t now = s.two_heaps() ? s.now_ns() : 0;
  // --- commit: cannot fail ---
  const std::size_t first_block = s.freed_blocks.size();
  s.detaching = true;
  const std::uint32_t done = s.evict_reserved(n, &removed, now);
  s.detaching = false;
  // The victims' blocks were queued for return: take them (and their references) out instead.
  block_ids.insert(block_ids.end(), s.freed_blocks.begin() + static_cast<std::ptrdiff_t>(first_block),
                   s.freed_blocks.end());
  s.freed_blocks.resize(first_block);
  digests.insert(digests.end(), removed.begin(), removed.end());
  if (s.events_on()) {
    events.insert(events.end(), removed.begin(), removed.end());
    s.emit_removed(std::move(events));
  }
  return done;
}

std::uint32_t PrefixCache::invalidate(std::uint64_t owner) {
  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  std::vector<BlockHash> removed;
  const std::uint32_t done =
      s.remove_subtrees([&s, owner](std::uint32_t i) { return s.cold[i].owner == owner; },
                        s.events_on() ? &removed : nullptr);
  s.return_blocks();
  s.emit_removed(std::move(removed));
  return done;
}

std::uint32_t PrefixCache::clear() {
  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  std::vector<BlockHash> removed;
  const std::uint32_t done = s.remove_subtrees([](std::uint32_t) { return true; }, s.events_on() ? &removed : nullptr);
  s.return_blocks();
  if (s.live_count == 0) {
    // Nothing left: start from compact tables, so an unbounded cache that once held a burst keeps
    // no large arrays (a bounded one keeps its reserved records).
    s.nodes.clear();
    s.cold.clear();
    if (!s.capacity) {
      s.nodes.shrink_to_fit();
      s.cold.shrink_to_fit();
      s.heap = detail::EvictionHeap{};
      s.lru_heap = detail::EvictionHeap{};
      if (s.allocator == nullptr) std::vector<std::uint32_t>().swap(s.block_node);  // every entry is kNone
    }
    s.free_head = kNone;
    s.index.clear();
    PrefixCacheEvent ev;
    ev.type = PrefixCacheEvent::Type::kCleared;
    s.emit(std::move(ev));
  } else {
    s.emit_removed(std::move(removed));
  }
  return done;
}

std::vector<PrefixCacheEvent> PrefixCache::drain_events() {
  Impl& s = *impl_;
  const std::lock_guard lock(s.mutex);
  std::vector<PrefixCacheEvent> out;
  out.reserve(s.events.size() + (s.events_lost ? 1 : 0));  // the only step that can fail
  if (s.events_lost) {
    PrefixCacheEvent mark;
    mark.type = PrefixCacheEvent::Type::kCleared;
    mark.events_lost = true;
    out.push_back(std::move(mark));
  }
  std::move(s.events.begin(), s.events.end(), std::back_inserter(out));
  s.events.clear();
  s.events_lost = false;
  return out;
}

PrefixCacheStats PrefixCache::stats() const {
  const std::lock_guard lock(impl_->mutex);
  PrefixCacheStats st = impl_->counters;
  st.cached_blocks = impl_->live_count;
  st.evictable_blocks = impl_->heap.size();
  st.in_use_blocks = impl_->in_use_count;
  return st;
}

std::uint32_t PrefixCache::size() const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->live_count;
}

bool PrefixCache::contains(const BlockHash& digest) const {
  const std::lock_guard lock(impl_->mutex);
  return impl_->find(digest) != kNone;
}

std::optional<PrefixNodeInfo> PrefixCache::lookup(const BlockHash& digest) const {
  const std::lock_guard lock(impl_->mutex);
  const std::uint32_t idx = impl_->find(digest);
  if (idx == kNone) return std::nullopt;
  const Node& n = impl_->nodes[idx];
  PrefixNodeInfo info;
  info.block_id = n.block;
  if (n.parent != kNone) info.parent = impl_->nodes[n.parent].digest;
  info.num_children = n.children;
  info.users = n.users;
  info.owner = impl_->cold[idx].owner;
  info.priority = n.priority;
  return info;
}

std::vector<BlockId> PrefixCache::cached_block_ids() const {
  const std::lock_guard lock(impl_->mutex);
  std::vector<BlockId> ids;
  ids.reserve(impl_->live_count);
  for (const Node& n : impl_->nodes) {
    if (n.live) ids.push_back(n.block);
  }
  return ids;
}

std::vector<std::uint64_t> PrefixCache::cached_owners() const {
  std::vector<std::uint64_t> owners;
  {
    const std::lock_guard lock(impl_->mutex);
    const Impl& s = *impl_;
    for (std::size_t i = 0; i < s.nodes.size(); ++i) {
      if (s.nodes[i].live && s.cold[i].owner != 0) owners.push_back(s.cold[i].owner);
    }
  }
  std::sort(owners.begin(), owners.end());
  owners.erase(std::unique(owners.begin(), owners.end()), owners.end());
  return owners;
}

std::size_t PrefixCache::node_bytes() noexcept { return sizeof(Node) + sizeof(NodeCold); }

std::size_t PrefixCache::metadata_bytes() const {
  const std::lock_guard lock(impl_->mutex);
  const Impl& s = *impl_;
  // unordered_map: one heap node (key, value, next pointer, cached hash) per entry + the buckets.
  const std::size_t map_bytes = s.block_node_map.size() * (sizeof(void*) * 2 + sizeof(BlockId) + sizeof(std::uint32_t)) +
                                s.block_node_map.bucket_count() * sizeof(void*);
  return s.nodes.capacity() * sizeof(Node) + s.cold.capacity() * sizeof(NodeCold) + s.index.memory_bytes() + s.heap.memory_bytes() +
         s.lru_heap.memory_bytes() + s.block_node.capacity() * sizeof(std::uint32_t) + map_bytes;
}

void PrefixCache::check_invariants() const {
  const std::lock_guard lock(impl_->mutex);
  const Impl& s = *impl_;
  const auto fail = [](const std::string& what) { throw Error(ErrorCode::kInternal, "prefix cache invariant: " + what); };
  const auto count = static_cast<std::uint32_t>(s.nodes.size());
  if (s.cold.size() != count) fail("the node table's halves differ in size");
  std::vector<std::uint32_t> children(count, 0);
  std::uint32_t live = 0, in_use = 0, evictable = 0;
  for (std::uint32_t i = 0; i < count; ++i) {
    const Node& n = s.nodes[i];
    if (!n.live) continue;
    ++live;
    if (n.users > 0) ++in_use;
    if (s.find(n.digest) != i) fail("node " + std::to_string(i) + " is not found under its digest");
    if (n.parent != kNone) {
      if (n.parent >= count || !s.nodes[n.parent].live) fail("node " + std::to_string(i) + " has a dead parent");
      ++children[n.parent];
    }
    if (s.block_owner(n.block) != i) fail("block " + std::to_string(n.block) + " does not map to its node");
    if (s.allocator != nullptr && !s.allocator->is_allocated(n.block)) {
      fail("cached block " + std::to_string(n.block) + " is not allocated");
    }
  }
  for (std::uint32_t i = 0; i < count; ++i) {
    const Node& n = s.nodes[i];
    if (!n.live) {
      if (s.heap.contains(i) || s.lru_heap.contains(i)) fail("free record " + std::to_string(i) + " is in a heap");
      continue;
    }
    if (children[i] != n.children) {
      fail("node " + std::to_string(i) + " counts " + std::to_string(n.children) + " children, has " +
           std::to_string(children[i]));
    }
    const bool should = n.users == 0 && n.children == 0;
    if (should) ++evictable;
    if (s.heap.contains(i) != should) fail("node " + std::to_string(i) + " heap membership is wrong");
    if (s.two_heaps() && s.lru_heap.contains(i) != should) fail("node " + std::to_string(i) + " LRU heap membership");
  }
  if (live != s.live_count) fail("live count " + std::to_string(s.live_count) + " != " + std::to_string(live));
  std::uint32_t leaves = 0;
  for (std::uint32_t i = 0; i < count; ++i) leaves += s.nodes[i].live && s.nodes[i].children == 0 ? 1u : 0u;
  if (leaves != s.leaf_count) fail("leaf count " + std::to_string(s.leaf_count) + " != " + std::to_string(leaves));
  if (s.heap.entry_capacity() < leaves || (s.two_heaps() && s.lru_heap.entry_capacity() < leaves)) {
    fail("eviction heap capacity below the " + std::to_string(leaves) + " leaves: a release could allocate");
  }
  if (in_use != s.in_use_count) fail("in-use count " + std::to_string(s.in_use_count) + " != " + std::to_string(in_use));
  if (s.index.size() != live) fail("index holds " + std::to_string(s.index.size()) + " entries for " + std::to_string(live));
  if (s.heap.size() != evictable) fail("heap size");
  if (!s.heap.valid() || !s.lru_heap.valid()) fail("heap order");
  std::size_t mapped = 0;
  for (std::uint32_t v : s.block_node) mapped += v != kNone ? 1 : 0;
  mapped += s.block_node_map.size();
  for (const auto& [b, idx] : s.block_node_map) {
    if (static_cast<std::uint32_t>(b) < s.block_node.size()) {
      fail("block " + std::to_string(b) + " is in the map but below the dense table's " +
           std::to_string(s.block_node.size()) + " ids");
    }
  }
  if (mapped != live) fail("block map holds " + std::to_string(mapped) + " entries for " + std::to_string(live));
}

}  // namespace sagellm::kv
