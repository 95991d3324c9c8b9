"""Prefix caching, end to end: the seed ``PrefixCache`` API, then the native fast path a scheduler uses.

Part 1 is the API of the original package (block hashes in, caller's block dicts out). Part 2 is
what an engine runs per request with real KV memory: hash the prompt in one C++ call, match the
longest cached prefix, allocate only the missing blocks, write their K/V ("prefill"), publish them,
and release at the end; then eviction under a capacity, per-tenant salts, and the event stream a
KV-aware router consumes. Every step prints what it did and checks what it claims.

    python examples/prefix_cache_example.py          # no arguments; runs from any directory
"""

from __future__ import annotations

import numpy as np
from sagellm_kv_cache import KVCacheSpec, PagedKVPool, PrefixCache, RadixPrefixCache

BLOCK = 16


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def seed_api() -> None:
    section("1. Seed API: PrefixCache")
    cache = PrefixCache(block_size=BLOCK, max_cached_blocks=100, enable_lru=True)

    tokens = list(range(48))  # 3 blocks
    hashes = cache.compute_block_hashes(tokens)
    blocks = [{"block_id": i} for i in range(len(hashes))]
    cache.insert(hashes, blocks)
    print(f"inserted {len(hashes)} blocks for a 48-token prompt (chained SHA-256 digests, 32 bytes each)")

    hit_blocks, num_tokens = cache.lookup(hashes)
    print(f"Reused {num_tokens} tokens from cache!")
    assert hit_blocks == blocks

    # A prompt that shares only its first block: the chain breaks at block 2.
    other = cache.compute_block_hashes(list(range(16)) + list(range(900, 932)))
    partial, n = cache.lookup(other)
    print(f"a prompt sharing one block reuses {n} tokens (block ids {[b['block_id'] for b in partial]})")
    assert n == BLOCK

    stats = cache.get_stats()
    print(f"Hit rate: {stats['hit_rate']:.1%} (per block: {stats['hit_count']} hits, {stats['miss_count']} misses)")

    evicted = cache.evict_by_count(1)
    print(f"evict_by_count(1) removed {evicted} block (the least recently used leaf); {len(cache)} remain")
    cache.clear()
    print(f"clear() -> {len(cache)} blocks cached")


def fast_path() -> None:
    section("2. Fast path: PagedKVPool + RadixPrefixCache")
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="fp16", block_size=BLOCK)
    pool = PagedKVPool(spec, num_blocks=64, device="cpu")
    cache = RadixPrefixCache(block_size=BLOCK, capacity_blocks=12, pool=pool, event_queue_capacity=256)
    keys = pool.key_cache(0)  # zero-copy view: (num_blocks, block_size, kv_heads, head_dim)
    print(f"pool: {pool.num_blocks} blocks of {pool.block_nbytes} bytes; cache capacity {cache.capacity_blocks}")

    rng = np.random.default_rng(0)
    system = rng.integers(0, 32000, size=4 * BLOCK, dtype=np.int32)  # a 64-token system prompt

    def serve(name: str, question: np.ndarray) -> None:
        prompt = np.concatenate([system, question])
        digests = cache.hash_tokens(prompt)  # one C++ call for every full block
        hit, reused = cache.match(digests)  # references the matched blocks until release()
        fresh = pool.allocate(len(digests) - hit)  # only what is missing
        keys[fresh] = float(len(name))  # "prefill" writes K/V into the new blocks
        inserted, _ = cache.insert(digests[hit:], fresh, parent=digests[hit - 1] if hit else None)
        pool.free(fresh)  # the request's own references; the cache keeps one on what it cached
        cache.release(digests[:hit])
        print(f"{name}: {len(prompt)} tokens = {len(digests)} full blocks; reused {hit} "
              f"({reused.tolist()}), computed {len(fresh)}, cached {inserted}; "
              f"pool used {pool.num_used_blocks}")

    serve("request A", rng.integers(0, 32000, size=2 * BLOCK + 5, dtype=np.int32))
    serve("request B", rng.integers(0, 32000, size=3 * BLOCK, dtype=np.int32))
    stats = cache.stats()
    print(f"hit tokens {stats['hit_tokens']} of {stats['queried_tokens']} queried; {stats['cached_blocks']} cached")
    assert stats["hit_blocks"] == 4  # request B reused the system prompt

    section("3. Eviction under the capacity")
    for i in range(3):
        serve(f"request C{i}", rng.integers(0, 32000, size=3 * BLOCK, dtype=np.int32))
    stats = cache.stats()
    print(f"{stats['evictions']} blocks evicted (least recently used leaves first); "
          f"{len(cache)} cached <= capacity {cache.capacity_blocks}; pool used {pool.num_used_blocks}")
    assert len(cache) <= 12 and pool.num_used_blocks == len(cache)
    n, _, digests = cache.match_tokens(system)
    cache.release(digests[:n])
    print(f"the shared system prompt is still cached: {n} of {len(digests)} blocks hit")

    section("4. Salts keep tenants apart")
    for tenant in (b"tenant-a", b"tenant-b"):
        n, _, digests = cache.match_tokens(system, salt=tenant)
        cache.release(digests[:n])
        print(f"{tenant.decode()}: same 64 tokens, {n} blocks hit (salted digests differ from unsalted ones)")
        assert n == 0
    ids = pool.allocate(4)
    cache.insert(cache.hash_tokens(system, salt=b"tenant-a"), ids)
    pool.free(ids)
    hits = {}
    for tenant in (b"tenant-a", b"tenant-b"):
        n, _, digests = cache.match_tokens(system, salt=tenant)
        cache.release(digests[:n])
        hits[tenant.decode()] = n
    print(f"after tenant-a cached its copy: {hits}")
    assert hits == {"tenant-a": 4, "tenant-b": 0}

    section("5. Events for a KV-aware router")
    events = cache.drain_events()
    counts = {kind: sum(e["type"] == kind for e in events) for kind in ("stored", "removed", "cleared")}
    print(f"drained {len(events)} events: {counts}")
    first = events[0]
    print(f"first: {first['type']} {len(first['digests'])} blocks, parent={first['parent']}, "
          f"block_size={first['block_size']}")
    removed = cache.clear()
    print(f"clear() removed {removed} blocks -> events {[e['type'] for e in cache.drain_events()]}; "
          f"pool free again: {pool.num_free_blocks}/{pool.num_blocks}")
    assert pool.num_free_blocks == pool.num_blocks


def main() -> None:
    seed_api()
    fast_path()
    print("\nall prefix-cache steps done")


if __name__ == "__main__":
    main()
