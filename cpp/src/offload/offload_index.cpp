#include "sagellm_kv/offload_index.hpp"

#include <algorithm>
#include <array>
#include <cassert>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include "allocator/free_held.hpp"
#include "sagellm_kv/error.hpp"

namespace sagellm::kv {
namespace {

constexpr char kSlotTag[] = "sagellm-kv vllm slot";  // 20 bytes, zero-padded to 24 in a digest

std::string slot_text(BlockId slot) { return "slot " + std::to_string(slot); }

}  // namespace

void OffloadIndexOptions::validate() const {
  if (num_slots == 0 || num_slots > BlockAllocator::kMaxBlocks) {
    throw Error(ErrorCode::kInvalidArgument, "num_slots must be in [1, " + std::to_string(BlockAllocator::kMaxBlocks) +
                                                 "], got " + std::to_string(num_slots));
  }
  if (policy == EvictionPolicy::kTtl && (!std::isfinite(ttl_seconds) || ttl_seconds <= 0)) {
    throw Error(ErrorCode::kInvalidArgument, "ttl_seconds must be finite and > 0, got " + std::to_string(ttl_seconds));
  }
}

BlockHash OffloadIndex::slot_digest(BlockId slot) noexcept {
  BlockHash h{};
  const auto v = static_cast<std::uint64_t>(static_cast<std::uint32_t>(slot));
  for (std::size_t i = 0; i < 8; ++i) h.bytes[i] = static_cast<std::uint8_t>(v >> (8 * i));
  std::memcpy(h.bytes.data() + 8, kSlotTag, sizeof kSlotTag - 1);
  return h;
}

struct OffloadIndex::Impl {
  explicit Impl(const OffloadIndexOptions& o)
      : options(o), state(o.num_slots, SlotState::kFree), link(o.num_slots, kNoSlot), gen(o.num_slots, 0),
        link_gen(o.num_slots, 0), seq(o.num_slots, 0), ancestor(o.num_slots, 0), seen(o.num_slots, 0),
        load_group(o.num_slots, kNoGroup) {
    start();
  }

  OffloadIndexOptions options;
  mutable std::mutex mu;
  // Declared in this order so the trie (which frees its references into the allocator) goes first.
  std::unique_ptr<BlockAllocator> alloc;
  std::unique_ptr<PrefixCache> trie;
  std::vector<SlotState> state;
  // Resident: the parent slot (kNoSlot: the root). Pending: the parent-to-be, valid at commit only
  // if it is then resident with generation link_gen (it may have gone, or been reused, meanwhile).
  std::vector<BlockId> link;
  std::vector<std::uint32_t> gen;       // bumped each time the slot is reserved
  std::vector<std::uint32_t> link_gen;  // pending: gen of `link` when reserved
  std::vector<std::uint64_t> seq;       // pending: reservation order (commit inserts parents first)
  std::uint64_t next_seq = 0;
  std::uint32_t pending = 0;
  std::uint64_t evictions = 0;
  // Scratch, reused under the mutex: stamps mark "ancestor of an input slot" / "input slot seen".
  std::vector<std::uint32_t> ancestor;
  std::vector<std::uint32_t> seen;
  std::uint32_t stamp = 0;
  std::vector<BlockHash> digests;
  std::vector<std::size_t> path_ends;  // end offsets of the paths in `digests`
  std::vector<BlockId> ids;
  std::vector<BlockId> order;
  std::vector<BlockId> leaves;
  std::vector<BlockHash> victims;
  std::vector<BlockId> parents;  // commit: each slot's parent once resident

  // Loads in flight. Each `pin` call is a group holding the trie pins of the root paths that end at
  // its `leaves` until every slot the call listed has been unpinned, by one `unpin` or several (a
  // load may complete in parts: the paths it pinned stay pinned for the slots still loading).
  // load_group[s]: a group that listed s and has not had s unpinned (kNoGroup: none); the groups
  // of further loads of s meanwhile are in `more_groups`.
  static constexpr std::uint32_t kNoGroup = 0xffffffffu;
  struct PinGroup {
    std::vector<BlockId> leaves;
    std::uint32_t left = 0;  // listed slots not unpinned yet (0: the record is free)
  };
  std::vector<PinGroup> groups;
  std::vector<std::uint32_t> free_groups;
  std::vector<std::uint32_t> load_group;
  std::unordered_multimap<BlockId, std::uint32_t> more_groups;

  // A new allocator and trie, every slot free. Both are made before the old ones go, so a
  // std::bad_alloc changes nothing (it used to leave no trie behind: the next call crashed).
  void start() {
    auto fresh_alloc = std::make_unique<BlockAllocator>(options.num_slots);
    PrefixCacheOptions po;
    po.block_size = 1;
    po.policy = options.policy;
    po.ttl_seconds = options.ttl_seconds;
    auto fresh_trie = std::make_unique<PrefixCache>(po, fresh_alloc.get());
    trie = std::move(fresh_trie);  // the old trie returns its references to the old allocator first
    alloc = std::move(fresh_alloc);
    std::fill(state.begin(), state.end(), SlotState::kFree);
    std::fill(load_group.begin(), load_group.end(), kNoGroup);
    groups.clear();
    free_groups.clear();
    more_groups.clear();
    pending = 0;
    evictions = 0;
  }

  std::uint32_t next_stamp() {
    if (++stamp == 0) {  // wrapped: old stamps could collide
      std::fill(ancestor.begin(), ancestor.end(), 0);
      std::fill(seen.begin(), seen.end(), 0);
      stamp = 1;
    }
    return stamp;
  }

  void check_range(BlockId slot, const char* what, std::size_t pos) const {
    if (slot < 0 || static_cast<std::uint32_t>(slot) >= options.num_slots) {
      throw Error(ErrorCode::kInvalidArgument, std::string(what) + "[" + std::to_string(pos) + "] = " +
                                                   std::to_string(slot) + " is out of range [0, " +
                                                   std::to_string(options.num_slots) + ")");
    }
  }

  void check_resident(std::span<const BlockId> slots, const char* what) const {
    for (std::size_t i = 0; i < slots.size(); ++i) {
      check_range(slots[i], what, i);
      if (state[static_cast<std::size_t>(slots[i])] != SlotState::kResident) {
        throw Error(ErrorCode::kCacheMiss, std::string(what) + "[" + std::to_string(i) + "]: " + slot_text(slots[i]) +
                                               " is not resident");
      }
    }
  }

  // Checks that every slot is pending and none repeats (else throws, nothing changed).
  void check_pending(std::span<const BlockId> slots, const char* what) {
    const std::uint32_t s = next_stamp();
    for (std::size_t i = 0; i < slots.size(); ++i) {
      check_range(slots[i], what, i);
      const auto u = static_cast<std::size_t>(slots[i]);
      if (state[u] != SlotState::kPending) {
        throw Error(ErrorCode::kInvalidArgument, std::string(what) + "[" + std::to_string(i) + "]: " +
                                                     slot_text(slots[i]) + " is not pending");
      }
      if (seen[u] == s) {
        throw Error(ErrorCode::kInvalidArgument, std::string(what) + "[" + std::to_string(i) + "]: " +
                                                     slot_text(slots[i]) + " is repeated");
      }
      seen[u] = s;
    }
  }

  // True when resident `slots` are one chain from the root, in order.
  bool is_root_chain(std::span<const BlockId> slots) const {
    BlockId prev = kNoSlot;
    for (BlockId s : slots) {
      if (link[static_cast<std::size_t>(s)] != prev) return false;
      prev = s;
    }
    return true;
  }

  // Fills `digests` / `path_ends` with the root paths covering resident `slots`: one per distinct
  // slot that is no other's ancestor, root first, in slot order: independent of the order of
  // `slots` (callers pass sets), so the recency the trie records is too.
  void cover(std::span<const BlockId> slots) {
    digests.clear();
    path_ends.clear();
    leaves.clear();
    const std::uint32_t s = next_stamp();
    for (BlockId slot : slots) {
      for (BlockId p = link[static_cast<std::size_t>(slot)]; p != kNoSlot && ancestor[static_cast<std::size_t>(p)] != s;
           p = link[static_cast<std::size_t>(p)]) {
        ancestor[static_cast<std::size_t>(p)] = s;
      }
    }
    for (BlockId slot : slots) {
      const auto u = static_cast<std::size_t>(slot);
      if (ancestor[u] == s || seen[u] == s) continue;
      seen[u] = s;
      leaves.push_back(slot);
    }
    if (leaves.size() > 1) std::sort(leaves.begin(), leaves.end());
    for (BlockId slot : leaves) {
      const std::size_t begin = digests.size();
      for (BlockId p = slot; p != kNoSlot; p = link[static_cast<std::size_t>(p)]) digests.push_back(slot_digest(p));
      std::reverse(digests.begin() + static_cast<std::ptrdiff_t>(begin), digests.end());
      path_ends.push_back(digests.size());
    }
  }

  std::span<const BlockHash> path(std::size_t i) const {
    const std::size_t begin = i == 0 ? 0 : path_ends[i - 1];
    return std::span<const BlockHash>(digests).subspan(begin, path_ends[i] - begin);
  }

  // Pins every path in `digests` (each is resident, so each match takes all of it).
  void match_paths() {
    ids.resize(digests.size());
    for (std::size_t i = 0; i < path_ends.size(); ++i) {
      const std::span<const BlockHash> p = path(i);
      [[maybe_unused]] const std::uint32_t got = trie->match(p, std::span<BlockId>(ids).first(p.size()));
      assert(got == p.size());
    }
  }

  // Pins resident `slots` (one match when they are a chain from the root in order, else one per
  // slot that is no other's ancestor) and records the call as a load group (see `groups`). All or
  // nothing: every allocation comes before the first pin.
  void pin(std::span<const BlockId> slots) {
    if (is_root_chain(slots)) {
      digests.clear();
      for (BlockId s : slots) digests.push_back(slot_digest(s));
      path_ends.assign(1, digests.size());
      leaves.assign(slots.empty() ? 0 : 1, slots.empty() ? kNoSlot : slots.back());
    } else {
      cover(slots);  // fills `leaves`
    }
    ids.resize(digests.size());
    if (slots.empty()) {
      match_paths();  // a lookup of nothing, counted as before; no load to remember
      return;
    }
    // the group record and the listed slots' entries, before any pin (undone if one cannot be had);
    // free_groups can then take back every record without allocating
    free_groups.reserve(groups.size() + 1);
    std::uint32_t g = 0;
    if (free_groups.empty()) {
      groups.emplace_back();
      g = static_cast<std::uint32_t>(groups.size() - 1);
    } else {
      g = free_groups.back();
      free_groups.pop_back();
    }
    PinGroup& group = groups[g];
    std::size_t added = 0;
    order.clear();
    try {
      group.leaves.assign(leaves.begin(), leaves.end());
      const std::uint32_t s = next_stamp();
      for (BlockId slot : slots) {
        const auto u = static_cast<std::size_t>(slot);
        if (seen[u] == s) continue;  // listed twice: one load of it, as the match pins it once
        seen[u] = s;
        order.push_back(slot);
        if (load_group[u] != kNoGroup) {
          more_groups.emplace(slot, g);
          ++added;
        }
      }
    } catch (...) {
      forget_group(g, added);
      throw;
    }
    // cannot fail from here: the matches take what the trie holds
    for (BlockId slot : order) {
      const auto u = static_cast<std::size_t>(slot);
      if (load_group[u] == kNoGroup) load_group[u] = g;
    }
    group.left = static_cast<std::uint32_t>(order.size());
    match_paths();
  }

  // Undoes a group record that `pin` could not complete: its first `added` entries in more_groups.
  void forget_group(std::uint32_t g, std::size_t added) noexcept {
    if (added > 0) {
      for (auto it = more_groups.begin(); it != more_groups.end();) {
        it = it->second == g ? more_groups.erase(it) : std::next(it);
      }
    }
    groups[g].leaves.clear();
    groups[g].left = 0;
    free_groups.push_back(g);  // within the capacity pin reserved
  }

  // Releases the root paths of group `g` (its slots are all unpinned) and frees the record. The
  // paths are released through a fixed buffer: nothing is allocated, and a release of what was
  // matched cannot fail.
  void release_group(std::uint32_t g) noexcept {
    PinGroup& group = groups[g];
    constexpr std::size_t kBatch = 64;
    std::array<BlockHash, kBatch> batch{};
    std::size_t n = 0;
    for (BlockId leaf : group.leaves) {
      for (BlockId p = leaf; p != kNoSlot; p = link[static_cast<std::size_t>(p)]) {
        batch[n++] = slot_digest(p);
        if (n == kBatch) {
          trie->release(std::span<const BlockHash>(batch.data(), n));
          n = 0;
        }
      }
    }
    if (n > 0) trie->release(std::span<const BlockHash>(batch.data(), n));
    group.leaves.clear();
    group.left = 0;
    free_groups.push_back(g);
  }

  // Evicts `need` resident slots, sparing `call`'s resident ones; false (nothing changed) if it cannot.
  bool evict(std::uint32_t need, std::span<const BlockId> call, std::vector<BlockId>& evicted) {
    order.clear();
    for (BlockId s : call) {
      if (s != kNoSlot && state[static_cast<std::size_t>(s)] == SlotState::kResident) order.push_back(s);
    }
    if (!order.empty()) {
      cover(order);
      match_paths();
    }
    // A node nobody uses has no used descendant (a match pins a whole root path), so leaves going
    // one after another can free every such node: eviction cascades up chains.
    const PrefixCacheStats st = trie->stats();
    bool ok = st.cached_blocks - st.in_use_blocks >= need;
    victims.clear();
    const std::size_t first = evicted.size();
    if (ok) {
      const std::uint32_t got = trie->evict_detached(need, victims, evicted);
      ok = got == need;
      evictions += got;
    }
    if (!order.empty()) trie->release(digests);
    for (std::size_t i = first; i < evicted.size(); ++i) state[static_cast<std::size_t>(evicted[i])] = SlotState::kFree;
    if (evicted.size() > first) {
      // The victims' references are ours (evict_detached handed them over): never refused for lack
      // of memory, which would leave them out of the trie yet allocated.
      const BatchStatus st_free = detail::free_held(*alloc, std::span<const BlockId>(evicted).subspan(first));
      if (!st_free.ok()) throw Error(ErrorCode::kInternal, "offload index: freeing evicted slots failed");
    }
    if (!ok && evicted.size() > first) {
      throw Error(ErrorCode::kInternal, "offload index: eviction freed fewer slots than counted evictable");
    }
    return ok;
  }

  // One trie insert; allocation-free within the room prepare_commit made.
  void insert_run(std::span<const BlockId> run, BlockId parent) {
    digests.clear();
    for (BlockId s : run) digests.push_back(slot_digest(s));
    InsertOptions io;
    if (parent != kNoSlot) io.parent = slot_digest(parent);
    // Trusted, so the trie skips its checks (distinct digests, none cached, a chain continuing
    // `parent`; distinct, allocated, uncached block ids). They hold by the index's own slot states,
    // whatever keys an engine uses: the trie never sees those keys (vLLM's block hashes stay in the
    // binding's key -> slot maps; a key equal to a slot digest is just another key there), only
    // slot_digest(slot), one per slot. `run` is pending slots, checked in range, pending and
    // unrepeated by check_pending: each allocated once (its reservation) and in no trie node (a
    // slot leaves the trie when evicted, and is reserved only when free), so its name is uncached
    // and no cached digest follows it. `parent` is resident, or was inserted earlier in this commit
    // (plan_parents; parents-to-be are reserved first, and a reused one fails the generation
    // check). tests/python/test_offload_index.py drives the binding with keys that are no chain.
    io.trusted_chain = true;
    [[maybe_unused]] const InsertResult r = trie->insert(digests, run, io);
    assert(r.num_inserted == run.size());
  }

  // Sorts pending `slots` into reservation order.
  void by_reservation(std::span<BlockId> slots) const {
    std::sort(slots.begin(), slots.end(),
              [this](BlockId a, BlockId b) { return seq[static_cast<std::size_t>(a)] < seq[static_cast<std::size_t>(b)]; });
  }

  // Every allocation a commit of `slots` makes, before anything changes: the trie's room for the
  // inserts of all its runs, and the scratch they use. Throws std::bad_alloc, changing nothing.
  void prepare_commit(std::span<const BlockId> slots) {
    parents.resize(slots.size());
    digests.reserve(slots.size());
    trie->reserve_insert(slots);
  }

  // Each of `sorted`'s parent once committed (to `parents`): its parent-to-be when that is resident,
  // or committed before it in this call, with the generation it had at reservation; else the root.
  void plan_parents(std::span<const BlockId> sorted) noexcept {
    const std::uint32_t s = next_stamp();  // `ancestor` here marks "committed earlier in this call"
    for (std::size_t i = 0; i < sorted.size(); ++i) {
      const auto u = static_cast<std::size_t>(sorted[i]);
      const BlockId p = link[u];
      const bool valid = p != kNoSlot && p != sorted[i] &&
                         (state[static_cast<std::size_t>(p)] == SlotState::kResident ||
                          ancestor[static_cast<std::size_t>(p)] == s) &&
                         gen[static_cast<std::size_t>(p)] == link_gen[u];
      parents[i] = valid ? p : kNoSlot;
      ancestor[u] = s;
    }
  }

  // The commit phase, after prepare_commit: inserts each run of `sorted` (a slot whose parent is
  // the slot before it continues the run), then marks the slots resident. The inserts cannot fail:
  // their slots are allocated and uncached, their parents cached, and the trie has the room.
  void apply_commit(std::span<const BlockId> sorted) noexcept {
    std::size_t run_begin = 0;
    for (std::size_t i = 1; i < sorted.size(); ++i) {
      if (parents[i] != sorted[i - 1]) {
        insert_run(sorted.subspan(run_begin, i - run_begin), parents[run_begin]);
        run_begin = i;
      }
    }
    if (!sorted.empty()) insert_run(sorted.subspan(run_begin), parents[run_begin]);
    for (std::size_t i = 0; i < sorted.size(); ++i) {
      const auto u = static_cast<std::size_t>(sorted[i]);
      link[u] = parents[i];
      state[u] = SlotState::kResident;
    }
  }
};

OffloadIndex::OffloadIndex(const OffloadIndexOptions& options) : num_slots_(options.num_slots) {
  options.validate();
  impl_ = std::make_unique<Impl>(options);
}

OffloadIndex::~OffloadIndex() = default;

bool OffloadIndex::reserve(std::span<const BlockId> call, BlockId first_prev, std::span<BlockId> reserved,
                           std::vector<BlockId>& evicted) {
  Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  std::size_t count = 0;
  for (std::size_t i = 0; i < call.size(); ++i) {
    if (call[i] == kNoSlot) {
      ++count;
      continue;
    }
    m.check_range(call[i], "call", i);
    if (m.state[static_cast<std::size_t>(call[i])] == SlotState::kFree) {
      throw Error(ErrorCode::kInvalidArgument, "call[" + std::to_string(i) + "]: " + slot_text(call[i]) + " is free");
    }
  }
  if (reserved.size() != count) {
    throw Error(ErrorCode::kInvalidArgument, "reserved has " + std::to_string(reserved.size()) +
                                                 " entries for " + std::to_string(count) + " new chunks");
  }
  std::uint32_t first_gen = 0;
  if (first_prev != kNoSlot) {
    m.check_range(first_prev, "first_prev", 0);
    if (m.state[static_cast<std::size_t>(first_prev)] == SlotState::kFree) {
      throw Error(ErrorCode::kInvalidArgument, "first_prev: " + slot_text(first_prev) + " is free");
    }
    first_gen = m.gen[static_cast<std::size_t>(first_prev)];  // before eviction may reuse it
  }
  if (count == 0) return true;
  const std::uint32_t available = m.alloc->num_available();
  if (count > available && !m.evict(static_cast<std::uint32_t>(count) - available, call, evicted)) return false;
  if (!m.alloc->allocate(reserved).ok()) throw Error(ErrorCode::kInternal, "offload index: slots counted free are not");
  // commit phase: cannot fail
  BlockId prev = first_prev;
  std::uint32_t prev_gen = first_gen;
  std::size_t next = 0;
  for (const BlockId entry : call) {
    BlockId slot = entry;
    if (entry == kNoSlot) {
      slot = reserved[next++];
      const auto u = static_cast<std::size_t>(slot);
      m.state[u] = SlotState::kPending;
      ++m.gen[u];
      m.link[u] = prev;
      m.link_gen[u] = prev_gen;
      m.seq[u] = m.next_seq++;
    }
    prev = slot;
    prev_gen = m.gen[static_cast<std::size_t>(slot)];
  }
  m.pending += static_cast<std::uint32_t>(count);
  return true;
}

void OffloadIndex::commit(std::span<BlockId> slots) {
  Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.check_pending(slots, "slots");
  m.prepare_commit(slots);  // the last step that can throw: nothing changed, `slots` untouched
  m.by_reservation(slots);
  m.plan_parents(slots);
  m.apply_commit(slots);  // the trie took its own reference on each slot; drop the reservation's
  if (!detail::free_held(*m.alloc, slots).ok()) {
    throw Error(ErrorCode::kInternal, "offload index: dropping reservations failed");
  }
  m.pending -= static_cast<std::uint32_t>(slots.size());
}

void OffloadIndex::abandon(std::span<BlockId> slots) {
  Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.check_pending(slots, "slots");
  m.by_reservation(slots);  // the free list's order (later slot numbers) must not follow the caller's
  for (BlockId s : slots) m.state[static_cast<std::size_t>(s)] = SlotState::kFree;
  if (!detail::free_held(*m.alloc, slots).ok()) {
    throw Error(ErrorCode::kInternal, "offload index: freeing reservations failed");
  }
  m.pending -= static_cast<std::uint32_t>(slots.size());
}

void OffloadIndex::pin(std::span<const BlockId> slots) {
  Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.check_resident(slots, "slots");
  m.pin(slots);
}

void OffloadIndex::unpin(std::span<const BlockId> slots) {
  Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.check_resident(slots, "slots");
  // every listed slot (once, however often listed) must have a load in flight: else nothing changes
  const std::uint32_t s = m.next_stamp();
  for (std::size_t i = 0; i < slots.size(); ++i) {
    const auto u = static_cast<std::size_t>(slots[i]);
    if (m.seen[u] == s) continue;
    m.seen[u] = s;
    if (m.load_group[u] == Impl::kNoGroup) {
      throw Error(ErrorCode::kRefCountUnderflow,
                  "slots[" + std::to_string(i) + "]: " + slot_text(slots[i]) + " has no load in flight");
    }
  }
  // cannot fail from here: erasing and releasing allocate nothing
  const std::uint32_t s2 = m.next_stamp();
  for (BlockId slot : slots) {
    const auto u = static_cast<std::size_t>(slot);
    if (m.seen[u] == s2) continue;
    m.seen[u] = s2;
    std::uint32_t g = 0;
    const auto more = m.more_groups.find(slot);
    if (more != m.more_groups.end()) {
      g = more->second;
      m.more_groups.erase(more);
    } else {
      g = m.load_group[u];
      m.load_group[u] = Impl::kNoGroup;
    }
    if (--m.groups[g].left == 0) m.release_group(g);
  }
}

void OffloadIndex::touch(std::span<const BlockId> slots) {
  Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.order.clear();
  for (BlockId s : slots) {
    if (s >= 0 && static_cast<std::uint32_t>(s) < num_slots_ && m.state[static_cast<std::size_t>(s)] == SlotState::kResident) {
      m.order.push_back(s);
    }
  }
  m.cover(m.order);
  m.ids.resize(m.digests.size());
  for (std::size_t i = 0; i < m.path_ends.size(); ++i) {
    const std::span<const BlockHash> p = m.path(i);
    (void)m.trie->probe(p, std::span<BlockId>(m.ids).first(p.size()));
  }
}

void OffloadIndex::reset() {
  Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.start();
}

SlotState OffloadIndex::state(BlockId slot) const {
  const Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.check_range(slot, "slot", 0);
  return m.state[static_cast<std::size_t>(slot)];
}

BlockId OffloadIndex::parent(BlockId slot) const {
  const Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.check_range(slot, "slot", 0);
  if (m.state[static_cast<std::size_t>(slot)] != SlotState::kResident) {
    throw Error(ErrorCode::kInvalidArgument, slot_text(slot) + " is not resident");
  }
  return m.link[static_cast<std::size_t>(slot)];
}

OffloadIndexStats OffloadIndex::stats() const {
  const Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  OffloadIndexStats s;
  s.num_slots = num_slots_;
  s.trie = m.trie->stats();
  s.free_slots = m.alloc->num_available();
  s.pending_slots = m.pending;
  s.resident_slots = s.trie.cached_blocks;
  s.evictions = m.evictions;
  return s;
}

void OffloadIndex::check_invariants() const {
  const Impl& m = *impl_;
  const std::lock_guard lock(m.mu);
  m.trie->check_invariants();
  auto fail = [](const std::string& what) { throw Error(ErrorCode::kInternal, "offload index: " + what); };
  std::uint32_t pending = 0;
  std::uint32_t resident = 0;
  for (std::uint32_t i = 0; i < num_slots_; ++i) {
    const auto slot = static_cast<BlockId>(i);
    const std::uint32_t refs = m.alloc->ref_count(slot);
    const auto node = m.trie->lookup(slot_digest(slot));
    switch (m.state[i]) {
      case SlotState::kFree:
        if (refs != 0 || node) fail(slot_text(slot) + " is free but allocated or cached");
        break;
      case SlotState::kPending:
        ++pending;
        if (refs != 1 || node) fail(slot_text(slot) + " is pending but not held once, or cached");
        break;
      case SlotState::kResident: {
        ++resident;
        if (refs != 1 || !node || node->block_id != slot) fail(slot_text(slot) + " is resident but not cached as itself");
        const BlockId p = m.link[i];
        const bool root = !node->parent || *node->parent == kRootBlockHash;
        if (root != (p == kNoSlot) || (p != kNoSlot && *node->parent != slot_digest(p))) {
          fail(slot_text(slot) + "'s parent differs from its trie node's");
        }
        break;
      }
    }
  }
  std::uint64_t listed = m.more_groups.size();
  for (std::uint32_t i = 0; i < num_slots_; ++i) {
    if (m.load_group[i] == Impl::kNoGroup) continue;
    ++listed;
    if (m.state[i] != SlotState::kResident) fail(slot_text(static_cast<BlockId>(i)) + " is loading but not resident");
  }
  std::uint64_t left = 0;
  for (const auto& g : m.groups) left += g.left;
  if (listed != left) fail("loads in flight " + std::to_string(listed) + " != their groups' " + std::to_string(left));
  if (pending != m.pending) fail("pending count " + std::to_string(m.pending) + " != " + std::to_string(pending));
  if (resident != m.trie->size()) fail("resident slots " + std::to_string(resident) + " != trie size");
  if (m.alloc->num_available() != num_slots_ - pending - resident) fail("free count disagrees with the allocator");
}

}  // namespace sagellm::kv
