"""Where each KV handle lives in a three-tier hierarchy, and the moves between tiers (the seed's
``KVOffloadManager``, 0.5.4.x).

Tiers: an accelerator (``"cuda:0"``, ``"npu:0"``), host memory (``"cpu"``) and NVMe (``"nvme"`` or
``"nvme:/path"``). The manager keeps, per registered handle, its current and original device and
when it was last active, decides which handles to move (least recently active first) and describes
each move as a :class:`~sagellm_protocol.heterogeneous_types.KVOffloadSpec`. The bytes are moved by
the caller's ``transfer_fn(spec) -> bool`` (accelerator <-> host) and ``nvme_transfer_fn`` (host
<-> NVMe); without one the move is bookkeeping only (dry run). A move whose function returns False
or raises leaves the handle where it was and counts as a failure.

Pressure-driven offload (``maybe_offload``, ``maybe_cascade_to_nvme``) estimates the utilisation
after each move from the handles registered on the source device (each holds its share of the
reported utilisation, by tokens) and stops once the estimate is at or below the threshold.
Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sagellm_protocol.heterogeneous_types import KVOffloadSpec, KVOffloadStats, KVOffloadTrigger, KVRestoreTrigger

from sagellm_kv_cache.errors import KVInvalidHandleError
from sagellm_kv_cache.models.kv_handle import KVHandle

__all__ = ["KVOffloadManager", "KVOffloadSpec", "KVOffloadStats", "KVOffloadTrigger", "KVRestoreTrigger"]

logger = logging.getLogger(__name__)

TransferFn = Callable[[KVOffloadSpec], bool]


def _is_nvme(device: str) -> bool:
    return device == "nvme" or device.startswith("nvme:")


def _is_cpu(device: str) -> bool:
    return device == "cpu" or device.startswith("cpu:")


@dataclass
class _Record:
    handle: KVHandle
    current_device: str
    original_device: str
    last_active: float = field(default_factory=time.monotonic)
    offload_count: int = 0
    restore_count: int = 0

    @property
    def offloaded(self) -> bool:
        return self.current_device != self.original_device and not _accelerator(self.current_device)


def _accelerator(device: str) -> bool:
    return not (_is_cpu(device) or _is_nvme(device))


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


class KVOffloadManager:
    """See the module docstring."""

    def __init__(
        self,
        offload_threshold: float = 0.85,
        idle_offload_secs: float | None = None,
        transfer_fn: TransferFn | None = None,
        max_offloaded_handles: int | None = None,
        nvme_offload_threshold: float = 0.9,
        nvme_transfer_fn: TransferFn | None = None,
    ) -> None:
        self.offload_threshold = _fraction("offload_threshold", offload_threshold)
        self.nvme_offload_threshold = _fraction("nvme_offload_threshold", nvme_offload_threshold)
        if idle_offload_secs is not None and (isinstance(idle_offload_secs, bool) or
                                              not isinstance(idle_offload_secs, int | float) or idle_offload_secs < 0):
            raise ValueError(f"idle_offload_secs must be None or >= 0, got {idle_offload_secs!r}")
        if max_offloaded_handles is not None and (isinstance(max_offloaded_handles, bool) or
                                                  not isinstance(max_offloaded_handles, int) or
                                                  max_offloaded_handles < 1):
            raise ValueError(f"max_offloaded_handles must be None or >= 1, got {max_offloaded_handles!r}")
        for name, fn in (("transfer_fn", transfer_fn), ("nvme_transfer_fn", nvme_transfer_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable(spec) -> bool")
        self.idle_offload_secs = idle_offload_secs
        self.max_offloaded_handles = max_offloaded_handles
        self._transfer_fn = transfer_fn
        self._nvme_transfer_fn = nvme_transfer_fn
        self._records: dict[str, _Record] = {}
        self._stats = KVOffloadStats()
        self._lock = threading.RLock()

    # --- registry ---------------------------------------------------------------------------

    def register(self, handle: KVHandle, *, device: str) -> None:
        """Starts tracking ``handle`` on ``device``; registering it again is ignored (logged)."""
        if not isinstance(handle, KVHandle):
            raise TypeError(f"handle must be a KVHandle, got {type(handle).__name__}")
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty string, got {device!r}")
        key = str(handle.handle_id)
        with self._lock:
            if key in self._records:
                logger.warning("handle %s already registered; skipping", key)
                return
            self._records[key] = _Record(handle, device, device)

    def unregister(self, handle_id: str) -> None:
        """Stops tracking a handle (after it was freed); unknown ids are ignored."""
        with self._lock:
            self._records.pop(str(handle_id), None)

    def _record(self, handle_id: str) -> _Record:
        record = self._records.get(str(handle_id))
        if record is None:
            raise KVInvalidHandleError(str(handle_id))
        return record

    def current_device(self, handle_id: str) -> str:
        with self._lock:
            return self._record(handle_id).current_device

    def is_offloaded(self, handle_id: str) -> bool:
        """True while the handle sits in host memory or on NVMe instead of its accelerator."""
        with self._lock:
            return self._record(handle_id).offloaded

    def is_on_nvme(self, handle_id: str) -> bool:
        with self._lock:
            return _is_nvme(self._record(handle_id).current_device)

    def offloaded_count(self) -> int:
        with self._lock:
            return sum(r.offloaded for r in self._records.values())

    def registered_count(self) -> int:
        with self._lock:
            return len(self._records)

    def touch(self, handle_id: str) -> None:
        """Marks the handle active now (call it on every decode step that uses it)."""
        with self._lock:
            self._record(handle_id).last_active = time.monotonic()

    def get_stats(self) -> KVOffloadStats:
        with self._lock:
            return replace(self._stats)

    def get_handle_info(self, handle_id: str) -> dict[str, Any]:
        with self._lock:
            r = self._record(handle_id)
            return {"handle_id": str(handle_id), "current_device": r.current_device,
                    "original_device": r.original_device, "offloaded": r.offloaded,
                    "offload_count": r.offload_count, "restore_count": r.restore_count,
                    "num_tokens": r.handle.num_tokens, "last_active": r.last_active}

    # --- single moves -----------------------------------------------------------------------

    def offload(self, handle_id: str, *, dst_device: str = "cpu",
                trigger: KVOffloadTrigger = KVOffloadTrigger.EXPLICIT, request_id: str = "") -> KVOffloadSpec:
        """Moves a handle from its accelerator to host memory (``transfer_fn``)."""
        with self._lock:
            r = self._record(handle_id)
            if r.current_device == dst_device:
                raise ValueError(f"handle {handle_id} is already on {dst_device}")
            if not _accelerator(r.current_device):
                raise ValueError(f"handle {handle_id} is not on an accelerator (current device: {r.current_device!r}); "
                                 "use offload_to_nvme to move host-resident KV further down")
            if self.max_offloaded_handles is not None and self.offloaded_count() >= self.max_offloaded_handles:
                raise RuntimeError(f"KVOffloadManager: max_offloaded_handles ({self.max_offloaded_handles}) reached; "
                                   "cannot offload more handles")
            spec = KVOffloadSpec(str(handle_id), r.current_device, dst_device, trigger, num_tokens=r.handle.num_tokens,
                                 request_id=request_id)
            self._move(r, spec, nvme=False, restore=False, count=True)
            return spec

    def restore(self, handle_id: str, *, dst_device: str | None = None,
                trigger: KVRestoreTrigger = KVRestoreTrigger.EXPLICIT, request_id: str = "") -> KVOffloadSpec:
        """Moves an offloaded handle back to ``dst_device`` (default: where it was registered)."""
        with self._lock:
            r = self._record(handle_id)
            if not r.offloaded:
                raise ValueError(f"handle {handle_id} is not offloaded (current device: {r.current_device})")
            target = r.original_device if dst_device is None else dst_device
            # The spec type has no restore trigger; ``trigger`` is the caller's reason, logged only.
            logger.debug("restore %s (%s)", handle_id, trigger.value)
            spec = KVOffloadSpec(str(handle_id), r.current_device, target, KVOffloadTrigger.EXPLICIT,
                                 num_tokens=r.handle.num_tokens, request_id=request_id)
            self._move(r, spec, nvme=_is_nvme(r.current_device), restore=True, count=True)
            return spec

    def offload_to_nvme(self, handle_id: str, *, dst_device: str = "nvme",
                        trigger: KVOffloadTrigger = KVOffloadTrigger.EXPLICIT, request_id: str = "") -> KVOffloadSpec:
        """Moves a host-resident handle on to NVMe (``nvme_transfer_fn``)."""
        if not _is_nvme(dst_device):
            raise ValueError(f"dst_device must be 'nvme' or 'nvme:<path>', got {dst_device!r}")
        with self._lock:
            r = self._record(handle_id)
            if not _is_cpu(r.current_device):
                raise ValueError(f"handle {handle_id} must be on CPU before offloading to NVMe "
                                 f"(current device: {r.current_device!r})")
            spec = KVOffloadSpec(str(handle_id), r.current_device, dst_device, trigger, num_tokens=r.handle.num_tokens,
                                 request_id=request_id)
            self._move(r, spec, nvme=True, restore=False, count=False)
            return spec

    def restore_from_nvme(self, handle_id: str, *, dst_device: str = "cpu",
                          trigger: KVRestoreTrigger = KVRestoreTrigger.EXPLICIT, request_id: str = "") -> KVOffloadSpec:
        """Moves a handle from NVMe back to host memory (or straight to an accelerator)."""
        with self._lock:
            r = self._record(handle_id)
            if not _is_nvme(r.current_device):
                raise ValueError(f"handle {handle_id} is not on NVMe (current device: {r.current_device!r})")
            logger.debug("restore from NVMe %s (%s)", handle_id, trigger.value)
            spec = KVOffloadSpec(str(handle_id), r.current_device, dst_device, KVOffloadTrigger.EXPLICIT,
                                 num_tokens=r.handle.num_tokens, request_id=request_id)
            self._move(r, spec, nvme=True, restore=True, count=False)
            return spec

    def _move(self, r: _Record, spec: KVOffloadSpec, *, nvme: bool, restore: bool, count: bool) -> bool:
        # ``count``: offload/restore to and from the accelerator count in the handle's record; moves
        # between host and NVMe only in the statistics.
        fn = self._nvme_transfer_fn if nvme else self._transfer_fn
        ok = True
        if fn is not None:
            try:
                ok = bool(fn(spec))
            except Exception:
                logger.exception("transfer function raised for %s (%s -> %s)", spec.handle_id, spec.src_device,
                                 spec.dst_device)
                ok = False
        prefix = "nvme_" if nvme else ""
        kind = "restore" if restore else "offload"
        s = self._stats
        if not ok:
            setattr(s, f"{prefix}{kind}_failures", getattr(s, f"{prefix}{kind}_failures") + 1)
            logger.warning("%s failed for handle %s (%s -> %s)", kind, spec.handle_id, spec.src_device, spec.dst_device)
            return False
        setattr(s, f"{prefix}{kind}s_triggered", getattr(s, f"{prefix}{kind}s_triggered") + 1)
        setattr(s, f"{prefix}{kind}_tokens", getattr(s, f"{prefix}{kind}_tokens") + spec.num_tokens)
        r.current_device = spec.dst_device
        r.last_active = time.monotonic()
        if count and restore:
            r.restore_count += 1
        elif count:
            r.offload_count += 1
        return True

    # --- policy -----------------------------------------------------------------------------

    def _lru_on(self, device: str) -> list[tuple[str, _Record]]:
        return sorted(((k, r) for k, r in self._records.items() if r.current_device == device),
                      key=lambda item: item[1].last_active)

    def _relieve(self, utilisation: float, threshold: float, src: str, limit: int | None,
                 move: Callable[[str], KVOffloadSpec]) -> list[KVOffloadSpec]:
        if isinstance(utilisation, bool) or not isinstance(utilisation, int | float) or not utilisation >= 0:
            raise ValueError(f"utilisation must be a number >= 0, got {utilisation!r}")
        if utilisation <= threshold:
            return []
        candidates = self._lru_on(src)
        total = sum(r.handle.num_tokens for _, r in candidates) or 1
        moved: list[KVOffloadSpec] = []
        remaining = total
        for key, record in candidates:
            if limit is not None and len(moved) >= limit:
                break
            if utilisation * remaining / total <= threshold:
                break
            if self.max_offloaded_handles is not None and not record.offloaded and \
                    self.offloaded_count() >= self.max_offloaded_handles:
                break
            spec = move(key)
            if record.current_device == spec.dst_device:  # moved (a failed move leaves it in place)
                moved.append(spec)
                remaining -= record.handle.num_tokens
        return moved

    def maybe_offload(self, npu_kv_utilisation: float, *, npu_device: str = "npu:0", cpu_device: str = "cpu",
                      max_to_offload: int | None = None) -> list[KVOffloadSpec]:
        """Above ``offload_threshold``, offloads the least recently active handles of ``npu_device``."""
        with self._lock:
            return self._relieve(npu_kv_utilisation, self.offload_threshold, npu_device, max_to_offload,
                                 lambda key: self.offload(key, dst_device=cpu_device,
                                                          trigger=KVOffloadTrigger.MEMORY_PRESSURE))

    def maybe_offload_idle(self, *, npu_device: str = "npu:0", cpu_device: str = "cpu",
                           max_to_offload: int | None = None) -> list[KVOffloadSpec]:
        """Offloads handles of ``npu_device`` idle for ``idle_offload_secs`` or more (none when unset)."""
        if self.idle_offload_secs is None:
            return []
        with self._lock:
            now = time.monotonic()
            moved: list[KVOffloadSpec] = []
            for key, record in self._lru_on(npu_device):
                if now - record.last_active < self.idle_offload_secs:
                    break
                if max_to_offload is not None and len(moved) >= max_to_offload:
                    break
                if self.max_offloaded_handles is not None and self.offloaded_count() >= self.max_offloaded_handles:
                    break
                spec = self.offload(key, dst_device=cpu_device, trigger=KVOffloadTrigger.IDLE_SEQUENCE)
                if record.current_device == cpu_device:
                    moved.append(spec)
            return moved

    def maybe_cascade_to_nvme(self, cpu_kv_utilisation: float, *, cpu_device: str = "cpu",
                              nvme_device: str = "nvme", max_to_cascade: int | None = None) -> list[KVOffloadSpec]:
        """Above ``nvme_offload_threshold``, moves the least recently active host-resident handles to NVMe."""
        with self._lock:
            return self._relieve(cpu_kv_utilisation, self.nvme_offload_threshold, cpu_device, max_to_cascade,
                                 lambda key: self.offload_to_nvme(key, dst_device=nvme_device,
                                                                  trigger=KVOffloadTrigger.NVME_PRESSURE))
