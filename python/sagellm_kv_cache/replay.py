"""Replay of Mooncake-format request traces through the real prefix cache and paged pool.

Each request's ``hash_ids`` name its 512-token prompt blocks; an id already encodes every block
before it. The replay turns a request's ids into chained block digests with one C++ call (each id
is one "token" of a 1-token hashing block, so equal id prefixes give equal digest prefixes), then
runs what a scheduler does per request: match the longest cached prefix (taking references),
allocate the missing blocks from the pool, insert them after "prefill", and release everything at
the end. Hit ratio = blocks hit / blocks requested, the measure of the traces' reference table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from sagellm_kv_cache.paged import KVCacheSpec, PagedKVPool
from sagellm_kv_cache.prefix_cache import RadixPrefixCache

__all__ = ["TRACE_BLOCK_TOKENS", "ReplayResult", "TraceError", "load_trace", "replay", "sample_trace_path"]

TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class ReplayResult:
    trace: str
    capacity_blocks: int | None
    policy: str
    requests: int
    blocks: int
    hits: int
    hit_ratio: float
    evictions: int
    requests_per_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sample_trace_path() -> Path:
    """The small sample shipped in the package (first 600 requests of Mooncake's synthetic trace)."""
    return Path(str(resources.files("sagellm_kv_cache") / "data" / "mooncake_synthetic_sample.jsonl"))


def load_trace(path: str | Path) -> list[np.ndarray]:
    """Reads a trace into one int64 array of hash ids per request, checking every line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace: {exc.strerror or exc}") from None
    requests: list[np.ndarray] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        ids = record.get("hash_ids") if isinstance(record, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TraceError(f"{path}:{lineno}: 'hash_ids' must be a list of integers")
        if any(i < 0 or i >= 2**31 for i in ids):
            raise TraceError(f"{path}:{lineno}: hash ids must be in [0, 2^31)")
        requests.append(np.asarray(ids, dtype=np.int64))
    if not requests:
        raise TraceError(f"{path}: the trace holds no requests")
    return requests


def replay(
    requests: Sequence[np.ndarray],
    capacity_blocks: int | None,
    policy: str = "lru",
    *,
    trace_name: str = "trace",
) -> ReplayResult:
    """Replays ``requests`` through a fresh cache of ``capacity_blocks`` (None: unbounded)."""
    if capacity_blocks is not None and capacity_blocks <= 0:
        raise ValueError(f"capacity_blocks must be > 0 or None, got {capacity_blocks}")
    longest = max(len(r) for r in requests)
    if capacity_blocks is None:
        pool_blocks = len(np.unique(np.concatenate(requests))) + longest
    else:
        pool_blocks = capacity_blocks + longest
    # One byte per token and a single head: the replay needs real block ids, not model-sized memory.
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype="int8", block_size=TRACE_BLOCK_TOKENS)
    pool = PagedKVPool(spec, pool_blocks, zero_fill=False)
    cache = RadixPrefixCache(block_size=TRACE_BLOCK_TOKENS, capacity_blocks=capacity_blocks, policy=policy, pool=pool)

    blocks = hits = 0
    start = time.perf_counter()
    for ids in requests:
        if ids.size == 0:
            continue
        digests = cache.hash_tokens(ids, block_size=1)
        matched, _ = cache.match(digests)
        hits += matched
        blocks += len(digests)
        if matched < len(digests):
            fresh = pool.allocate(len(digests) - matched)
            parent = digests[matched - 1] if matched else None
            cache.insert(digests[matched:], fresh, parent=parent)
            pool.free(fresh)  # the cache holds its own reference to what it kept
        cache.release(digests[:matched])
    elapsed = time.perf_counter() - start
    stats = cache.stats()
    return ReplayResult(
        trace=trace_name,
        capacity_blocks=capacity_blocks,
        policy=policy,
        requests=len(requests),
        blocks=blocks,
        hits=hits,
        hit_ratio=hits / blocks if blocks else 0.0,
        evictions=int(stats["evictions"]),
        requests_per_s=len(requests) / elapsed if elapsed > 0 else float("inf"),
    )


def replay_many(
    traces: Iterable[tuple[str, Sequence[np.ndarray]]], capacities: Sequence[int | None], policy: str
) -> list[ReplayResult]:
    return [replay(reqs, cap, policy, trace_name=name) for name, reqs in traces for cap in capacities]
