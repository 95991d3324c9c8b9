"""Block access recording for cache-behaviour analysis (the seed's ``AccessStatsCollector``).

Records, per block id, when it was accessed and whether the access hit the cache, and derives the
numbers an operator tunes capacity and eviction with: hit rate, the hottest blocks, and the
distribution of re-access intervals (short intervals mean LRU keeps the block; long ones mean a
cache must be large to benefit). Times are seconds since the collector started (or was reset),
measured with a monotonic clock so they never go backwards.

Since the seed's 0.5.4 line it also records block lifetimes (``record_alloc`` / ``record_free``)
and derives sliding-window counts (``TIME_WINDOWS``), cold blocks, an access-frequency histogram
and a time x block heatmap. The seed's public attributes (``total_accesses``, ``access_times``,
...) are read-only views here; absolute times are wall-clock seconds (``start_time`` plus the
monotonic offset).

The history is bounded, so a collector attached to a long-running server's prefix cache stays
the same size however many requests it sees (each bound is a keyword argument; ``None`` lifts it,
for an offline analysis of a finite trace):

* ``max_blocks`` (default ``DEFAULT_MAX_BLOCKS``): distinct blocks tracked; beyond it the least
  recently accessed block is forgotten (its per-block numbers leave every view; the totals,
  ``total_accesses``, ``cache_hits``, ``cache_misses`` and the hit rate, stay exact). Open
  lifetimes (an alloc without a free yet) are bounded the same way, the oldest dropped first.
* ``max_times_per_block`` (default ``DEFAULT_MAX_TIMES_PER_BLOCK``): access times kept per block,
  the most recent ones. A block's access count and first access stay exact; its intervals, window
  counts and heatmap row come from the kept times.
* ``max_lifetimes`` (default ``DEFAULT_MAX_LIFETIMES``): finished lifetimes kept, the most recent.

At the defaults the history holds at most about 35 MB of timestamps (8 bytes each).

Derived views are bounded too: :meth:`AccessStatsCollector.get_heatmap_data` takes at most
``MAX_TIME_SLOTS`` slots (its size is blocks x slots: 128 MiB of counts at the default ``max_blocks``)
and :meth:`AccessStatsCollector.get_frequency_histogram` at most ``MAX_HISTOGRAM_BINS`` bins; more is a
``ValueError`` naming the value.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import stat
import tempfile
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sagellm_kv_cache._numbers import shown

__all__ = [
    "DEFAULT_MAX_BLOCKS",
    "DEFAULT_MAX_LIFETIMES",
    "DEFAULT_MAX_TIMES_PER_BLOCK",
    "MAX_HISTOGRAM_BINS",
    "MAX_TIME_SLOTS",
    "TIME_WINDOWS",
    "AccessStatsCollector",
]

#: Default bounds of a collector's history (see the module docstring).
DEFAULT_MAX_BLOCKS = 16_384
DEFAULT_MAX_TIMES_PER_BLOCK = 256
DEFAULT_MAX_LIFETIMES = 65_536

#: Most time slots of a heatmap (a row of this many counts per block) and bins of a histogram.
MAX_TIME_SLOTS = 1024
MAX_HISTOGRAM_BINS = 10_000

#: The sliding windows of :meth:`AccessStatsCollector.get_all_window_stats`, name -> seconds.
TIME_WINDOWS: dict[str, float] = {"1min": 60.0, "5min": 300.0, "1h": 3600.0}


def _check_block_id(block_id: Any) -> None:
    if not isinstance(block_id, str):
        raise TypeError(f"block_id must be a str, got {type(block_id).__name__}")
    if not block_id:
        raise ValueError("block_id must not be empty")


class _BlockRecord:
    __slots__ = ("count", "first", "order", "times")

    def __init__(self, order: int, now: float) -> None:
        self.order = order  # first-seen rank, a stable tie-break for equal counts
        self.count = 0  # accesses since the block was first seen (exact, unlike len(times))
        self.first = now
        self.times: array[float] = array("d")  # the most recent access times, oldest first


def _intervals(times: Sequence[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def _histogram(values: list[float], bins: int) -> list[dict[str, Any]]:
    """Equal-width bins from min to max (width 1 when all values are equal); the last bin is closed."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = (high - low) / bins if high > low else 1.0
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return [{"range_low": low + i * width, "range_high": low + (i + 1) * width, "count": counts[i]}
            for i in range(bins)]


def _check_count(name: str, value: Any, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {shown(value)}")
    return value


def _check_bound(name: str, value: Any) -> int | None:
    return None if value is None else _check_count(name, value)


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {shown(value)}")
    try:
        return float(value)
    except OverflowError:  # an int past the float range (infinity itself is a float, and allowed)
        raise ValueError(f"{name} must be a number of seconds a float can hold, got {shown(value)}") from None


class AccessStatsCollector:
    """Thread-safe recorder of block accesses; see the module docstring for what it derives."""

    def __init__(
        self,
        *,
        max_blocks: int | None = DEFAULT_MAX_BLOCKS,
        max_times_per_block: int | None = DEFAULT_MAX_TIMES_PER_BLOCK,
        max_lifetimes: int | None = DEFAULT_MAX_LIFETIMES,
    ) -> None:
        self.max_blocks = _check_bound("max_blocks", max_blocks)
        self.max_times_per_block = _check_bound("max_times_per_block", max_times_per_block)
        self.max_lifetimes = _check_bound("max_lifetimes", max_lifetimes)
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._start_wall = time.time()
        # Least recently accessed first, so the block to forget at the bound is the first one.
        self._blocks: OrderedDict[str, _BlockRecord] = OrderedDict()
        self._seen = itertools.count()
        self._hits = 0
        self._misses = 0
        self._last_time = 0.0
        self._alloc_at: dict[str, float] = {}  # block -> start of its current lifetime, oldest first
        # seconds from alloc to free, one per finished lifetime, the most recent kept
        self._lifetimes: deque[float] = deque(maxlen=self.max_lifetimes)

    # --- the seed's public attributes (read-only snapshots) ---------------------------------

    @property
    def start_time(self) -> float:
        """Wall-clock time (``time.time()``) when the collector started or was last reset."""
        return self._start_wall

    @property
    def total_accesses(self) -> int:
        with self._lock:
            return self._hits + self._misses

    @property
    def cache_hits(self) -> int:
        return self._hits

    @property
    def cache_misses(self) -> int:
        return self._misses

    @property
    def access_count(self) -> dict[str, int]:
        """Block id -> number of accesses (a copy)."""
        with self._lock:
            return {block_id: record.count for block_id, record in self._blocks.items()}

    @property
    def access_times(self) -> dict[str, list[float]]:
        """Block id -> wall-clock times of its (kept) accesses, oldest first (a copy)."""
        with self._lock:
            base = self._start_wall
            return {block_id: [base + t for t in record.times] for block_id, record in self._blocks.items()}

    def _now(self) -> float:
        return time.perf_counter() - self._start

    # --- recording --------------------------------------------------------------------------

    def record_access(self, block_id: str, is_hit: bool = True) -> None:
        """Records one access to ``block_id`` now; a bad argument raises and records nothing."""
        _check_block_id(block_id)
        if not isinstance(is_hit, bool):
            raise TypeError(f"is_hit must be a bool, got {type(is_hit).__name__}")
        with self._lock:
            now = self._now()
            record = self._blocks.get(block_id)
            if record is None:
                record = self._blocks[block_id] = _BlockRecord(next(self._seen), now)
                if self.max_blocks is not None and len(self._blocks) > self.max_blocks:
                    self._blocks.popitem(last=False)  # the least recently accessed block
            else:
                self._blocks.move_to_end(block_id)
            record.count += 1
            times = record.times
            if self.max_times_per_block is not None and len(times) >= self.max_times_per_block:
                del times[0]  # a memmove of at most max_times_per_block doubles
            times.append(now)
            self._last_time = now
            if is_hit:
                self._hits += 1
            else:
                self._misses += 1

    def record_alloc(self, block_id: str) -> None:
        """Starts a lifetime of ``block_id`` now (a second alloc restarts it)."""
        _check_block_id(block_id)
        with self._lock:
            self._alloc_at.pop(block_id, None)  # a restarted lifetime becomes the newest
            self._alloc_at[block_id] = self._now()
            if self.max_blocks is not None and len(self._alloc_at) > self.max_blocks:
                del self._alloc_at[next(iter(self._alloc_at))]  # the oldest open lifetime

    def record_free(self, block_id: str) -> None:
        """Ends the lifetime of ``block_id`` now; a free without an alloc is ignored."""
        _check_block_id(block_id)
        with self._lock:
            started = self._alloc_at.pop(block_id, None)
            if started is not None:
                self._lifetimes.append(self._now() - started)

    # --- derived numbers --------------------------------------------------------------------

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
        ranked = sorted(self._blocks.items(), key=lambda item: (-item[1].count, item[1].order))
        return [(block_id, record.count) for block_id, record in ranked[:n]]

    def get_window_stats(self, window_s: float) -> dict[str, Any]:
        """Accesses in the last ``window_s`` seconds: total, distinct blocks, the 10 hottest."""
        window = _check_seconds("window_s", window_s)
        with self._lock:
            return self._window_locked(window_s, window)

    def _window_locked(self, label: float, window: float) -> dict[str, Any]:
        since = self._now() - window
        counts: list[tuple[int, int, str]] = []
        for block_id, record in self._blocks.items():
            n = len(record.times) - bisect.bisect_left(record.times, since)
            if n:
                counts.append((-n, record.order, block_id))
        counts.sort()
        return {
            "window_s": label,
            "total_accesses": -sum(c[0] for c in counts),
            "unique_blocks": len(counts),
            "top_blocks": [{"block_id": block_id, "access_count": -n} for n, _, block_id in counts[:10]],
        }

    def get_all_window_stats(self) -> dict[str, dict[str, Any]]:
        """:meth:`get_window_stats` for each of ``TIME_WINDOWS``."""
        with self._lock:
            return {name: self._window_locked(seconds, seconds) for name, seconds in TIME_WINDOWS.items()}

    def get_cold_blocks(self, idle_threshold_s: float = 60.0) -> list[tuple[str, float]]:
        """Blocks idle for more than ``idle_threshold_s`` seconds as ``(block_id, idle_s)``, idlest first."""
        threshold = _check_seconds("idle_threshold_s", idle_threshold_s)
        with self._lock:
            return self._cold_locked(threshold)

    def _cold_locked(self, threshold: float) -> list[tuple[str, float]]:
        now = self._now()
        idle = [(block_id, now - record.times[-1]) for block_id, record in self._blocks.items()]
        return sorted(((b, s) for b, s in idle if s > threshold), key=lambda item: -item[1])

    def get_frequency_histogram(self, bins: int = 10) -> list[dict[str, Any]]:
        """How many blocks were accessed how often: ``bins`` (at most ``MAX_HISTOGRAM_BINS``) equal ranges of
        per-block access counts."""
        n = _check_count("bins", bins, MAX_HISTOGRAM_BINS)
        with self._lock:
            return _histogram([float(r.count) for r in self._blocks.values()], n)

    def get_heatmap_data(self, time_slots: int = 20) -> dict[str, Any]:
        """Per block, accesses in each of ``time_slots`` (at most ``MAX_TIME_SLOTS``) equal slots from the first
        to the last access.

        ``time_bins`` are the slots' wall-clock start times; ``block_heatmap`` maps block id -> counts.
        """
        n = _check_count("time_slots", time_slots, MAX_TIME_SLOTS)
        with self._lock:
            return self._heatmap_locked(n)

    def _heatmap_locked(self, slots: int) -> dict[str, Any]:
        if not self._blocks:
            return {"time_bins": [], "block_heatmap": {}}
        first = min(r.times[0] for r in self._blocks.values())
        last = max(r.times[-1] for r in self._blocks.values())
        width = (last - first) / slots if last > first else 1.0
        heat: dict[str, list[int]] = {}
        for block_id, record in self._blocks.items():
            row = heat[block_id] = [0] * slots
            for t in record.times:
                row[min(int((t - first) / width), slots - 1)] += 1
        return {"time_bins": [self._start_wall + first + i * width for i in range(slots)], "block_heatmap": heat}

    def get_lifecycle_distribution(self) -> dict[str, Any]:
        """Alloc-to-free lifetimes (the last ``max_lifetimes``): count, min/max/mean seconds (None when none)
        and a 10-bin histogram."""
        with self._lock:
            return self._lifecycle_locked()

    def _lifecycle_locked(self) -> dict[str, Any]:
        spans = list(self._lifetimes)
        if not spans:
            return {"count": 0, "min_s": None, "max_s": None, "mean_s": None, "histogram": []}
        return {"count": len(spans), "min_s": min(spans), "max_s": max(spans), "mean_s": sum(spans) / len(spans),
                "histogram": _histogram(spans, 10)}

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
            "frequency_histogram": _histogram([float(r.count) for r in self._blocks.values()], 10),
            "lifecycle_distribution": self._lifecycle_locked(),
        }

    def to_dict(self) -> dict[str, Any]:
        """The export document: the summary plus all intervals and per-block details."""
        with self._lock:
            data = self._summary_locked()
            data["access_intervals"] = [gap for record in self._blocks.values() for gap in _intervals(record.times)]
            data["block_details"] = {
                block_id: {
                    "access_count": record.count,
                    "first_access": record.first,
                    "last_access": record.times[-1],
                    "intervals": _intervals(record.times),
                }
                for block_id, record in self._blocks.items()
            }
            data["window_stats"] = {name: self._window_locked(sec, sec) for name, sec in TIME_WINDOWS.items()}
            data["cold_blocks"] = [list(item) for item in self._cold_locked(60.0)]
            data["heatmap"] = self._heatmap_locked(20)
            return data

    def export_stats(self, output_path: str | Path) -> None:
        """Writes :meth:`to_dict` as JSON; the file is replaced atomically, never left half-written.

        A symbolic link stays: the file it points to is replaced. A FIFO or a device (``/dev/stdout``) is
        written into, as a shell redirection would, not replaced by a regular file.
        """
        path = Path(output_path)
        data = self.to_dict()
        try:
            mode: int | None = os.stat(path).st_mode  # through links
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            with open(path, "w", encoding="utf-8") as stream:
                json.dump(data, stream, indent=2)
            return
        if path.is_symlink():
            path = Path(os.path.realpath(path))
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
            self._start_wall = time.time()
            self._blocks.clear()
            self._hits = 0
            self._misses = 0
            self._last_time = 0.0
            self._alloc_at.clear()
            self._lifetimes.clear()

    def __len__(self) -> int:
        """Number of distinct blocks seen."""
        with self._lock:
            return len(self._blocks)
