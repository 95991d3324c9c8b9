"""W8: vLLM 0.33 offloading-manager call sequence, our trie-backed manager vs vLLM's CPUOffloadingManager (LRU).

Both managers are driven by the same workload and the same driver, the way vLLM's offloading connector
calls them for one request: ``on_new_request``, ``lookup`` block by block until the first miss,
``prepare_load`` + ``complete_load`` of the hit prefix, ``prepare_store`` + ``complete_store`` of the rest,
``on_request_finished``. Keys are vLLM-shaped (32-byte block hash + 4-byte group). Requests share
prefixes (a few hundred system prompts, each continued by a private tail); the tier holds about half
of the distinct blocks, so it evicts. Reported: ns per manager call, and both hit counts (same policy,
so they should be close). Needs vLLM importable (``VLLM_TARGET_DEVICE=cpu``); skipped otherwise.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

from common import Row

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def _workload(num_requests: int, seed: int = 0) -> tuple[list[tuple[str, list[bytes]]], int]:
    rng = random.Random(seed)
    prefixes = [[rng.randbytes(32) + b"\0\0\0\0" for _ in range(rng.randrange(8, 48))] for _ in range(300)]
    requests, distinct = [], set()
    for i in range(num_requests):
        prefix = prefixes[min(int(rng.expovariate(1 / 40)), len(prefixes) - 1)]
        keys = prefix + [rng.randbytes(32) + b"\0\0\0\0" for _ in range(rng.randrange(1, 16))]
        distinct.update(keys)
        requests.append((f"req-{i}", keys))
    return requests, len(distinct)


def _drive(manager: Any, requests: list[tuple[str, list[bytes]]]) -> tuple[int, int]:
    """Runs the connector-shaped call sequence; returns (manager calls, hit blocks)."""
    from vllm.v1.kv_offload.base import LookupResult, ReqContext

    calls = hits = 0
    hit_result = LookupResult.HIT
    for rid, keys in requests:
        ctx = ReqContext(rid)
        manager.on_new_request(ctx)
        n = 0
        for key in keys:
            calls += 1
            if manager.lookup(key, ctx) is not hit_result:
                break
            n += 1
        if n:
            manager.prepare_load(keys[:n], ctx)
            manager.complete_load(keys[:n], ctx)
            calls += 2
        out = manager.prepare_store(keys[n:], ctx)
        calls += 1
        if out is not None and out.keys_to_store:
            manager.complete_store(out.keys_to_store, ctx)
            calls += 1
        manager.on_request_finished(ctx)
        calls += 2
        hits += n
    return calls, hits


def run(quick: bool = False) -> list[Row]:
    try:
        from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

        from sagellm_kv_cache.integrations.vllm_offload import SageOffloadingManager
    except ImportError as exc:  # vLLM is optional
        print(f"W8: skipped (vLLM not importable: {exc})", file=sys.stderr)
        return []
    requests, distinct = _workload(3_000 if quick else 20_000)
    capacity = distinct // 2
    repeats = 2 if quick else 3
    ours_t = ref_t = float("inf")
    ours_hits = ref_hits = calls = 0
    for _ in range(repeats):  # a fresh manager each time: the sequence starts from an empty tier
        ours = SageOffloadingManager(capacity)
        start = time.perf_counter()
        calls, ours_hits = _drive(ours, requests)
        ours_t = min(ours_t, time.perf_counter() - start)
        ref = CPUOffloadingManager(num_chunks=capacity, cache_policy="lru")
        start = time.perf_counter()
        ref_calls, ref_hits = _drive(ref, requests)
        ref_t = min(ref_t, time.perf_counter() - start)
    blocks = sum(len(k) for _, k in requests)
    extra = {"requests": len(requests), "blocks": blocks, "capacity_chunks": capacity, "manager_calls": calls,
             "ours_hit_ratio": ours_hits / blocks, "vllm_hit_ratio": ref_hits / blocks}
    return [Row("W8 vLLM offload manager calls", "ns/call", ours_t / calls * 1e9, ref_t / ref_calls * 1e9,
                "vLLM 0.33 CPUOffloadingManager (LRU)", extra=extra)]


if __name__ == "__main__":
    from common import print_table

    rows = run(quick="--quick" in sys.argv)
    print_table(rows)
    for r in rows:
        for key, value in r.extra.items():
            print(f"  {key} = {value:.4g}" if isinstance(value, float) else f"  {key} = {value}")
