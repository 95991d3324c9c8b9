"""Where each KV handle lives in a three-tier hierarchy, and the moves between tiers (the seed's
``KVOffloadManager``, 0.5.4.x).

Tiers: an accelerator (``"cuda:0"``, ``"npu:0"``), host memory (``"cpu"``) and NVMe (``"nvme"`` or
``"nvme:/path"``). The manager keeps, per registered handle, its current and original device and
when it was last active, decides which handles to move (least recently active first) and describes
each move as a :class:`~sagellm_protocol.heterogeneous_types.KVOffloadSpec`. The bytes are moved by
the caller's ``transfer_fn(spec) -> bool`` (accelerator <-> host) and ``nvme_transfer_fn`` (host
<-> NVMe); without one the move is bookkeeping only (dry run). A move whose function returns False
or raises leaves the handle where it was and counts as a failure.

With ``storage=OffloadStorage(pool, host_blocks=..., disk_dir=..., disk_blocks=...)`` the manager
moves the bytes itself (see :class:`OffloadStorage`): a registered handle's ``block_ids`` are blocks
of that :class:`~sagellm_kv_cache.paged.PagedKVPool`; offloading copies them into host slots (pinned
memory on a GPU) and frees the device blocks, ``offload_to_nvme`` writes them to checked disk slots,
and a restore allocates fresh device blocks, copies the bytes back and gives the handle the new ids.

Pressure-driven offload (``maybe_offload``, ``maybe_cascade_to_nvme``) estimates the utilisation
after each move from the handles registered on the source device (each holds its share of the
reported utilisation, by tokens) and stops once the estimate is at or below the threshold.
Thread-safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from sagellm_protocol.heterogeneous_types import KVOffloadSpec, KVOffloadStats, KVOffloadTrigger, KVRestoreTrigger

from sagellm_kv_cache.errors import KVInvalidHandleError
from sagellm_kv_cache.models.kv_handle import KVHandle
from sagellm_kv_cache.paged import PagedKVPool

__all__ = ["KVOffloadManager", "KVOffloadSpec", "KVOffloadStats", "KVOffloadTrigger", "KVRestoreTrigger",
           "OffloadStorage"]

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


@dataclass
class _Placement:
    where: str  # "device", "host" or "disk"
    ids: list[int]  # device block ids, host slots or disk slots, in the handle's block order


# (src, dst) tier pairs OffloadStorage.move knows (each has a _<src>_to_<dst> method).
_MOVES = (("device", "host"), ("host", "device"), ("host", "disk"), ("disk", "host"), ("disk", "device"))


class OffloadStorage:
    """Where offloaded handles' bytes go: host slots and disk slots under a device pool.

    Moves are synchronous and all or nothing: a move that cannot complete (no free host or disk
    slot, no free device block, a disk slot failing its check) raises and leaves the handle's
    bytes where they were. Thread-safe (one lock; the manager also serialises its moves).
    """

    def __init__(self, pool: PagedKVPool, *, host_blocks: int, disk_dir: str | os.PathLike[str] | None = None,
                 disk_blocks: int = 0, direct_io: bool = True, fsync: bool = False) -> None:
        from sagellm_kv_cache.tiers import DiskTier, HostTier

        if not isinstance(pool, PagedKVPool):
            raise TypeError(f"pool must be a PagedKVPool, got {type(pool).__name__}")
        if disk_blocks and disk_dir is None:
            raise ValueError("disk_blocks > 0 needs disk_dir")
        self.pool = pool
        self.host = HostTier(host_blocks, pool.block_nbytes, pool.device)
        self.disk = (DiskTier(disk_dir, disk_blocks, pool.block_nbytes, direct_io=direct_io, fsync=fsync)
                     if disk_blocks and disk_dir is not None else None)
        self._placements: dict[str, _Placement] = {}
        self._lock = threading.Lock()
        self.bytes_moved: dict[str, int] = {"device_to_host": 0, "host_to_device": 0, "host_to_disk": 0,
                                            "disk_to_host": 0, "disk_to_device": 0}

    def _key(self, handle_id: str, i: int) -> bytes:
        return hashlib.sha256(f"{handle_id}/{i}".encode()).digest()

    def _take(self, allocator: Any, n: int, what: str) -> npt.NDArray[np.int32]:
        if allocator.num_available < n:
            raise MemoryError(f"{what}: {n} slots needed, {allocator.num_available} free")
        return allocator.allocate(n)

    def placement(self, handle_id: str) -> tuple[str, list[int]] | None:
        with self._lock:
            p = self._placements.get(str(handle_id))
            return None if p is None else (p.where, list(p.ids))

    def move(self, handle: KVHandle, src: str, dst: str) -> None:
        """Moves the handle's bytes from tier ``src`` to ``dst`` ("device", "host", "disk").

        The moves are device <-> host, host <-> disk and disk -> device; any other pair (or an
        unknown tier name) raises ``ValueError`` and moves nothing."""
        if (src, dst) not in _MOVES:
            raise ValueError(f"cannot move a handle from {src!r} to {dst!r}; the moves are "
                             + ", ".join(f"{a}->{b}" for a, b in _MOVES))
        key = str(handle.handle_id)
        with self._lock:
            p = self._placements.get(key) or _Placement("device", [int(b) for b in handle.block_ids])
            if p.where != src:
                raise ValueError(f"handle {key} has its bytes on {p.where}, not {src}")
            n = len(p.ids)
            getattr(self, f"_{src}_to_{dst}")(key, p, n)
            if dst == "device":
                handle._block_ids = np.asarray(p.ids, dtype=np.int32)
                self._placements.pop(key, None)
            else:
                if src == "device":
                    handle._block_ids = np.empty(0, dtype=np.int32)  # no device blocks while offloaded
                self._placements[key] = p

    def forget(self, handle_id: str) -> None:
        """Releases the host or disk slots of a handle that is unregistered while offloaded."""
        with self._lock:
            p = self._placements.pop(str(handle_id), None)
            if p is not None and p.ids:
                ids = np.asarray(p.ids, np.int32)
                if p.where == "host":
                    self.host.slots.free(ids)
                elif p.where == "disk" and self.disk is not None:
                    self.disk.slots.free(ids)

    # --- the moves (under the lock; each checks first, then moves, then releases the source) ---

    def _device_to_host(self, key: str, p: _Placement, n: int) -> None:
        slots = self._take(self.host.slots, n, "host tier")
        try:
            if n:
                self.host.slab.copy_from_pool(self.pool._native, np.asarray(p.ids, np.int32), slots)
        except BaseException:
            self.host.slots.free(slots)
            raise
        if n:
            self.pool.free(np.asarray(p.ids, np.int32))
        p.where, p.ids = "host", slots.tolist()
        self.bytes_moved["device_to_host"] += n * self.pool.block_nbytes

    def _host_to_device(self, key: str, p: _Placement, n: int) -> None:
        ids = self.pool.allocate(n) if n else np.empty(0, np.int32)
        try:
            if n:
                self.host.slab.copy_to_pool(self.pool._native, np.asarray(p.ids, np.int32), ids)
        except BaseException:
            self.pool.free(ids)
            raise
        if n:
            self.host.slots.free(np.asarray(p.ids, np.int32))
        p.where, p.ids = "device", ids.tolist()
        self.bytes_moved["host_to_device"] += n * self.pool.block_nbytes

    def _disk(self) -> Any:
        if self.disk is None:
            raise ValueError("this OffloadStorage has no disk tier (disk_blocks=0)")
        return self.disk

    def _host_to_disk(self, key: str, p: _Placement, n: int) -> None:
        disk = self._disk()
        slots = self._take(disk.slots, n, "disk tier")
        try:
            for i, (host_slot, disk_slot) in enumerate(zip(p.ids, slots.tolist(), strict=True)):
                disk.write(disk_slot, self._key(key, i), self.host.view[host_slot], disk.next_generation())
        except BaseException:
            disk.slots.free(slots)
            raise
        if n:
            self.host.slots.free(np.asarray(p.ids, np.int32))
        p.where, p.ids = "disk", slots.tolist()
        self.bytes_moved["host_to_disk"] += n * self.pool.block_nbytes

    def _read_disk(self, key: str, p: _Placement, out: Any, i: int) -> None:
        from sagellm_kv_cache.errors import KVChecksumMismatchError

        if not self._disk().read(p.ids[i], self._key(key, i), out):
            raise KVChecksumMismatchError("an intact disk slot", f"slot {p.ids[i]} torn or stale",
                                          context={"handle_id": key, "block": i})

    def _disk_to_host(self, key: str, p: _Placement, n: int) -> None:
        slots = self._take(self.host.slots, n, "host tier")
        try:
            for i, slot in enumerate(slots.tolist()):
                self._read_disk(key, p, self.host.view[slot], i)
        except BaseException:
            self.host.slots.free(slots)
            raise
        if n:
            self._disk().slots.free(np.asarray(p.ids, np.int32))
        p.where, p.ids = "host", slots.tolist()
        self.bytes_moved["disk_to_host"] += n * self.pool.block_nbytes

    def _disk_to_device(self, key: str, p: _Placement, n: int) -> None:
        disk = self._disk()
        ids = self.pool.allocate(n) if n else np.empty(0, np.int32)
        bounce = disk.bounce_buffer()
        try:
            for i, block in enumerate(ids.tolist()):
                self._read_disk(key, p, bounce, i)
                self.pool.scatter(bounce[: self.pool.block_nbytes], [block])
        except BaseException:
            self.pool.free(ids)
            raise
        if n:
            disk.slots.free(np.asarray(p.ids, np.int32))
        p.where, p.ids = "device", ids.tolist()
        self.bytes_moved["disk_to_device"] += n * self.pool.block_nbytes

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


def _tier(device: str) -> str:
    return "disk" if _is_nvme(device) else "host" if _is_cpu(device) else "device"


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
        *,
        storage: OffloadStorage | None = None,
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
        if storage is not None and not isinstance(storage, OffloadStorage):
            raise TypeError(f"storage must be an OffloadStorage or None, got {type(storage).__name__}")
        if storage is not None and (transfer_fn is not None or nvme_transfer_fn is not None):
            raise ValueError("pass either storage (the manager moves the bytes) or transfer functions, not both")
        self.storage = storage
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
            if self.storage is not None and _accelerator(device):
                ids = handle.block_ids
                if any(not self.storage.pool.is_allocated(int(b)) for b in ids):
                    raise ValueError(f"handle {key}: its block_ids must be allocated blocks of the storage's pool")
            self._records[key] = _Record(handle, device, device)

    def unregister(self, handle_id: str) -> None:
        """Stops tracking a handle (after it was freed); unknown ids are ignored."""
        with self._lock:
            if self._records.pop(str(handle_id), None) is not None and self.storage is not None:
                self.storage.forget(str(handle_id))

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
        if self.storage is not None:
            try:
                self.storage.move(r.handle, _tier(spec.src_device), _tier(spec.dst_device))
            except Exception:
                logger.exception("storage move failed for %s (%s -> %s)", spec.handle_id, spec.src_device,
                                 spec.dst_device)
                ok = False
        elif fn is not None:
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
