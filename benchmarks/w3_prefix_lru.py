"""W3: the W2 workload with the cache bounded to 8,192 blocks under LRU (eviction on the hot path)."""

from __future__ import annotations

from common import Row
from prefix_workload import PyPrefixCacheReference, make_requests
from w2_prefix import run_fast_path, run_manager, run_seed_api

CAPACITY = 8_192
MAX_REQUEST_BLOCKS = 80


def run(quick: bool = False) -> list[Row]:
    requests = make_requests(4_000 if quick else 20_000, 200 if quick else 1_000)
    # The cache holds up to CAPACITY blocks; the request being served may hold 80 more.
    token_lists = [r.tolist() for r in requests]
    manager, manager_ratio = run_manager(token_lists, CAPACITY, CAPACITY + MAX_REQUEST_BLOCKS)
    manager_xxh, _ = run_manager(token_lists, CAPACITY, CAPACITY + MAX_REQUEST_BLOCKS, "xxh3_128")
    ours, ours_ratio, stats = run_fast_path(requests, CAPACITY, CAPACITY + MAX_REQUEST_BLOCKS)
    seed, seed_ratio = run_seed_api(token_lists, CAPACITY)
    ref = PyPrefixCacheReference(CAPACITY + MAX_REQUEST_BLOCKS)
    import time

    start = time.perf_counter()
    for tokens in requests:
        ref.run_request(tokens)
    ref_s = (time.perf_counter() - start) / len(requests)
    extra = {"hit_ratio_ours": ours_ratio, "hit_ratio_seed_api": seed_ratio,
             "hit_ratio_reference": ref.hits / ref.queried, "hit_ratio_manager": manager_ratio,
             "evictions": stats["evictions"]}
    return [
        Row("W3 prefix, 8,192 LRU (manager, lists)", "us/request", manager * 1e6, ref_s * 1e6,
            "vLLM semantics, Python"),
        Row("W3 ... manager, xxh3_128 hash", "us/request", manager_xxh * 1e6, ref_s * 1e6,
            "vLLM semantics, Python (SHA-256)"),
        Row("W3 prefix, 8,192 blocks LRU (fast path)", "us/request", ours * 1e6, ref_s * 1e6,
            "vLLM semantics, Python", extra=extra),
        Row("W3 prefix, 8,192 blocks LRU (seed API)", "us/request", seed * 1e6, ref_s * 1e6, "vLLM semantics, Python"),
    ]
