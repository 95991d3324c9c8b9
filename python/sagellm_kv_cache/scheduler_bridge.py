"""``SchedulerBridge``: turns a scheduler's queue into a KV-feasible batch (the seed's bridge).

The bridge sits between a scheduler that speaks the protocol's :class:`SchedulerRequest` /
:class:`SchedulerPlan` and the KV memory, built on a
:class:`~sagellm_kv_cache.kv_cache_manager.KVCacheManager` (one token budget, ``max_tokens``, with
eviction of cold unpinned handles) and, for placement, a
:class:`~sagellm_kv_cache.load_aware_scheduler.LoadAwareScheduler` over a
:class:`~sagellm_kv_cache.load_metrics.LoadMetricsCollector`.

:meth:`SchedulerBridge.plan` admits requests in priority order (higher ``priority`` first, then
earlier ``queued_at``, then input order) and *reserves* their KV: an admitted request holds pinned
handles until :meth:`SchedulerBridge.free_request`. A request whose KV does not fit is deferred
(listed in :attr:`SchedulerBridge.last_deferred`); later, smaller requests may still be admitted.
A request is never half-allocated: when its second handle fails, the first is returned before the
request is deferred.

The plan has the original package's shape: ``requests`` is the input list itself (the same
objects, unchanged, in input order) and ``batch_size`` its length; what was admitted is
``placement`` (request id -> device, admitted requests only, in admission order), and
``total_kv_tokens`` / ``total_memory_mb`` count the KV newly reserved for them. The sageLLM engine
reads ``placement`` to know which requests got KV. :attr:`SchedulerBridge.last_scheduled` holds
the admitted requests as copies in state ``SCHEDULED`` with the prefix figures below.

Prefix reuse (``enable_prefix_cache``): a request's ``prefix_fingerprint`` names its shared prefix
and ``prefix_hit_len`` (when > 0) its length in tokens (default: the whole prompt; always at least
one token is left to the request itself). The first admitted request with a fingerprint allocates
the prefix as a separate handle, which stays cached after the request ends (unpinned, so the
manager evicts it under pressure, coldest first); later requests with the same fingerprint reuse it
on its device and allocate only the rest. In :attr:`SchedulerBridge.last_scheduled`,
``prefix_hit_len`` is then the number of tokens actually reused (0 for the request that computed
the prefix) and ``kv_tokens_required`` the request's whole need.

Memory figures (``SchedulerPlan.total_memory_mb``, the devices' ``memory_*_mb``) are the KV tokens
times ``bytes_per_token`` (default 4, the figure the original package reports) in MiB.

Reset: :meth:`SchedulerBridge.reset` frees everything. A reset of the manager underneath
(``bridge.manager.reset()``), or of its pool (``bridge.manager.pool.reset()``, which the manager
notices the same way), drops every handle too, the bridge's reservations included; the
bridge notices it (the manager's ``generation`` changed) at its next call, forgets the
reservations and prefixes whose handles are gone and updates the load figures, so it never reports
or frees KV that no longer exists (``free_request`` of such a request is a
``KVRequestNotFoundError``, as after ``bridge.reset()``).

Placement: ``devices`` (default ``["cuda:0"]``) share the one budget, as in the seed's single pool;
each is registered in the collector with capacity ``max_tokens`` and its usage is updated after
every admission and free, so with ``enable_load_awareness`` the scheduler's strategy
(``LOWEST_KV`` by default) spreads requests by the KV each device holds. A request's
``device_affinity`` (any spelling :func:`~sagellm_kv_cache.pool.kv_pool.parse_device` takes,
such as ``"cuda"`` for ``"cuda:0"``; a bad label is refused before anything is reserved) wins when
it is one of the devices. Without load awareness everything goes to
the affinity device or the first device.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sagellm_protocol.kv import EvictionPolicy, SchedulerPlan, SchedulerRequest, SchedulerState

from sagellm_kv_cache._numbers import is_finite_number, iterable
from sagellm_kv_cache.errors import (
    KVBudgetExceededError,
    KVConfigInvalidError,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    KVPoolFullError,
)
from sagellm_kv_cache.eviction import EvictionManager
from sagellm_kv_cache.kv_cache_manager import KVCacheManager
from sagellm_kv_cache.load_aware_scheduler import LoadAwareScheduler, PlacementStrategy
from sagellm_kv_cache.load_metrics import LoadMetricsCollector
from sagellm_kv_cache.models.kv_handle import KVHandle
from sagellm_kv_cache.pool.kv_pool import KVPool, parse_device
from sagellm_kv_cache.prefix_cache import PrefixCache

__all__ = ["KVRequestNotFoundError", "SchedulerBridge"]

_DEFAULT_DEVICES = ("cuda:0",)
_MIB = float(1 << 20)


class KVRequestNotFoundError(KVHandleNotFoundError):
    """A request id the bridge holds no KV for (never allocated, or already freed)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id, context={"request_id": request_id})
        self.message = f"no KV is allocated for request {request_id!r}"
        self.args = (self.message,)
        self.request_id = request_id


@dataclass
class _Reservation:
    """What one admitted request holds."""

    request_id: str
    handle: KVHandle  # the request's own tokens (pinned)
    prefix: KVHandle | None  # a shared prefix handle it reuses or computed (pinned while in use)
    device: str
    reused_tokens: int


def _request_id(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"request_id must be a str, got {type(value).__name__}")
    if not value:
        raise KVConfigInvalidError("request_id", value, reason="must not be empty")
    return value


# The fields plan reads while it reserves: a model changed after validation (pydantic does not
# re-validate assignments) is refused before anything is reserved, not half-way through the batch.
_SIZE_FIELDS = ("prompt_len", "max_new_tokens", "kv_tokens_required", "prefix_hit_len")
_OPTIONAL_STR_FIELDS = ("prefix_fingerprint", "session_id", "device_affinity")


def _check_fields(request: SchedulerRequest) -> None:
    for field in _SIZE_FIELDS:
        value = getattr(request, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KVConfigInvalidError(field, value, reason=f"request {request.request_id!r}: must be an int >= 0")
    for field in _OPTIONAL_STR_FIELDS:
        value = getattr(request, field)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{field} of request {request.request_id!r} must be a str or None, "
                            f"got {type(value).__name__}")
    # The admission order's keys: a str or None was a TypeError about unary '-' or '<' naming
    # neither the field nor the request, and a NaN put the batch in an arbitrary order.
    priority = request.priority
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise KVConfigInvalidError("priority", priority, reason=f"request {request.request_id!r}: must be an int")
    queued_at = request.queued_at
    if not is_finite_number(queued_at) or queued_at < 0:
        raise KVConfigInvalidError("queued_at", queued_at,
                                   reason=f"request {request.request_id!r}: must be a finite number >= 0")
    if SchedulerBridge._tokens_needed(request) < 1:
        raise KVConfigInvalidError("kv_tokens_required", 0,
                                   reason=f"request {request.request_id!r} needs no KV (no prompt and no new tokens)")


def _affinity(request: SchedulerRequest) -> str | None:
    """The request's ``device_affinity`` in canonical spelling ("cuda" is "cuda:0", as the bridge's
    devices are spelled); None or "" is no affinity. A bad label is the error parse_device raises,
    naming the request."""
    affinity = request.device_affinity
    if not affinity:
        return None
    try:
        return parse_device(affinity)
    except KVConfigInvalidError as exc:
        raise KVConfigInvalidError("device_affinity", affinity,
                                   reason=f"request {request.request_id!r}: {exc.reason}") from exc


class SchedulerBridge:
    """Plans batches under the KV budget, reuses cached prefixes and places requests on devices.

    The original's public attributes: ``kv_pool`` and ``eviction_manager`` (of the manager
    underneath), ``load_metrics_collector`` and ``load_aware_scheduler`` (placement), and
    ``prefix_cache``: a block-hash :class:`~sagellm_kv_cache.prefix_cache.PrefixCache` of the
    bridge's block size for the caller's token-level prefix lookups (None without
    ``enable_prefix_cache``); the bridge's own prefix reuse goes by fingerprint (see the module
    docstring) and does not fill it.

    Thread-safe: one lock serialises planning, allocation and freeing.
    """

    def __init__(
        self,
        max_tokens: int,
        block_size: int = 16,
        enable_prefix_cache: bool = True,
        eviction_policy: EvictionPolicy = EvictionPolicy.LRU,
        enable_load_awareness: bool = False,
        placement_strategy: PlacementStrategy = PlacementStrategy.LOWEST_KV,
        devices: list[str] | None = None,
        *,
        bytes_per_token: int = 4,
    ) -> None:
        if devices is None:
            devices = list(_DEFAULT_DEVICES)
        if isinstance(devices, str | bytes) or not isinstance(devices, Sequence):
            raise TypeError(f"devices must be a list of device names, got {type(devices).__name__}")
        if not devices:
            raise KVConfigInvalidError("devices", devices, reason="must name at least one device")
        canonical = [parse_device(device) for device in devices]
        if len(set(canonical)) != len(canonical):
            raise KVConfigInvalidError("devices", devices, reason="lists a device twice")
        self._manager = KVCacheManager(max_tokens, block_size, eviction_policy=eviction_policy,
                                       bytes_per_token=bytes_per_token)
        self.bytes_per_token = self._manager.bytes_per_token
        self.max_tokens = self._manager.max_tokens
        self.block_size = self._manager.block_size
        self.enable_prefix_cache = bool(enable_prefix_cache)
        self.enable_load_awareness = bool(enable_load_awareness)
        self.devices: list[str] = canonical
        self._collector = LoadMetricsCollector()
        for device in canonical:
            self._collector.register_device(device, kv_tokens_capacity=self.max_tokens,
                                            memory_capacity_mb=self._mib(self.max_tokens))
        self._scheduler = LoadAwareScheduler(self._collector, placement_strategy, self.enable_load_awareness)
        self.load_metrics_collector = self._collector
        self.load_aware_scheduler = self._scheduler
        self.prefix_cache: PrefixCache | None = PrefixCache(self.block_size) if self.enable_prefix_cache else None
        self._lock = threading.RLock()
        self._requests: dict[str, _Reservation] = {}
        self._active: dict[str, int] = dict.fromkeys(canonical, 0)  # reservations per device
        self._prefixes: dict[str, KVHandle] = {}  # fingerprint -> prefix handle
        self._last_deferred: list[str] = []
        self._last_scheduled: list[SchedulerRequest] = []
        self._generation = self._manager.generation  # the manager's resets seen (see _catch_up)

    # --- planning -------------------------------------------------------------------------------

    def plan(self, requests: Iterable[SchedulerRequest]) -> SchedulerPlan:
        """Admits what fits, reserving its KV; returns the plan (the original's shape: every input
        request, ``placement`` for the admitted ones; see the module docstring).

        ``requests`` is any iterable of requests that is not a mapping. Bad input (an item that is not
        a ``SchedulerRequest``, an empty id, a size field that is not an int
        >= 0, a fingerprint or session id that is not a str, an id twice in the batch, an id that
        already holds KV) raises before anything is reserved.
        """
        # One request is refused too: a pydantic model iterates as its (field, value) pairs.
        iterable("requests", requests, "a sequence of SchedulerRequest", refuse=(Mapping, SchedulerRequest))
        if not isinstance(requests, Sequence):  # dict.values() or a generator (the original took the former)
            requests = list(requests)
        seen: set[str] = set()
        affinities: list[str | None] = []  # each request's device_affinity, canonical
        for index, request in enumerate(requests):
            if not isinstance(request, SchedulerRequest):
                raise TypeError(f"requests[{index}] is a {type(request).__name__}, not a SchedulerRequest")
            _request_id(request.request_id)  # what free_request refuses could never be freed
            _check_fields(request)
            affinities.append(_affinity(request))
            if request.request_id in seen:
                raise KVConfigInvalidError("request_id", request.request_id, reason="appears twice in the batch")
            seen.add(request.request_id)
        order = sorted(range(len(requests)),
                       key=lambda i: (-requests[i].priority, requests[i].queued_at, i))
        now = time.time()
        with self._lock:
            self._catch_up()
            taken = [rid for rid in seen if rid in self._requests]
            if taken:
                raise KVConfigInvalidError("request_id", taken[0], reason="already has KV allocated; free it first")
            admitted: list[SchedulerRequest] = []
            placement: dict[str, str] = {}
            deferred: list[str] = []
            new_tokens = 0
            for index in order:
                request = requests[index]
                reservation = self._admit(request, affinities[index])
                if reservation is None:
                    deferred.append(request.request_id)
                    continue
                needed = self._tokens_needed(request)
                admitted.append(request.model_copy(update={
                    "state": SchedulerState.SCHEDULED,
                    "scheduled_at": now,
                    "prefix_hit_len": reservation.reused_tokens,
                    "kv_tokens_required": needed,
                }))
                placement[request.request_id] = reservation.device
                new_tokens += needed - reservation.reused_tokens
                self._sync_load()  # the next placement sees this admission's usage
            self._last_deferred = deferred
            self._last_scheduled = admitted
            self._sync_load()  # admissions may have evicted cold prefixes anywhere
            self._prune_prefixes()
        return SchedulerPlan(
            plan_id=uuid.uuid4(),
            requests=list(requests),
            batch_size=len(requests),
            total_kv_tokens=new_tokens,
            total_memory_mb=self._mib(new_tokens),
            placement=placement,
            created_at=now,
        )

    @property
    def last_scheduled(self) -> list[SchedulerRequest]:
        """The requests the last :meth:`plan` admitted, in admission order: copies in state
        ``SCHEDULED`` with ``scheduled_at``, ``kv_tokens_required`` (the whole need) and
        ``prefix_hit_len`` (tokens reused from a cached prefix)."""
        with self._lock:
            return list(self._last_scheduled)

    @property
    def last_deferred(self) -> list[str]:
        """Ids of the requests the last :meth:`plan` could not admit, in the order it tried them."""
        with self._lock:
            return list(self._last_deferred)

    # --- direct allocation ----------------------------------------------------------------------

    def allocate_request(
        self,
        request_id: str,
        num_tokens: int,
        device: str = "cuda:0",
        session_id: str | None = None,
    ) -> KVHandle:
        """Reserves ``num_tokens`` for ``request_id`` on ``device`` (one of the bridge's devices).

        Cold cached prefixes are evicted when needed; ``KVBudgetExceededError`` when that cannot
        make room. The handle stays pinned (never evicted) until :meth:`free_request`.
        """
        request_id = _request_id(request_id)
        device = parse_device(device)
        if device not in self.devices:
            raise KVConfigInvalidError("device", device, reason=f"not one of this bridge's devices: "
                                                               f"{', '.join(self.devices)}")
        if session_id is not None and not isinstance(session_id, str):
            raise TypeError(f"session_id must be a str or None, got {type(session_id).__name__}")
        with self._lock:
            self._catch_up()
            if request_id in self._requests:
                raise KVConfigInvalidError("request_id", request_id, reason="already has KV allocated; free it first")
            handle = self._reserve(num_tokens, device, request_id, session_id)
            self._record(_Reservation(request_id, handle, None, device, 0))
            self._sync_load()
        return handle

    def free_request(self, request_id: str) -> None:
        """Returns the request's own KV; a prefix it used stays cached (evictable once unused)."""
        request_id = _request_id(request_id)
        with self._lock:
            self._catch_up()
            reservation = self._requests.get(request_id)
            if reservation is None:
                raise KVRequestNotFoundError(request_id)
            live = self._live(reservation.handle)
            if live is not None and live.pin_count > 1:  # pinned by someone else too: theirs to release
                raise KVHandlePinnedError(live.handle_id, operation="free", pin_count=live.pin_count - 1,
                                          context={"request_id": request_id})
            del self._requests[request_id]
            self._active[reservation.device] -= 1
            if live is not None:
                if live.pin_count:
                    self._manager.unpin(live)
                self._manager.free(live)
            prefix = self._live(reservation.prefix) if reservation.prefix is not None else None
            if prefix is not None and prefix.pin_count:
                self._manager.unpin(prefix)
            self._sync_load()
            if live is None:
                # Freed (or unpinned and evicted) through bridge.manager behind the bridge's back: the
                # reservation is forgotten, as after a reset of the manager, and the KV was not ours to free.
                raise KVRequestNotFoundError(request_id)

    def get_request_handle(self, request_id: str) -> KVHandle:
        """The handle holding ``request_id``'s own tokens (not a shared prefix)."""
        request_id = _request_id(request_id)
        with self._lock:
            self._catch_up()
            reservation = self._requests.get(request_id)
            if reservation is None:
                raise KVRequestNotFoundError(request_id)
            return reservation.handle

    # --- introspection --------------------------------------------------------------------------

    def get_stats(self) -> dict:
        """``load_metrics`` (per device), ``num_requests``, ``placement`` and ``pool`` (the manager's)."""
        with self._lock:
            self._catch_up()
            return {
                "load_metrics": {device: m.to_dict() for device, m in self._collector.get_all_metrics().items()},
                "num_requests": len(self._requests),
                "placement": self._scheduler.get_placement_stats(),
                "pool": self._manager._flat_stats(),  # the original's bridge: the pool's keys, flat
            }

    def reset(self) -> None:
        """Frees every reservation and cached prefix and zeroes the load and placement numbers."""
        with self._lock:
            self._manager.reset()
            self._generation = self._manager.generation
            self._requests.clear()
            self._active = dict.fromkeys(self.devices, 0)
            self._prefixes.clear()
            self._last_deferred = []
            self._last_scheduled = []
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
            self._scheduler.reset_stats()
            self._collector.reset()

    @property
    def manager(self) -> KVCacheManager:
        """The KV manager underneath (token-level ``register_prefix`` / ``query_prefix`` live there)."""
        return self._manager

    @property
    def load_collector(self) -> LoadMetricsCollector:
        return self._collector

    @property
    def scheduler(self) -> LoadAwareScheduler:
        return self._scheduler

    @property
    def kv_pool(self) -> KVPool:
        """The token-budget pool underneath (original attribute name)."""
        return self._manager.kv_pool

    @property
    def eviction_manager(self) -> EvictionManager:
        return self._manager.eviction_manager

    @property
    def _request_handles(self) -> dict[str, KVHandle]:
        """Request id -> the handle holding that request's own tokens (a fresh dict).

        Part of the contract although private: the sageLLM engine's scheduler (``isagellm-core``
        0.5.4.x, ``ContinuousBatchingScheduler.schedule`` with ``use_scheduler_bridge=True``) reads
        ``bridge._request_handles[request_id]._blocks`` to build prefill block tables. A shared
        prefix a request reuses is a separate handle and not part of this entry.
        """
        with self._lock:
            self._catch_up()
            return {rid: reservation.handle for rid, reservation in self._requests.items()}

    def __len__(self) -> int:
        with self._lock:
            self._catch_up()
            return len(self._requests)

    def __bool__(self) -> bool:
        # Truthy while empty: the engine enables the bridge path with `if self._advanced_scheduler_bridge:`
        # (the original class had no __len__, so it was always true).
        return True

    def __repr__(self) -> str:
        return f"SchedulerBridge(max_tokens={self.max_tokens}, block_size={self.block_size}, num_requests={len(self)})"

    # --- internals (the lock is held) ------------------------------------------------------------

    @staticmethod
    def _tokens_needed(request: SchedulerRequest) -> int:
        return request.kv_tokens_required or request.prompt_len + request.max_new_tokens

    def _admit(self, request: SchedulerRequest, affinity: str | None) -> _Reservation | None:
        """Reserves the request's KV, or returns None (with nothing reserved) when it does not fit.
        ``affinity`` is the request's ``device_affinity`` as :func:`parse_device` spells it."""
        if affinity != request.device_affinity:  # the scheduler compares labels as given
            request = request.model_copy(update={"device_affinity": affinity})
        needed = self._tokens_needed(request)
        if needed > self.max_tokens:
            return None
        fingerprint = request.prefix_fingerprint if self.enable_prefix_cache else None
        prefix_len = 0
        if fingerprint:
            declared = request.prefix_hit_len or request.prompt_len
            prefix_len = max(0, min(declared, request.prompt_len, needed - 1))
        if prefix_len == 0:
            fingerprint = None

        cached = self._cached_prefix(fingerprint) if fingerprint else None
        if cached is not None:
            reused = min(cached.num_tokens, prefix_len)
            own = needed - reused
            self._manager.pin(cached)  # so that making room for `own` cannot evict it
            if not self._manager.can_admit(own):
                self._manager.unpin(cached)
                return None
            device = self._scheduler.select_device([cached.device], own, request.request_id)
            try:
                handle = self._reserve(own, device, request.request_id, request.session_id)
            except (KVBudgetExceededError, KVPoolFullError):
                self._manager.unpin(cached)
                return None
            cached.touch()
            reservation = _Reservation(request.request_id, handle, cached, device, reused)
        elif fingerprint:
            own = needed - prefix_len
            blocks = self._blocks(prefix_len) + self._blocks(own)
            if not self._manager.can_admit(needed, num_blocks=blocks):
                return None
            device = self._scheduler.select_device_for_request(request, list(self.devices))
            try:
                prefix = self._reserve(prefix_len, device, None, None, fingerprint=fingerprint)
            except (KVBudgetExceededError, KVPoolFullError):
                return None
            try:
                handle = self._reserve(own, device, request.request_id, request.session_id)
            except (KVBudgetExceededError, KVPoolFullError):
                self._manager.unpin(prefix)
                self._manager.free(prefix)
                return None
            self._prefixes[fingerprint] = prefix
            reservation = _Reservation(request.request_id, handle, prefix, device, 0)
        else:
            if not self._manager.can_admit(needed):
                return None
            device = self._scheduler.select_device_for_request(request, list(self.devices))
            try:
                handle = self._reserve(needed, device, request.request_id, request.session_id)
            except (KVBudgetExceededError, KVPoolFullError):
                return None
            reservation = _Reservation(request.request_id, handle, None, device, 0)
        self._record(reservation)
        return reservation

    def _catch_up(self) -> None:
        """Forgets what a reset of the manager made by someone else dropped (see the module docstring).

        One integer comparison while nothing happened. After a reset, a reservation stays only if the
        manager still holds its handle (a handle id is never reused), so an allocation racing the
        reset is kept exactly when it survived it.
        """
        generation = self._manager.generation
        if generation == self._generation:
            return
        self._generation = generation  # read first: a reset during this sweep triggers the next one
        live = {handle.handle_id for handle in self._manager.handles()}
        for request_id in [rid for rid, r in self._requests.items() if r.handle.handle_id not in live]:
            reservation = self._requests.pop(request_id)
            self._active[reservation.device] -= 1
        for reservation in self._requests.values():
            if reservation.prefix is not None and reservation.prefix.handle_id not in live:
                reservation.prefix = None
        self._prefixes = {f: h for f, h in self._prefixes.items() if h.handle_id in live}
        self._sync_load()

    def _record(self, reservation: _Reservation) -> None:
        self._requests[reservation.request_id] = reservation
        self._active[reservation.device] += 1

    def _reserve(self, num_tokens: int, device: str, request_id: str | None, session_id: str | None,
                 *, fingerprint: str | None = None) -> KVHandle:
        metadata: dict[str, Any] = {"role": "prefix" if fingerprint else "request"}
        if fingerprint:
            metadata["prefix_fingerprint"] = fingerprint
        if request_id is not None:
            metadata["request_id"] = request_id
        handle = self._manager.alloc(num_tokens, device=device, metadata=metadata)
        self._manager.pin(handle)
        handle.request_id = request_id
        handle.session_id = session_id
        handle.placement = device
        return handle

    def _live(self, handle: KVHandle) -> KVHandle | None:
        """The manager's live record of ``handle``, or None when the manager no longer holds it."""
        try:
            return self._manager.get_handle(handle.handle_id)
        except KVHandleNotFoundError:
            return None

    def _cached_prefix(self, fingerprint: str) -> KVHandle | None:
        handle = self._prefixes.get(fingerprint)
        if handle is None:
            return None
        try:
            return self._manager.get_handle(handle.handle_id)
        except KVHandleNotFoundError:  # evicted by the manager to make room
            del self._prefixes[fingerprint]
            return None

    def _prune_prefixes(self) -> None:
        # Evicted prefixes are noticed lazily; sweep when stale entries could dominate the table.
        if len(self._prefixes) > 2 * len(self._manager) + 64:
            live = {h.handle_id for h in self._manager.handles()}
            self._prefixes = {f: h for f, h in self._prefixes.items() if h.handle_id in live}

    def _mib(self, tokens: int) -> float:
        return tokens * self.bytes_per_token / _MIB

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _sync_load(self) -> None:
        usage = self._manager.tokens_by_device()
        for device in self.devices:
            self._collector.update_kv_usage(device, usage.get(device, 0))
            self._collector.update_memory_usage(device, self._mib(usage.get(device, 0)))
            self._collector.update_request_count(device, self._active[device], 0)
