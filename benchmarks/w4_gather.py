"""W4: gather/scatter of 1,000 blocks against a plain memcpy of the same bytes (numpy copyto)."""

from __future__ import annotations

import numpy as np
from common import Row, best_of
from sagellm_kv_cache import KVCacheSpec, PagedKVPool


def run(quick: bool = False) -> list[Row]:
    # 4 layers x 8 KV heads x 128 dims x fp16 x 16 tokens: 32 KiB per layer-block, 256 KiB per block.
    spec = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype="fp16", block_size=16)
    pool = PagedKVPool(spec, num_blocks=2048, huge_pages=True)
    n = 1_000
    ids = np.random.default_rng(0).permutation(2048)[:n].astype(np.int32)  # scattered, as in a real pool
    staging = np.empty(n * pool.block_nbytes, dtype=np.uint8)
    src = np.ones_like(staging)
    repeats = 3 if quick else 7
    pool.gather_into(ids, staging)  # warm the pages
    np.copyto(staging, src)
    t_gather = best_of(repeats, lambda: pool.gather_into(ids, staging))
    t_scatter = best_of(repeats, lambda: pool.scatter(staging, ids))
    t_memcpy = best_of(repeats, lambda: np.copyto(staging, src))
    gbps = lambda t: staging.nbytes / t / 1e9  # noqa: E731
    return [
        Row("W4 gather 1,000 blocks", "GB/s", gbps(t_gather), gbps(t_memcpy), "memcpy (numpy copyto)",
            higher_is_better=True, extra={"bytes": staging.nbytes}),
        Row("W4 scatter 1,000 blocks", "GB/s", gbps(t_scatter), gbps(t_memcpy), "memcpy (numpy copyto)",
            higher_is_better=True, extra={"bytes": staging.nbytes}),
    ]
