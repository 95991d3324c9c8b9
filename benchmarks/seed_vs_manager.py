"""The seed PrefixCache against the native RequestManager on the W2/W3 workload, interleaved.

    python benchmarks/seed_vs_manager.py [num_requests] [num_prompts]    # default 20000 1000

run.py times each path in one pass after the other, so on a shared machine a burst of load lands
on one row only. Here both paths serve the same 200-request chunks in turn (each keeps its own
cache across chunks), which makes their ratio stable under load. Token ids are Python lists; the
seed path is compute_block_hashes + lookup + insert with a dict per new block, as in run.py.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefix_workload import make_requests
from sagellm_kv_cache import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.manager import RequestManager
from sagellm_kv_cache.prefix_cache import PrefixCache

CHUNK = 200


def compare(token_lists: list[list[int]], capacity: int | None, pool_blocks: int) -> tuple[float, float]:
    """Seconds per request of (manager, seed API) over the same requests, chunk by chunk."""
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=16)
    manager = RequestManager(PagedKVPool(spec, pool_blocks, zero_fill=False), capacity_blocks=capacity,
                             match_last_token=True)
    cache = PrefixCache(block_size=16, max_cached_blocks=capacity)
    manager_s = seed_s = 0.0
    next_block = 0
    gc.collect()
    gc.disable()
    try:
        for first in range(0, len(token_lists), CHUNK):
            chunk = token_lists[first : first + CHUNK]
            start = time.perf_counter()
            for i, tokens in enumerate(chunk, first):
                manager.admit(i, tokens)
                manager.finish(i)
            middle = time.perf_counter()
            for tokens in chunk:
                hashes = cache.compute_block_hashes(tokens)
                found, _ = cache.lookup(hashes)
                fresh = [{"block_id": next_block + j} for j in range(len(hashes) - len(found))]
                next_block += len(fresh)
                cache.insert(hashes, found + fresh)
            manager_s += middle - start
            seed_s += time.perf_counter() - middle
    finally:
        gc.enable()
    return manager_s / len(token_lists), seed_s / len(token_lists)


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_requests", nargs="?", type=_positive, default=20_000,
                        help="requests of the W2/W3 trace (default 20000)")
    parser.add_argument("num_prompts", nargs="?", type=_positive, default=1_000,
                        help="shared 1,024-token prompts they draw from (default 1000)")
    args = parser.parse_args(argv)
    requests = make_requests(args.num_requests, args.num_prompts)
    token_lists = [r.tolist() for r in requests]
    total_blocks = sum(len(r) // 16 for r in requests)
    for name, capacity, pool_blocks in (("W2 unbounded", None, total_blocks), ("W3 8,192 LRU", 8_192, 8_192 + 80)):
        manager, seed = compare(token_lists, capacity, pool_blocks)
        print(f"{name}: manager {manager * 1e6:.1f} us/request, seed API {seed * 1e6:.1f} us/request, "
              f"seed/manager {seed / manager:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
