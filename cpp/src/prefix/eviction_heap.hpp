// Private: the ordered set of evictable nodes of the prefix cache.
//
// An indexed binary min-heap of {key, node}: push, erase and re-key any node in O(log n), the
// victim in O(1), and no allocation per operation once the arrays have grown (std::set would
// allocate per insert). Keys are cached in the entries, so sifting never reads the node records;
// positions live in a side array indexed by node.
#pragma once

#include <cassert>
#include <compare>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/grow.hpp"

namespace sagellm::kv::detail {

/// Eviction order: smaller goes first. `major` carries the priority (or 0); `minor` a unique tick.
struct HeapKey {
  std::int64_t major = 0;
  std::uint64_t minor = 0;

  auto operator<=>(const HeapKey&) const = default;
};

class EvictionHeap {
 public:
  static constexpr std::uint32_t kAbsent = std::numeric_limits<std::uint32_t>::max();

  /// Makes room for node indices below `n`.
  void reserve_nodes(std::uint32_t n) {
    if (pos_.size() < n) pos_.resize(n, kAbsent);
  }

  /// Makes room for `n` entries, so pushes up to that size do not allocate. Grows geometrically:
  /// the cache asks for its leaf count + 1 before every insert, and an exact reserve would copy the
  /// whole heap each time.
  void reserve_entries(std::size_t n) { grow_to(heap_, n); }

  [[nodiscard]] bool empty() const noexcept { return heap_.empty(); }
  [[nodiscard]] std::uint32_t size() const noexcept { return static_cast<std::uint32_t>(heap_.size()); }
  [[nodiscard]] bool contains(std::uint32_t node) const noexcept {
    return node < pos_.size() && pos_[node] != kAbsent;
  }
  /// Node with the smallest key; the heap must not be empty.
  [[nodiscard]] std::uint32_t top() const noexcept { return heap_.front().node; }
  /// Key of top(); the heap must not be empty.
  [[nodiscard]] HeapKey top_key() const noexcept { return heap_.front().key; }
  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    return heap_.capacity() * sizeof(Entry) + pos_.capacity() * sizeof(std::uint32_t);
  }

  /// Entries the heap holds without allocating.
  [[nodiscard]] std::size_t entry_capacity() const noexcept { return heap_.capacity(); }

  /// Adds `node`, which must not be present (and below reserve_nodes()), within the capacity
  /// reserve_entries() made: never allocates, so it may run in noexcept cleanup.
  void push(std::uint32_t node, HeapKey key) noexcept {
    assert(node < pos_.size() && pos_[node] == kAbsent);
    assert(heap_.size() < heap_.capacity());
    heap_.push_back({key, node});
    const auto i = static_cast<std::uint32_t>(heap_.size() - 1);
    pos_[node] = i;
    sift_up(i);
  }

  /// Removes `node` when present.
  void erase(std::uint32_t node) noexcept {
    if (!contains(node)) return;
    const std::uint32_t i = pos_[node];
    pos_[node] = kAbsent;
    const auto last = static_cast<std::uint32_t>(heap_.size() - 1);
    if (i != last) {
      heap_[i] = heap_[last];
      pos_[heap_[i].node] = i;
      heap_.pop_back();
      restore(i);
    } else {
      heap_.pop_back();
    }
  }

  /// Changes the key of `node` when present.
  void update(std::uint32_t node, HeapKey key) noexcept {
    if (!contains(node)) return;
    const std::uint32_t i = pos_[node];
    heap_[i].key = key;
    restore(i);
  }

  void clear() noexcept {
    for (const Entry& e : heap_) pos_[e.node] = kAbsent;
    heap_.clear();
  }

  /// Checks the heap order and the position array; for invariant checks in tests.
  [[nodiscard]] bool valid() const noexcept {
    for (std::size_t i = 0; i < heap_.size(); ++i) {
      if (pos_[heap_[i].node] != i) return false;
      if (i > 0 && heap_[i].key < heap_[(i - 1) / 2].key) return false;
    }
    std::size_t present = 0;
    for (std::uint32_t p : pos_) present += p != kAbsent ? 1 : 0;
    return present == heap_.size();
  }

 private:
  struct Entry {
    HeapKey key;
    std::uint32_t node;
  };

  void restore(std::uint32_t i) noexcept {
    if (i > 0 && heap_[i].key < heap_[(i - 1) / 2].key) {
      sift_up(i);
    } else {
      sift_down(i);
    }
  }

  void sift_up(std::uint32_t i) noexcept {
    const Entry e = heap_[i];
    while (i > 0) {
      const std::uint32_t parent = (i - 1) / 2;
      if (!(e.key < heap_[parent].key)) break;
      heap_[i] = heap_[parent];
      pos_[heap_[i].node] = i;
      i = parent;
    }
    heap_[i] = e;
    pos_[e.node] = i;
  }

  void sift_down(std::uint32_t i) noexcept {
    const Entry e = heap_[i];
    const auto n = static_cast<std::uint32_t>(heap_.size());
    for (;;) {
      std::uint32_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && heap_[child + 1].key < heap_[child].key) ++child;
      if (!(heap_[child].key < e.key)) break;
      heap_[i] = heap_[child];
      pos_[heap_[i].node] = i;
      i = child;
    }
    heap_[i] = e;
    pos_[e.node] = i;
  }

  std::vector<Entry> heap_;
  std::vector<std::uint32_t> pos_;
};

}  // namespace sagellm::kv::detail
