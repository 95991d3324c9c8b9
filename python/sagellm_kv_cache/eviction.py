"""Eviction policies over :class:`~sagellm_kv_cache.models.kv_handle.KVHandle` (the seed's API).

A strategy orders the evictable handles coldest first and takes them until the requested number of
tokens is covered. Selection is one validating pass over the candidates plus one sort, so choosing
victims among many handles stays ``O(n log n)``; the prefix cache has its own native eviction.

Rules shared by every strategy:

* pinned or in-flight handles (``not handle.is_evictable()``) are never chosen;
* a handle already freed (state ``FREE``) holds no tokens: it is skipped, neither chosen nor counted;
* a need of ``0`` tokens selects nothing;
* when every candidate is pinned, :class:`~sagellm_kv_cache.errors.KVAllPinnedError` is raised;
* when all evictable handles together hold fewer tokens than needed,
  :class:`~sagellm_kv_cache.errors.KVNoVictimError` is raised (its ``bytes_needed`` field carries the
  tokens needed, with ``unit="tokens"`` in its context);
* ``max_victims`` caps one round: the result may then cover fewer tokens than needed, and the caller
  evicts those and asks again;
* a handle listed twice (same ``handle_id``) counts once.

Nothing is mutated: the caller frees the victims it gets.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Iterable, Mapping
from typing import ClassVar, cast

import numpy as np
from sagellm_protocol.kv import EvictionPolicy, KVBlockState

from sagellm_kv_cache._numbers import finite_number, integer, iterable, shown
from sagellm_kv_cache.errors import KVAllPinnedError, KVNoVictimError
from sagellm_kv_cache.models.kv_handle import KVHandle

_log = logging.getLogger(__name__)

__all__ = [
    "EvictionManager",
    "EvictionStrategy",
    "FIFOEviction",
    "LFUEviction",
    "LRUEviction",
    "PriorityEviction",
    "TTLEviction",
]

# A sort key: tuples of numbers, the input position last so equal keys keep the caller's order.
_SortKey = tuple[float, ...]


def _check_int(name: str, value: object) -> int:
    # A numpy integer counts (the original took one: token counts are often summed with numpy).
    return integer(name, value)


class EvictionStrategy:
    """Base class: validates the candidates, orders them with :meth:`_sort_key`, takes the coldest."""

    policy: ClassVar[EvictionPolicy] = EvictionPolicy.LRU

    def select_victim(
        self,
        candidates: Iterable[KVHandle],
        num_tokens_needed: int,
        max_victims: int | None = None,
    ) -> list[KVHandle]:
        """Victims, coldest first, whose tokens add up to at least ``num_tokens_needed``.

        Raises ``TypeError`` for a non-``KVHandle`` candidate (naming its index), ``ValueError`` for a
        negative need or a ``max_victims`` below 1, ``KVAllPinnedError`` when everything is pinned and
        ``KVNoVictimError`` when the evictable handles cannot cover the need.
        """
        needed = _check_int("num_tokens_needed", num_tokens_needed)
        if needed < 0:
            raise ValueError(f"num_tokens_needed must be >= 0, got {needed}")
        if max_victims is not None and _check_int("max_victims", max_victims) < 1:
            raise ValueError(f"max_victims must be >= 1 or None, got {max_victims}")
        # Any iterable of handles, as in the original (dict.values(), a generator); not a mapping, a
        # str, or one handle (a pydantic model iterates as its (field, value) pairs).
        iterable("candidates", candidates, "a sequence of KVHandle", refuse=(Mapping, KVHandle))

        now = time.time()
        keyed: list[tuple[_SortKey, KVHandle]] = []
        seen: set[object] = set()
        pinned = 0
        evictable_tokens = 0
        for index, handle in enumerate(candidates):
            if not isinstance(handle, KVHandle):
                raise TypeError(f"candidates[{index}] is a {type(handle).__name__}, not a KVHandle")
            if handle.handle_id in seen or handle.state == KVBlockState.FREE:
                # A stale handle the caller still lists: evicting it would free nothing (and its
                # free() is a double free), so it must not count toward the need either.
                continue
            seen.add(handle.handle_id)
            if not handle.is_evictable():
                pinned += 1
                continue
            keyed.append(((*self._sort_key(handle, now, index), float(index)), handle))
            evictable_tokens += handle.num_tokens

        total = len(seen)
        if needed == 0:
            return []
        if total > 0 and pinned == total:
            raise KVAllPinnedError(total, context={"tokens_needed": needed})
        if evictable_tokens < needed:
            raise KVNoVictimError(
                needed,
                pinned_count=pinned,
                total_count=total,
                context={"unit": "tokens", "evictable_tokens": evictable_tokens},
            )

        keyed.sort(key=lambda pair: pair[0])
        limit = len(keyed) if max_victims is None else max_victims
        victims: list[KVHandle] = []
        covered = 0
        for _, handle in keyed:
            if covered >= needed or len(victims) >= limit:
                break
            victims.append(handle)
            covered += handle.num_tokens
        return victims

    def get_policy_name(self) -> EvictionPolicy:
        """The protocol's name of this policy (what schedulers put in their configs)."""
        return self.policy

    def _sort_key(self, handle: KVHandle, now: float, index: int) -> _SortKey:
        """Smaller keys are evicted first; ``index`` is the position in the candidate list."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LRUEviction(EvictionStrategy):
    """Least recently used first: a handle nobody touched for longest is least likely to be reused."""

    policy = EvictionPolicy.LRU

    def _sort_key(self, handle: KVHandle, now: float, index: int) -> _SortKey:
        return (handle.last_access, handle.created_at)


class FIFOEviction(EvictionStrategy):
    """Oldest allocation first, whatever its use: cheap and predictable for streaming workloads."""

    policy = EvictionPolicy.FIFO

    def _sort_key(self, handle: KVHandle, now: float, index: int) -> _SortKey:
        return (handle.created_at,)


class LFUEviction(EvictionStrategy):
    """Least frequently used first (``access_count``), least recently used among equals."""

    policy = EvictionPolicy.LFU

    def _sort_key(self, handle: KVHandle, now: float, index: int) -> _SortKey:
        return (float(handle.access_count), handle.last_access, handle.created_at)


class TTLEviction(EvictionStrategy):
    """Handles older than ``ttl_seconds`` (since ``created_at``) go first, oldest first; then LRU.

    Expiry bounds how long stale KV (e.g. of an abandoned session) can occupy memory, while the LRU
    fallback still frees space when nothing has expired yet.
    """

    policy = EvictionPolicy.TTL

    def __init__(self, ttl_seconds: float = 300.0) -> None:
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float)):
            raise TypeError(f"ttl_seconds must be a number, got {type(ttl_seconds).__name__}")
        if not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0, got {shown(ttl_seconds)}")
        try:
            self.ttl_seconds = float(ttl_seconds)
        except OverflowError:  # an int past the float range: never expires, as float("inf") does
            self.ttl_seconds = math.inf

    def is_expired(self, handle: KVHandle, now: float | None = None) -> bool:
        """True when the handle has lived at least ``ttl_seconds`` (at ``now``, a finite timestamp,
        default the current time). A non-handle is a ``TypeError``, a bad ``now`` a ``TypeError`` /
        ``ValueError`` naming it (NaN read every handle as unexpired)."""
        if not isinstance(handle, KVHandle):
            raise TypeError(f"handle must be a KVHandle, got {type(handle).__name__}")
        current = time.time() if now is None else finite_number("now", now)
        return current - handle.created_at >= self.ttl_seconds

    def _sort_key(self, handle: KVHandle, now: float, index: int) -> _SortKey:
        if now - handle.created_at >= self.ttl_seconds:  # is_expired without its checks (done for the batch)
            return (0.0, handle.created_at, 0.0)
        return (1.0, handle.last_access, handle.created_at)

    def __repr__(self) -> str:
        return f"TTLEviction(ttl_seconds={self.ttl_seconds})"


class PriorityEviction(EvictionStrategy):
    """Lowest ``metadata["priority"]`` first (``default_priority`` when absent), LRU among equals.

    Lets a scheduler protect, say, interactive sessions' KV over batch jobs' without pinning it.

    A priority must be a real number other than NaN. :meth:`priority_of` raises for anything else,
    and :class:`~sagellm_kv_cache.KVCacheManager` refuses such a value when a handle is allocated
    under this policy. But ``metadata`` is a mutable dict, so a bad value can still appear later:
    selection then orders that handle as if it had no priority (``default_priority``, neither
    protected nor sacrificed) and logs a warning on the ``sagellm_kv_cache.eviction`` logger naming
    the handle and the value, so one bad handle cannot stop the eviction of the others.
    """

    policy = EvictionPolicy.PRIORITY

    def __init__(self, default_priority: int = 0) -> None:
        self.default_priority = _check_int("default_priority", default_priority)

    @staticmethod
    def check_priority(value: object, what: str = "metadata['priority']") -> float:
        """``value`` as a sort key; a non-numeric value is a ``TypeError``, NaN a ``ValueError``, naming ``what``."""
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise TypeError(f"{what} must be a number, got {type(value).__name__}")
        try:
            priority = float(value)
        except OverflowError:  # an int past the float range still orders by its sign
            return math.inf if cast(float, value) > 0 else -math.inf  # any Real compares with 0
        if math.isnan(priority):  # NaN orders against nothing: the sort would put victims in any order
            raise ValueError(f"{what} must not be NaN, got {value!r}")
        return priority

    def priority_of(self, handle: KVHandle) -> float:
        """The handle's priority; a non-numeric value is a ``TypeError``, NaN a ``ValueError``, naming the handle."""
        value = handle.metadata.get("priority", self.default_priority)
        return self.check_priority(value, f"metadata['priority'] of handle {handle.handle_id}")

    def _sort_key(self, handle: KVHandle, now: float, index: int) -> _SortKey:
        try:
            priority = self.priority_of(handle)
        except (TypeError, ValueError) as exc:
            _log.warning("priority eviction: %s; ordered with the default priority %d", exc, self.default_priority)
            priority = float(self.default_priority)
        return (priority, handle.last_access, handle.created_at)

    def __repr__(self) -> str:
        return f"PriorityEviction(default_priority={self.default_priority})"


_SUPPORTED = (EvictionPolicy.LRU, EvictionPolicy.LFU, EvictionPolicy.FIFO, EvictionPolicy.TTL, EvictionPolicy.PRIORITY,
              EvictionPolicy.LIFETIME_AWARE)


class EvictionManager:
    """Holds the active strategy so a pool or scheduler can switch policy at run time."""

    def __init__(
        self,
        policy: EvictionPolicy = EvictionPolicy.LRU,
        ttl_seconds: float = 300.0,
        default_priority: int = 0,
    ) -> None:
        # Validate the parameters up front, so a bad TTL fails here rather than on a later set_policy.
        self._ttl = TTLEviction(ttl_seconds)
        self._priority = PriorityEviction(default_priority)
        self.ttl_seconds = self._ttl.ttl_seconds
        self.default_priority = self._priority.default_priority
        self._strategy: EvictionStrategy = self._make(policy)
        self._policy = EvictionPolicy(policy)

    @property
    def policy(self) -> EvictionPolicy:
        """The policy asked for (``LIFETIME_AWARE`` orders as LRU, see :meth:`set_policy`)."""
        return self._policy

    @property
    def strategy(self) -> EvictionStrategy:
        return self._strategy

    def select_victims(
        self,
        handles: Iterable[KVHandle],
        num_tokens_needed: int,
        max_victims: int | None = None,
    ) -> list[KVHandle]:
        """Victims chosen by the active strategy; see :meth:`EvictionStrategy.select_victim`."""
        return self._strategy.select_victim(handles, num_tokens_needed, max_victims)

    def set_policy(self, policy: EvictionPolicy) -> None:
        """Switches strategy; an unknown policy is a ``ValueError`` and changes nothing.

        ``LIFETIME_AWARE`` is taken and orders as LRU, as in the original package (which also took
        ``LFU`` as LRU; here LFU is its own strategy): no lifetime predictor feeds eviction.
        """
        self._strategy = self._make(policy)
        self._policy = EvictionPolicy(policy)

    def _make(self, policy: EvictionPolicy | str) -> EvictionStrategy:
        try:
            resolved = EvictionPolicy(policy)
        except ValueError:
            raise ValueError(
                f"unknown eviction policy {policy!r}; supported: {', '.join(p.value for p in _SUPPORTED)}"
            ) from None
        if resolved in (EvictionPolicy.LRU, EvictionPolicy.LIFETIME_AWARE):
            return LRUEviction()
        if resolved == EvictionPolicy.LFU:
            return LFUEviction()
        if resolved == EvictionPolicy.FIFO:
            return FIFOEviction()
        if resolved == EvictionPolicy.TTL:
            return self._ttl
        if resolved == EvictionPolicy.PRIORITY:
            return self._priority
        raise ValueError(
            f"eviction policy {resolved.value!r} is not supported by EvictionManager; "
            f"supported: {', '.join(p.value for p in _SUPPORTED)}"
        )

    def __repr__(self) -> str:
        return f"EvictionManager(policy={self.policy.value})"
