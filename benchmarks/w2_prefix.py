"""W2: 20,000 requests (1 of 1,000 shared 1,024-token prompts + 256 fresh tokens), each hashed,
matched and inserted; unbounded cache. Ours: the native request manager (one admit + one finish per
request, token ids as Python lists), the numpy fast path (RadixPrefixCache over a PagedKVPool,
SHA-256) and the seed-compatible PrefixCache; reference: vLLM semantics in Python."""

from __future__ import annotations

import gc
import time

from common import Row
from prefix_workload import PyPrefixCacheReference, make_requests
from sagellm_kv_cache import KVCacheSpec, PagedKVPool, _core
from sagellm_kv_cache.manager import RequestManager
from sagellm_kv_cache.prefix_cache import PrefixCache, RadixPrefixCache


def run_fast_path(requests: list, capacity_blocks: int | None, pool_blocks: int,
                  hash_algorithm: str = "sha256") -> tuple[float, float, dict]:
    """Seconds per request and token hit ratio of the scheduler flow through the numpy fast path."""
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=16)
    pool = PagedKVPool(spec, pool_blocks, zero_fill=False)
    cache = RadixPrefixCache(block_size=16, capacity_blocks=capacity_blocks, pool=pool, hash_algorithm=hash_algorithm)
    hits = queried = 0
    start = time.perf_counter()
    for tokens in requests:
        matched, _, digests = cache.match_tokens(tokens)
        missing = len(digests) - matched
        fresh = pool.allocate(missing)
        cache.insert(digests[matched:], fresh, parent=digests[matched - 1] if matched else None)
        pool.free(fresh)
        cache.release(digests[:matched])
        hits += matched
        queried += len(digests)
    elapsed = time.perf_counter() - start
    return elapsed / len(requests), hits / queried, cache.stats()


def run_manager(token_lists: list[list[int]], capacity_blocks: int | None, pool_blocks: int,
                hash_algorithm: str = "sha256") -> tuple[float, float]:
    """Seconds per request and block hit ratio through the native RequestManager, tokens as lists.

    match_last_token=True matches every full block, as the fast-path flow does (no W2 prompt is
    fully cached, so the figures are the same either way).
    """
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=16)
    pool = PagedKVPool(spec, pool_blocks, zero_fill=False)
    rm = RequestManager(pool, capacity_blocks=capacity_blocks, hash_algorithm=hash_algorithm, match_last_token=True)
    admit, finish = rm.admit, rm.finish
    # As timeit does: no cyclic GC passes over the millions of token ints held here while timing.
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for i, tokens in enumerate(token_lists):
            admit(i, tokens)
            finish(i)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    stats = rm.stats()
    return elapsed / len(token_lists), stats["hit_blocks"] / stats["queried_blocks"]


def run_seed_api(token_lists: list[list[int]], capacity_blocks: int | None) -> tuple[float, float]:
    """Seconds per request and block hit ratio through the seed PrefixCache, tokens as lists (as the
    sageLLM engine holds them): compute_block_hashes + lookup + insert, a dict per new block."""
    cache = PrefixCache(block_size=16, max_cached_blocks=capacity_blocks)
    hits = queried = 0
    next_block = 0
    gc.collect()
    gc.disable()  # as in run_manager
    try:
        start = time.perf_counter()
        for tokens in token_lists:
            hashes = cache.compute_block_hashes(tokens)
            found, _ = cache.lookup(hashes)
            fresh = [{"block_id": next_block + j} for j in range(len(hashes) - len(found))]
            next_block += len(fresh)
            cache.insert(hashes, found + fresh)
            hits += len(found)
            queried += len(hashes)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / len(token_lists), hits / queried


def run_hash_only(token_lists: list[list[int]], hash_algorithm: str) -> float:
    """Seconds per request of reading the token list and hashing its full blocks, nothing else: the
    floor under every W2 path with that hash."""
    gc.collect()
    gc.disable()  # as in run_manager
    try:
        start = time.perf_counter()
        for tokens in token_lists:
            _core.hash_blocks(tokens, 16, algorithm=hash_algorithm)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / len(token_lists)


def run_seed_keys_only(token_lists: list[list[int]]) -> float:
    """Seconds per request of the seed API's block keys alone (``compute_block_hashes``: one plain
    SHA-256 per block, two compressions each, and a bytes object per block): the part of the seed
    API's figure that its key format fixes."""
    cache = PrefixCache(block_size=16)
    gc.collect()
    gc.disable()  # as in run_manager
    try:
        start = time.perf_counter()
        for tokens in token_lists:
            cache.compute_block_hashes(tokens)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / len(token_lists)


def run_reference(requests: list, pool_blocks: int) -> tuple[float, float]:
    ref = PyPrefixCacheReference(pool_blocks)
    start = time.perf_counter()
    for tokens in requests:
        ref.run_request(tokens)
    elapsed = time.perf_counter() - start
    return elapsed / len(requests), ref.hits / ref.queried


def run(quick: bool = False) -> list[Row]:
    requests = make_requests(4_000 if quick else 20_000, 200 if quick else 1_000)
    total_blocks = sum(len(r) // 16 for r in requests)
    token_lists = [r.tolist() for r in requests]
    manager, manager_ratio = run_manager(token_lists, None, total_blocks)
    manager_xxh, _ = run_manager(token_lists, None, total_blocks, "xxh3_128")
    ours, ours_ratio, stats = run_fast_path(requests, None, total_blocks)
    fast, _, _ = run_fast_path(requests, None, total_blocks, "xxh3_128")
    seed, seed_ratio = run_seed_api(token_lists, None)
    ref, ref_ratio = run_reference(requests, total_blocks)
    extra = {"hit_ratio_ours": ours_ratio, "hit_ratio_seed_api": seed_ratio, "hit_ratio_reference": ref_ratio,
             "hit_ratio_manager": manager_ratio, "cached_blocks": stats["cached_blocks"],
             "read_and_hash_us_sha256": run_hash_only(token_lists, "sha256") * 1e6,
             "read_and_hash_us_xxh3_128": run_hash_only(token_lists, "xxh3_128") * 1e6,
             "seed_keys_us": run_seed_keys_only(token_lists) * 1e6}
    return [
        Row("W2 prefix, unbounded (manager, lists)", "us/request", manager * 1e6, ref * 1e6, "vLLM semantics, Python"),
        Row("W2 ... manager, xxh3_128 hash", "us/request", manager_xxh * 1e6, ref * 1e6,
            "vLLM semantics, Python (SHA-256)"),
        Row("W2 prefix, unbounded (fast path)", "us/request", ours * 1e6, ref * 1e6, "vLLM semantics, Python",
            extra=extra),
        Row("W2 prefix, unbounded (seed API)", "us/request", seed * 1e6, ref * 1e6, "vLLM semantics, Python"),
        Row("W2 ... fast path, xxh3_128 hash", "us/request", fast * 1e6, ref * 1e6, "vLLM semantics, Python (SHA-256)"),
    ]
