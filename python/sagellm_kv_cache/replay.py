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

__all__ = ["TRACE_BLOCK_TOKENS", "ReplayResult", "TraceError", "load_trace", "replay", "replay_tiered",
           "sample_trace_path"]

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
    # Tiered replays only (see replay_tiered); None for a single-tier replay.
    host_blocks: int | None = None
    disk_blocks: int | None = None
    block_bytes: int | None = None
    hits_by_tier: dict[str, int] | None = None
    hit_ratio_by_tier: dict[str, float] | None = None
    tokens_saved_by_tier: dict[str, int] | None = None
    bytes_moved: dict[str, int] | None = None
    copy_seconds: dict[str, float] | None = None
    bandwidth_bytes_per_s: dict[str, float | None] | None = None
    disk_direct_io: bool | None = None
    verified_blocks: int | None = None

    def to_dict(self) -> dict[str, object]:
        """All fields; a single-tier replay leaves out the tiered ones (its rows keep their shape)."""
        d = asdict(self)
        if not self.tiered:
            for name in _TIER_FIELDS:
                d.pop(name)
        return d

    @property
    def tiered(self) -> bool:
        return self.hits_by_tier is not None


_TIER_FIELDS = ("host_blocks", "disk_blocks", "block_bytes", "hits_by_tier", "hit_ratio_by_tier",
                "tokens_saved_by_tier", "bytes_moved", "copy_seconds", "bandwidth_bytes_per_s", "disk_direct_io",
                "verified_blocks")


def sample_trace_path() -> Path:
    """The small sample shipped in the package (first 600 requests of Mooncake's synthetic trace)."""
    return Path(str(resources.files("sagellm_kv_cache") / "data" / "mooncake_synthetic_sample.jsonl"))


def load_trace(path: str | Path) -> list[np.ndarray]:
    """Reads a trace into one int64 array of hash ids per request, checking every line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is not JSON
    except OSError as exc:
        raise TraceError(f"{path}: cannot read trace: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    requests: list[np.ndarray] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise TraceError(f"{path}:{lineno}: JSON nested too deeply") from None
        except ValueError as exc:  # an integer of more digits than int() reads (4300)
            raise TraceError(f"{path}:{lineno}: {exc}") from None
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
    # The cache never holds more than the trace's distinct blocks, whatever its capacity; at least one
    # block for a trace whose requests are all empty.
    distinct = len(np.unique(np.concatenate(requests)))
    cached = distinct if capacity_blocks is None else min(capacity_blocks, distinct)
    pool_blocks = max(1, cached + longest)
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


def replay_tiered(
    requests: Sequence[np.ndarray],
    device_blocks: int,
    host_blocks: int = 0,
    disk_blocks: int = 0,
    *,
    policy: str = "lru",
    block_bytes: int = 4096,
    disk_dir: str | Path | None = None,
    direct_io: bool = True,
    trace_name: str = "trace",
) -> ReplayResult:
    """Replays ``requests`` through a :class:`~sagellm_kv_cache.tiers.TieredPrefixCache` moving real bytes.

    Each trace block is ``block_bytes`` of real pool memory (a multiple of 1024: one layer, one
    head, int8, 512 tokens, K and V), stamped with its digest when computed; every block served from
    a lower tier is checked against its stamp after promotion (``verified_blocks``), so a wrong
    byte would fail the replay. The disk tier lives in ``disk_dir`` (a fresh temporary directory
    when None, removed afterwards).
    """
    import shutil
    import tempfile

    from sagellm_kv_cache.tiers import TIER_DEVICE, TIER_NAMES, TieredPrefixCache

    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1024 or block_bytes % 1024:
        raise ValueError(f"block_bytes must be a positive multiple of 1024, got {block_bytes!r}")
    if device_blocks <= 0:
        raise ValueError(f"device_blocks must be > 0, got {device_blocks}")
    longest = max(len(r) for r in requests)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=block_bytes // (2 * TRACE_BLOCK_TOKENS), dtype="int8",
                       block_size=TRACE_BLOCK_TOKENS)
    pool = PagedKVPool(spec, device_blocks + longest, zero_fill=False)
    tmp = None
    if disk_blocks and disk_dir is None:
        tmp = tempfile.mkdtemp(prefix="sagellm-kv-replay-")
        disk_dir = tmp
    try:
        tc = TieredPrefixCache(pool, device_blocks=device_blocks, host_blocks=host_blocks, disk_dir=disk_dir,
                               disk_blocks=disk_blocks, policy=policy, direct_io=direct_io)
        verified = 0
        stamp = np.zeros((longest, pool.block_nbytes), dtype=np.uint8)
        start = time.perf_counter()
        with tc:
            for ids in requests:
                if ids.size == 0:
                    continue
                digests = tc.hash_tokens(ids, block_size=1)
                m = tc.match(digests)
                lower = np.flatnonzero(m.tiers != TIER_DEVICE)
                if lower.size:
                    got = pool.gather(m.block_ids[lower]).reshape(lower.size, -1)[:, :32]
                    if not np.array_equal(got, digests[lower]):
                        raise RuntimeError("tiered replay: a promoted block does not hold its bytes")
                    verified += int(lower.size)
                if m.num_matched < len(digests):
                    fresh = tc.allocate(len(digests) - m.num_matched)
                    rows = stamp[: len(fresh)]
                    rows[:, :32] = digests[m.num_matched:]
                    pool.scatter(rows, fresh)  # "prefill": the block's bytes name it
                    parent = digests[m.num_matched - 1] if m.num_matched else None
                    tc.insert(digests[m.num_matched:], fresh, parent=parent)
                    pool.free(fresh)
                tc.release(digests[: m.num_matched])
            tc.flush()
            elapsed = time.perf_counter() - start
            st = tc.stats()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    hits = dict(st["hits"])
    return ReplayResult(
        trace=trace_name,
        capacity_blocks=device_blocks,
        policy=policy,
        requests=len(requests),
        blocks=int(st["queried_blocks"]),
        hits=int(st["hit_blocks"]),
        hit_ratio=float(st["hit_ratio"]),
        evictions=int(sum(st["dropped"].values())),
        requests_per_s=len(requests) / elapsed if elapsed > 0 else float("inf"),
        host_blocks=host_blocks,
        disk_blocks=disk_blocks,
        block_bytes=pool.block_nbytes,
        hits_by_tier=hits,
        hit_ratio_by_tier=dict(st["hit_ratio_by_tier"]),
        tokens_saved_by_tier={t: hits[t] * TRACE_BLOCK_TOKENS for t in TIER_NAMES},
        bytes_moved=dict(st["bytes_moved"]),
        copy_seconds=dict(st["copy_seconds"]),
        bandwidth_bytes_per_s=dict(st["bandwidth_bytes_per_s"]),
        disk_direct_io=st["disk_direct_io"],
        verified_blocks=verified,
    )
