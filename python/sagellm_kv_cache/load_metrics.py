"""Per-device load numbers that placement decisions read (the seed's ``DeviceLoadMetrics``).

Engines report KV usage, request counts, memory and queueing delay per device; the
:class:`~sagellm_kv_cache.load_aware_scheduler.LoadAwareScheduler` reads them to place new requests.
Every update validates all its arguments before assigning any, so a bad report changes nothing.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sagellm_kv_cache._numbers import finite_number, plain, positive_int

__all__ = ["DeviceLoadMetrics", "LoadMetricsCollector"]


def _count(name: str, value: object) -> int:
    # numpy numbers count (the original took them: engines report usage read from numpy arrays).
    return positive_int(name, value, allow_zero=True)


def _amount(name: str, value: object) -> float:
    return finite_number(name, plain(value), minimum=0)


class DeviceLoadMetrics(BaseModel):
    """Load of one device. A capacity of 0 means "unknown": its utilization then reads 0."""

    # inf refused as the update methods refuse it: used inf / capacity inf made utilization NaN,
    # and a NaN utilization never reaches a threshold (an infinitely full device read as healthy).
    model_config = ConfigDict(validate_assignment=True, allow_inf_nan=False)

    device: str
    active_requests: int = Field(default=0, ge=0)
    queue_length: int = Field(default=0, ge=0)
    kv_tokens_used: int = Field(default=0, ge=0)
    kv_tokens_capacity: int = Field(default=0, ge=0)
    memory_used_mb: float = Field(default=0.0, ge=0)
    memory_capacity_mb: float = Field(default=0.0, ge=0)
    avg_wait_time_ms: float = Field(default=0.0, ge=0)
    max_wait_time_ms: float = Field(default=0.0, ge=0)
    updated_at: float = Field(default=0.0, ge=0)

    @classmethod
    def create(cls, device: str, kv_tokens_capacity: int = 0, memory_capacity_mb: float = 0.0) -> DeviceLoadMetrics:
        """An idle device with the given capacities, stamped now."""
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty str, got {device!r}")
        return cls(
            device=device,
            kv_tokens_capacity=_count("kv_tokens_capacity", kv_tokens_capacity),
            memory_capacity_mb=_amount("memory_capacity_mb", memory_capacity_mb),
            updated_at=time.time(),
        )

    def update_kv_usage(self, kv_tokens_used: int) -> None:
        self.kv_tokens_used = _count("kv_tokens_used", kv_tokens_used)
        self.updated_at = time.time()

    def update_request_count(self, active: int, queued: int) -> None:
        active, queued = _count("active", active), _count("queued", queued)
        self.active_requests = active
        self.queue_length = queued
        self.updated_at = time.time()

    def update_memory_usage(self, memory_used_mb: float) -> None:
        self.memory_used_mb = _amount("memory_used_mb", memory_used_mb)
        self.updated_at = time.time()

    def update_wait_time(self, avg_ms: float, max_ms: float) -> None:
        avg, peak = _amount("avg_ms", avg_ms), _amount("max_ms", max_ms)
        if avg > peak:
            raise ValueError(f"avg_ms ({avg}) cannot exceed max_ms ({peak})")
        self.avg_wait_time_ms = avg
        self.max_wait_time_ms = peak
        self.updated_at = time.time()

    def kv_utilization(self) -> float:
        """Used / capacity KV tokens (may exceed 1.0 when a device is over-committed)."""
        return self.kv_tokens_used / self.kv_tokens_capacity if self.kv_tokens_capacity else 0.0

    def memory_utilization(self) -> float:
        return self.memory_used_mb / self.memory_capacity_mb if self.memory_capacity_mb else 0.0

    def total_requests(self) -> int:
        """Running plus queued requests."""
        return self.active_requests + self.queue_length

    def is_overloaded(self, kv_threshold: float = 0.9, memory_threshold: float = 0.9) -> bool:
        """True when KV or memory utilization has reached its threshold."""
        return self.kv_utilization() >= kv_threshold or self.memory_utilization() >= memory_threshold

    def available_kv_tokens(self) -> int:
        return max(0, self.kv_tokens_capacity - self.kv_tokens_used)

    def __repr__(self) -> str:
        return (f"DeviceLoadMetrics(device={self.device}, active={self.active_requests}, "
                f"queued={self.queue_length}, kv_util={self.kv_utilization():.2f})")

    def to_dict(self) -> dict[str, Any]:
        """The fields plus the derived numbers, for logs and stats endpoints."""
        data = self.model_dump()
        data["kv_utilization"] = self.kv_utilization()
        data["memory_utilization"] = self.memory_utilization()
        data["total_requests"] = self.total_requests()
        data["available_kv_tokens"] = self.available_kv_tokens()
        return data


class LoadMetricsCollector:
    """Thread-safe registry of :class:`DeviceLoadMetrics`, one per device.

    Readers get copies, so a placement decision works on a consistent snapshot while engines keep
    reporting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceLoadMetrics] = {}

    def register_device(self, device: str, kv_tokens_capacity: int = 0, memory_capacity_mb: float = 0.0) -> None:
        """Adds a device; registering a known device again updates its capacities and keeps its usage."""
        fresh = DeviceLoadMetrics.create(device, kv_tokens_capacity, memory_capacity_mb)
        with self._lock:
            current = self._devices.get(device)
            if current is None:
                self._devices[device] = fresh
            else:
                current.kv_tokens_capacity = fresh.kv_tokens_capacity
                current.memory_capacity_mb = fresh.memory_capacity_mb
                current.updated_at = fresh.updated_at

    def unregister_device(self, device: str) -> None:
        """Forgets ``device``; an unknown device is ignored, as in the seed."""
        with self._lock:
            self._devices.pop(device, None)

    def get_metrics(self, device: str) -> DeviceLoadMetrics:
        """A copy of the device's metrics; ``KeyError`` naming the device when it is unknown."""
        with self._lock:
            return self._lookup(device).model_copy()

    def update_kv_usage(self, device: str, kv_tokens_used: int) -> None:
        with self._lock:
            self._lookup(device).update_kv_usage(kv_tokens_used)

    def update_request_count(self, device: str, active: int, queued: int) -> None:
        with self._lock:
            self._lookup(device).update_request_count(active, queued)

    def update_memory_usage(self, device: str, memory_used_mb: float) -> None:
        with self._lock:
            self._lookup(device).update_memory_usage(memory_used_mb)

    def update_wait_time(self, device: str, avg_ms: float, max_ms: float) -> None:
        with self._lock:
            self._lookup(device).update_wait_time(avg_ms, max_ms)

    def list_devices(self) -> list[str]:
        """Registered devices in registration order."""
        with self._lock:
            return list(self._devices)

    def get_all_metrics(self) -> dict[str, DeviceLoadMetrics]:
        with self._lock:
            return {device: metrics.model_copy() for device, metrics in self._devices.items()}

    def reset(self) -> None:
        """Zeroes every device's usage; devices and their capacities stay registered."""
        with self._lock:
            for device, metrics in self._devices.items():
                self._devices[device] = DeviceLoadMetrics.create(
                    device, metrics.kv_tokens_capacity, metrics.memory_capacity_mb
                )

    def _lookup(self, device: str) -> DeviceLoadMetrics:
        metrics = self._devices.get(device)
        if metrics is None:
            known = ", ".join(self._devices) or "none"
            raise KeyError(f"Device {device} not registered (registered: {known})")
        return metrics

    def __contains__(self, device: object) -> bool:
        with self._lock:
            return device in self._devices

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    def __bool__(self) -> bool:
        return True  # a collector with no devices yet is still a collector (``if collector:``), as in the seed

    def __repr__(self) -> str:
        return f"LoadMetricsCollector(devices={len(self)})"
