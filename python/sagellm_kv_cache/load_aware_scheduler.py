"""Load-aware placement of requests on devices (the seed's ``LoadAwareScheduler``).

Given candidate devices and the KV tokens a request will need, pick the device to run it on from
the numbers a :class:`~sagellm_kv_cache.load_metrics.LoadMetricsCollector` holds. Devices are
considered in tiers: first those with room for the request and below the overload thresholds, then
those with room, then (a *fallback*, counted in the stats) every candidate; the strategy ranks the
devices of the first non-empty tier. A device whose KV capacity is unknown (0) counts as having room.

Selecting does not reserve anything: the engine reports the new usage to the collector.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from enum import StrEnum

from sagellm_protocol.kv import SchedulerRequest

from sagellm_kv_cache._numbers import iterable, positive_int
from sagellm_kv_cache.load_metrics import DeviceLoadMetrics, LoadMetricsCollector

logger = logging.getLogger(__name__)

__all__ = ["LoadAwareScheduler", "PlacementStrategy"]


class PlacementStrategy(StrEnum):
    """How to rank the devices that can take a request."""

    LOWEST_KV = "lowest_kv"
    """Lowest KV-cache utilization after placing the request; spreads memory pressure."""
    LEAST_REQUESTS = "least_requests"
    """Fewest running + queued requests; evens out queueing delay."""
    ROUND_ROBIN = "round_robin"
    """Rotate through the devices that can take the request; ignores load beyond fitting."""
    BALANCED = "balanced"
    """Weighted mix of KV utilization (0.5), relative request count (0.3) and memory utilization (0.2)."""
    SHORTEST_QUEUE = "shortest_queue"
    """The seed's name: fewest queued requests, then fewest running, then lowest KV utilization."""
    BEST_FIT = "best_fit"
    """The seed's name: the device whose resources suit the request best, scored as ``BALANCED``."""


def _device_list(name: str, devices: object) -> list[str]:
    # Any iterable of names, as in the original (a generator, dict.keys()); not a str or a mapping.
    unique: dict[str, None] = {}
    for index, device in enumerate(iterable(name, devices, "a list of device names", refuse=(Mapping,))):
        if not isinstance(device, str) or not device:
            raise TypeError(f"{name}[{index}] must be a non-empty str, got {device!r}")
        unique.setdefault(device, None)
    if not unique:
        raise ValueError(f"No candidate devices provided ({name} must not be empty)")
    return list(unique)


class LoadAwareScheduler:
    """Chooses a device per request; thread-safe."""

    def __init__(
        self,
        collector: LoadMetricsCollector,
        strategy: PlacementStrategy = PlacementStrategy.LOWEST_KV,
        enable_load_awareness: bool = True,
        *,
        kv_threshold: float = 0.9,
        memory_threshold: float = 0.9,
    ) -> None:
        if not isinstance(collector, LoadMetricsCollector):
            raise TypeError(f"collector must be a LoadMetricsCollector, got {type(collector).__name__}")
        try:
            self.strategy = PlacementStrategy(strategy)
        except ValueError:
            choices = ", ".join(s.value for s in PlacementStrategy)
            raise ValueError(f"unknown placement strategy {strategy!r}; choose one of {choices}") from None
        for name, threshold in (("kv_threshold", kv_threshold), ("memory_threshold", memory_threshold)):
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {threshold!r}")
        self.collector = collector
        self.kv_threshold = float(kv_threshold)
        self.memory_threshold = float(memory_threshold)
        self._enabled = bool(enable_load_awareness)
        self._lock = threading.Lock()
        self._round_robin = 0
        self._total = 0
        self._fallbacks = 0
        self._device_counts: dict[str, int] = {}

    @property
    def enable_load_awareness(self) -> bool:
        """The constructor's flag (the seed's attribute); :meth:`is_enabled` reads the same."""
        return self._enabled

    def is_enabled(self) -> bool:
        """Whether placement reads load; when not, the first candidate is always chosen."""
        return self._enabled

    def select_device(
        self,
        candidate_devices: list[str],
        kv_tokens_required: int = 0,
        request_id: str | None = None,
    ) -> str:
        """The device to place a request needing ``kv_tokens_required`` KV tokens on.

        ``ValueError`` for no candidates or a negative requirement, ``TypeError`` for malformed
        candidates. As in the seed, candidates the collector does not know are skipped (logged) and
        ``RuntimeError`` says so when none is left. Without load awareness the first candidate is
        chosen and not counted. ``request_id`` is only used in messages.
        """
        candidates = _device_list("candidate_devices", candidate_devices)
        kv_tokens_required = positive_int("kv_tokens_required", kv_tokens_required, allow_zero=True)

        if not self._enabled:
            return candidates[0]

        snapshot = self.collector.get_all_metrics()
        unknown = [device for device in candidates if device not in snapshot]
        suffix = f" (request {request_id})" if request_id else ""
        if unknown:
            logger.warning("Device(s) %s not registered in collector%s; skipping", ", ".join(unknown), suffix)
        metrics = [snapshot[device] for device in candidates if device in snapshot]
        if not metrics:
            raise RuntimeError(f"No suitable device found among {candidates}{suffix}: none is registered with the "
                               "collector")

        fits = [m for m in metrics if m.kv_tokens_capacity == 0 or m.available_kv_tokens() >= kv_tokens_required]
        healthy = [m for m in fits if not m.is_overloaded(self.kv_threshold, self.memory_threshold)]
        tier = healthy or fits or metrics
        with self._lock:
            choice = self._rank(tier, kv_tokens_required)
            return self._record(choice, fallback=not fits)

    def select_device_for_request(
        self,
        request: SchedulerRequest,
        candidate_devices: list[str] | None = None,
    ) -> str:
        """Places a scheduler request: needs ``kv_tokens_required`` tokens, or prompt + max new tokens
        when that is 0. The request's ``device_affinity`` wins when it is a candidate with room.
        Without candidates, every registered device is one."""
        if not isinstance(request, SchedulerRequest):
            raise TypeError(f"request must be a SchedulerRequest, got {type(request).__name__}")
        if candidate_devices is None:
            candidates = self.collector.list_devices()
            if not candidates:
                raise ValueError(f"no candidate devices for request {request.request_id} (none registered)")
        else:  # checked before the affinity test: `in` on a str matches substrings
            candidates = _device_list("candidate_devices", candidate_devices)
        needed = request.kv_tokens_required or request.prompt_len + request.max_new_tokens
        affinity = request.device_affinity
        if affinity and affinity in candidates and self._has_room(affinity, needed):
            if not self._enabled:
                return affinity
            with self._lock:
                return self._record(affinity, fallback=False)
        return self.select_device(list(candidates), needed, request.request_id)

    def get_placement_stats(self) -> dict[str, int | dict[str, int]]:
        """Placements so far (the seed's ``total_placements`` and ``per_device``) and how many were
        fallbacks (no candidate had room)."""
        with self._lock:
            return {
                "total_placements": self._total,
                "per_device": dict(self._device_counts),
                "fallback_placements": self._fallbacks,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._total = 0
            self._fallbacks = 0
            self._device_counts.clear()
            self._round_robin = 0

    # --- internals ---------------------------------------------------------------------------

    def _has_room(self, device: str, needed: int) -> bool:
        if not self._enabled:
            return True
        try:
            metrics = self.collector.get_metrics(device)
        except KeyError:
            return False
        return metrics.kv_tokens_capacity == 0 or metrics.available_kv_tokens() >= needed

    def _rank(self, tier: list[DeviceLoadMetrics], needed: int) -> str:
        def kv_after(m: DeviceLoadMetrics) -> float:
            return (m.kv_tokens_used + needed) / m.kv_tokens_capacity if m.kv_tokens_capacity else 0.0

        if self.strategy == PlacementStrategy.ROUND_ROBIN:
            choice = tier[self._round_robin % len(tier)].device
            self._round_robin += 1
            return choice
        order = range(len(tier))
        if self.strategy == PlacementStrategy.LOWEST_KV:
            best = min(order, key=lambda i: (kv_after(tier[i]), tier[i].total_requests(), i))
        elif self.strategy == PlacementStrategy.LEAST_REQUESTS:
            best = min(order, key=lambda i: (tier[i].total_requests(), kv_after(tier[i]), i))
        elif self.strategy == PlacementStrategy.SHORTEST_QUEUE:
            best = min(order, key=lambda i: (tier[i].queue_length, tier[i].active_requests, kv_after(tier[i]), i))
        else:  # BALANCED, BEST_FIT
            busiest = max(m.total_requests() for m in tier) or 1
            best = min(
                order,
                key=lambda i: (
                    0.5 * kv_after(tier[i])
                    + 0.3 * tier[i].total_requests() / busiest
                    + 0.2 * tier[i].memory_utilization(),
                    i,
                ),
            )
        return tier[best].device

    def _record(self, device: str, *, fallback: bool) -> str:
        self._total += 1
        self._fallbacks += fallback
        self._device_counts[device] = self._device_counts.get(device, 0) + 1
        return device

    def __repr__(self) -> str:
        return f"LoadAwareScheduler(strategy={self.strategy.value}, enabled={self._enabled}, placements={self._total})"
