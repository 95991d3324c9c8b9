"""Block access recording for cache-behaviour analysis (the seed's ``AccessStatsCollector``).

Records, per block id, when it was accessed and whether the access hit the cache, and derives the
numbers an operator tunes capacity and eviction with: hit rate, the hottest blocks, and the
distribution of re-access intervals (short intervals mean LRU keeps the block; long ones mean a
cache must be large to benefit). Times are seconds since the collector started (or was reset),
measured with a monotonic clock so they never go backwards.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AccessStatsCollector"]


class _BlockRecord:
    __slots__ = ("order", "times")

    def __init__(self, order: int) -> None:
        self.order = order  # first-seen rank, a stable tie-break for equal counts
        self.times: list[float] = []


def _intervals(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


class AccessStatsCollector:
    """Thread-safe recorder of block accesses; see the module docstring for what it derives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._blocks: dict[str, _BlockRecord] = {}
        self._hits = 0
        self._misses = 0
        self._last_time = 0.0

    def record_access(self, block_id: str, is_hit: bool = True) -> None:
        """Records one access to ``block_id`` now; a bad argument raises and records nothing."""
        if not isinstance(block_id, str):
            raise TypeError(f"block_id must be a str, got {type(block_id).__name__}")
        if not block_id:
            raise ValueError("block_id must not be empty")
        if not isinstance(is_hit, bool):
            raise TypeError(f"is_hit must be a bool, got {type(is_hit).__name__}")
        with self._lock:
            now = time.perf_counter() - self._start
            record = self._blocks.get(block_id)
            if record is None:
                record = self._blocks[block_id] = _BlockRecord(len(self._blocks))
            record.times.append(now)
            self._last_time = now
            if is_hit:
                self._hits += 1
            else:
                self._misses += 1

    def get_access_intervals(self, block_id: str) -> list[float]:
        """Seconds between consecutive accesses of ``block_id`` ([] when accessed at most once)."""
        with self._lock:
            record = self._blocks.get(block_id)
            return [] if record is None else _intervals(record.times)

    def get_all_intervals(self) -> list[float]:
        """Every block's intervals, blocks in the order they were first seen."""
        with self._lock:
            return [gap for record in self._blocks.values() for gap in _intervals(record.times)]

    def get_hit_rate(self) -> float:
        """Hits / accesses; 0.0 before any access."""
        with self._lock:
            total = self._hits + self._misses
            return self._hits / total if total else 0.0

    def get_top_blocks(self, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` most accessed blocks as ``(block_id, count)``, hottest first (first seen wins ties)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        with self._lock:
            return self._top_locked(n)

    def _top_locked(self, n: int) -> list[tuple[str, int]]:
        ranked = sorted(self._blocks.items(), key=lambda item: (-len(item[1].times), item[1].order))
        return [(block_id, len(record.times)) for block_id, record in ranked[:n]]

    def get_stats_summary(self) -> dict[str, Any]:
        """Aggregate numbers (the seed's keys); ``duration_seconds`` runs from start to the last access."""
        with self._lock:
            return self._summary_locked()

    def _summary_locked(self) -> dict[str, Any]:
        total = self._hits + self._misses
        gaps = [gap for record in self._blocks.values() for gap in _intervals(record.times)]
        return {
            "total_accesses": total,
            "unique_blocks": len(self._blocks),
            "hit_rate": self._hits / total if total else 0.0,
            "cache_hits": self._hits,
            "cache_misses": self._misses,
            "average_access_interval": sum(gaps) / len(gaps) if gaps else 0.0,
            "duration_seconds": self._last_time if total else 0.0,
            "top_10_blocks": [
                {"block_id": block_id, "access_count": count} for block_id, count in self._top_locked(10)
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        """The export document: the summary plus all intervals and per-block details."""
        with self._lock:
            data = self._summary_locked()
            data["access_intervals"] = [gap for record in self._blocks.values() for gap in _intervals(record.times)]
            data["block_details"] = {
                block_id: {
                    "access_count": len(record.times),
                    "first_access": record.times[0],
                    "last_access": record.times[-1],
                    "intervals": _intervals(record.times),
                }
                for block_id, record in self._blocks.items()
            }
            return data

    def export_stats(self, output_path: str | Path) -> None:
        """Writes :meth:`to_dict` as JSON; the file is replaced atomically, never left half-written."""
        path = Path(output_path)
        data = self.to_dict()
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2)
            os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only; a stats file is meant to be shared
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def reset(self) -> None:
        """Forgets every access and restarts the clock."""
        with self._lock:
            self._start = time.perf_counter()
            self._blocks.clear()
            self._hits = 0
            self._misses = 0
            self._last_time = 0.0

    def __len__(self) -> int:
        """Number of distinct blocks seen."""
        with self._lock:
            return len(self._blocks)
