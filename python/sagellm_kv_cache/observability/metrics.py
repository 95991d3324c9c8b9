"""Per-request counters, gauges and event timestamps (the seed's ``MetricsCollector``).

One collector follows one request through one engine (the ids tie its numbers to traces); hooks
update it from pool, cache and transfer code that may run on several threads, hence the lock.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from sagellm_kv_cache._numbers import finite_number

__all__ = ["KV_METRIC_NAMES", "MetricsCollector"]

#: Gauges and counters that ``to_dict`` also reports under ``kv_metrics`` (the seed's selection).
KV_METRIC_NAMES = frozenset(
    {"hit_rate", "prefix_hit_rate", "hit_len", "reuse_bytes", "transfer_latency", "evict_count", "hit_count",
     "miss_count"}
)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{kind} name must not be empty")
    return name


def _timestamp_key(event: str) -> str:
    """The event's key in ``to_dict()["timestamps"]`` (the seed's ``<event>_at``; one already ending
    in ``_at`` keeps its name)."""
    return event if event.endswith("_at") else f"{event}_at"


class MetricsCollector:
    """Thread-safe counters (ints, only grow), gauges (floats) and named timestamps."""

    def __init__(self, trace_id: str, request_id: str, engine_id: str) -> None:
        self.trace_id = trace_id
        self.request_id = request_id
        self.engine_id = engine_id
        self._lock = threading.Lock()
        self._timestamps: dict[str, float] = {}
        self._counters: dict[str, int] = {}
        self._gauges: dict[str, float] = {}

    def mark(self, event: str) -> None:
        """Records the wall-clock time (``time.time()``) of ``event``; a later mark overwrites it.

        ``to_dict`` reports both ``x`` and ``x_at`` as ``x_at``, so marking one of them while the
        other is marked is a ``ValueError`` naming both (nothing recorded) rather than one time lost."""
        _check_name("event", event)
        twin = event[:-3] if event.endswith("_at") else f"{event}_at"
        now = time.time()
        with self._lock:
            if twin in self._timestamps:
                raise ValueError(f"event {event!r} would be reported as {_timestamp_key(event)!r}, "
                                 f"as the event {twin!r} already marked is")
            self._timestamps[event] = now

    def inc(self, counter: str, value: int = 1) -> None:
        """Adds ``value`` (an int >= 0: counters never go down) to ``counter``."""
        _check_name("counter", counter)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"counter increment must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"counter {counter!r} cannot decrease (increment {value})")
        with self._lock:
            self._counters[counter] = self._counters.get(counter, 0) + value

    def set_gauge(self, gauge: str, value: float) -> None:
        """Sets ``gauge`` to a finite number (``TypeError`` for a non-number, ``ValueError`` for NaN, an
        infinity or an int past the float range)."""
        _check_name("gauge", gauge)
        number = finite_number(f"gauge {gauge!r}", value)
        with self._lock:
            self._gauges[gauge] = number

    def _set_ratio(self, gauge: str, part: str, other: str) -> None:
        """Sets ``gauge`` to ``part / (part + other)`` of two counters (unset while both are 0), read and
        written in one lock hold: computed outside it, a thread could set a ratio older than the one
        another thread has just set, and leave it last."""
        with self._lock:
            a, b = self._counters.get(part, 0), self._counters.get(other, 0)
            if a + b > 0:
                self._gauges[gauge] = a / (a + b)

    def get_counter(self, counter: str) -> int:
        """The counter's value; 0 for a counter never incremented."""
        with self._lock:
            return self._counters.get(counter, 0)

    def get_gauge(self, gauge: str) -> float:
        """The gauge's value; 0.0 for a gauge never set."""
        with self._lock:
            return self._gauges.get(gauge, 0.0)

    def get_timestamp(self, event: str) -> float | None:
        """When ``event`` was last marked, or None."""
        with self._lock:
            return self._timestamps.get(event)

    @property
    def marks(self) -> dict[str, float]:
        """Event -> wall-clock time of its last ``mark`` (a copy)."""
        with self._lock:
            return dict(self._timestamps)

    @property
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    @property
    def gauges(self) -> dict[str, float]:
        with self._lock:
            return dict(self._gauges)

    def to_dict(self) -> dict[str, Any]:
        """A consistent snapshot (copies, taken under the lock), in the seed's shape.

        ``timestamps`` names each event ``<event>_at``; ``kv_metrics`` picks the seed's KV metrics
        (hit rate and length, reused bytes, transfer latency, eviction/hit/miss counts) out of the
        gauges and counters.
        """
        with self._lock:
            kv = {k: v for k, v in self._gauges.items() if k in KV_METRIC_NAMES}
            kv.update({k: v for k, v in self._counters.items() if k in KV_METRIC_NAMES})
            return {
                "trace_id": self.trace_id,
                "request_id": self.request_id,
                "engine_id": self.engine_id,
                "timestamps": {_timestamp_key(e): t for e, t in self._timestamps.items()},
                "kv_metrics": kv,
                "counters": dict(self._counters),
                "gauges": dict(self._gauges),
            }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def reset(self) -> None:
        """Forgets every counter, gauge and timestamp; the ids stay."""
        with self._lock:
            self._timestamps.clear()
            self._counters.clear()
            self._gauges.clear()

    def __repr__(self) -> str:
        with self._lock:
            sizes = len(self._timestamps), len(self._counters), len(self._gauges)
        return (
            f"MetricsCollector(trace_id={self.trace_id!r}, request_id={self.request_id!r}, "
            f"engine_id={self.engine_id!r}, marks={sizes[0]}, counters={sizes[1]}, gauges={sizes[2]})"
        )
