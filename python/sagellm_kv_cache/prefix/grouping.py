"""Prefix grouping: hold requests for a short aggregation window so that requests with the same
prefix fingerprint are scheduled together (and hit the prefix cache together).

A :class:`PrefixGrouper` keeps one :class:`RequestGroup` per fingerprint. ``get_ready_groups``
releases a group once it has existed for ``aggregation_window_ms`` or once its oldest request has
queued for ``max_queue_delay_ms`` (a timeout). With ``auto_disable_on_timeout`` a timeout turns
grouping off for the rest of the run (``grouping_active`` in the stats): from then on each request
is released at once in a group of its own, so grouping never adds more than the configured delay.
``disable_grouping`` turns the grouper off explicitly; ``add_request`` is then refused.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sagellm_kv_cache.prefix.fingerprint import FingerprintComputer, FingerprintConfig, _token_bytes

__all__ = ["CIPrefixGrouper", "GroupingConfig", "PrefixGrouper", "Request", "RequestGroup"]


@dataclass
class GroupingConfig:
    enable_grouping: bool = True
    aggregation_window_ms: float = 10.0
    max_queue_delay_ms: float = 50.0
    auto_disable_on_timeout: bool = True
    fingerprint_config: FingerprintConfig = field(default_factory=FingerprintConfig)

    def __post_init__(self) -> None:
        for name in ("aggregation_window_ms", "max_queue_delay_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not isinstance(self.fingerprint_config, FingerprintConfig):
            raise TypeError(f"fingerprint_config must be a FingerprintConfig, got "
                            f"{type(self.fingerprint_config).__name__}")


@dataclass
class Request:
    request_id: str
    tokens: Sequence[int]
    fingerprint: bytes | None = None
    enqueue_time: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestGroup:
    fingerprint: bytes
    requests: list[Request] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    def add_request(self, request: Request) -> None:
        self.requests.append(request)

    def get_queue_delay(self, current_time: float | None = None) -> float:
        """Milliseconds the oldest request has waited (0.0 for an empty group)."""
        if not self.requests:
            return 0.0
        now = time.time() if current_time is None else current_time
        return (now - min(r.enqueue_time for r in self.requests)) * 1000.0

    def size(self) -> int:
        return len(self.requests)


class PrefixGrouper:
    """Groups requests by fingerprint (see the module docstring). Thread-safe."""

    def __init__(self, config: GroupingConfig | None = None) -> None:
        self.config = GroupingConfig() if config is None else config
        if not isinstance(self.config, GroupingConfig):
            raise TypeError(f"config must be a GroupingConfig or None, got {type(config).__name__}")
        self._fingerprints = FingerprintComputer(self.config.fingerprint_config)
        self._lock = threading.Lock()
        self._groups: dict[bytes, RequestGroup] = {}
        self._passthrough: list[RequestGroup] = []  # released at once while grouping is inactive
        self._enabled = bool(self.config.enable_grouping)
        self._active = True
        self._total_requests = 0
        self._total_groups = 0
        self._total_timeouts = 0
        self._released_groups = 0
        self._extra_delay_ms = 0.0

    def _fingerprint(self, request: Request) -> bytes:
        return self._fingerprints.compute(request.tokens)

    def add_request(self, request: Request) -> None:
        """Computes the request's fingerprint (stored on it) and files it under its group."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a Request, got {type(request).__name__}")
        fingerprint = self._fingerprint(request)
        with self._lock:
            if not self._enabled:
                raise ValueError("Grouping is disabled (call enable_grouping() first)")
            request.fingerprint = fingerprint
            self._total_requests += 1
            if not self._active:
                self._total_groups += 1
                self._passthrough.append(RequestGroup(fingerprint, [request]))
                return
            group = self._groups.get(fingerprint)
            if group is None:
                group = self._groups[fingerprint] = RequestGroup(fingerprint)
                self._total_groups += 1
            group.add_request(request)

    def get_ready_groups(self, current_time: float | None = None, force_all: bool = False) -> list[RequestGroup]:
        """Removes and returns the groups due now (all of them with ``force_all``), oldest first."""
        now = time.time() if current_time is None else current_time
        window_ms = float(self.config.aggregation_window_ms)
        with self._lock:
            ready = self._passthrough
            self._passthrough = []
            for fingerprint, group in list(self._groups.items()):
                age_ms = (now - group.created_at) * 1000.0
                timed_out = group.get_queue_delay(now) >= self.config.max_queue_delay_ms
                if not (force_all or age_ms >= window_ms or timed_out):
                    continue
                del self._groups[fingerprint]
                ready.append(group)
                self._released_groups += 1
                self._extra_delay_ms += min(max(age_ms, 0.0), window_ms)
                if timed_out and age_ms < window_ms:
                    self._total_timeouts += 1
                    if self.config.auto_disable_on_timeout:
                        self._active = False
            return sorted(ready, key=lambda g: g.created_at)

    def clear(self) -> None:
        """Drops every waiting request (the counters stay)."""
        with self._lock:
            self._groups.clear()
            self._passthrough.clear()

    def enable_grouping(self) -> None:
        with self._lock:
            self._enabled = True
            self._active = True

    def disable_grouping(self) -> None:
        with self._lock:
            self._enabled = False

    def is_enabled(self) -> bool:
        return self._enabled

    def get_stats(self) -> dict[str, Any]:
        with self._lock:
            total, groups = self._total_requests, self._total_groups
            return {
                "total_requests": total,
                "total_groups": groups,
                "active_groups": len(self._groups) + len(self._passthrough),
                "total_timeouts": self._total_timeouts,
                "grouping_active": self._enabled and self._active,
                "prefix_group_size": total / groups if groups else 0.0,
                "prefix_group_hit_rate": (total - groups) / total if total else 0.0,
                "extra_queue_delay_ms": self._extra_delay_ms / self._released_groups if self._released_groups else 0.0,
                "aggregation_window_ms": self.config.aggregation_window_ms,
                "max_queue_delay_ms": self.config.max_queue_delay_ms,
            }

    def __len__(self) -> int:
        """Groups waiting to be released."""
        with self._lock:
            return len(self._groups) + len(self._passthrough)

    def __repr__(self) -> str:
        stats = self.get_stats()
        return (f"PrefixGrouper(active={stats['grouping_active']}, groups={stats['active_groups']}, "
                f"requests={stats['total_requests']}, hit_rate={stats['prefix_group_hit_rate']:.2%})")


class CIPrefixGrouper(PrefixGrouper):
    """A cheap grouper for tests and CI: the fingerprint is an 8-byte hash of the first 5 tokens."""

    PREFIX_TOKENS = 5

    def _fingerprint(self, request: Request) -> bytes:
        head = list(request.tokens[: self.PREFIX_TOKENS])
        return hashlib.blake2b(_token_bytes(head), digest_size=8).digest()

    def add_request(self, request: Request) -> None:
        """Files ``request`` under the hash of its first few tokens."""
        super().add_request(request)
