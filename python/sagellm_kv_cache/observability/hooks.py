"""Hooks that turn pool, prefix-cache and transfer events into :class:`MetricsCollector` numbers.

The call sites pass what they know as keyword arguments; unknown keywords are ignored (so a call
site may pass extra context such as ``handle=``), known ones are checked before anything is counted,
so a bad call changes nothing.

==============  ==========================================  ===============================================
hook            keywords read                               counters (gauges)
==============  ==========================================  ===============================================
``on_alloc``    ``num_tokens``, ``num_blocks``              ``alloc_count``, ``allocated_tokens``,
                                                            ``allocated_blocks``
``on_free``     ``num_tokens``, ``num_blocks``              ``free_count``, ``freed_tokens``, ``freed_blocks``
``on_hit``      ``num_tokens``, ``num_blocks``              ``prefix_hits``, ``hit_tokens``, ``hit_blocks``
                                                            (``prefix_hit_ratio``)
``on_miss``     ``num_tokens``, ``num_blocks``              ``prefix_misses``, ``miss_tokens``,
                                                            ``miss_blocks`` (``prefix_hit_ratio``)
``on_evict``    ``num_victims`` (default 1), ``num_tokens``,  ``evict_count``, ``evicted_handles``,
                ``num_blocks``                              ``evicted_tokens``, ``evicted_blocks``
``on_transfer`` ``num_bytes``, ``latency_ms``,              ``transfer_count``, ``transfer_bytes``,
                ``success`` (default True)                  ``transfer_failures``
                                                            (``last_transfer_latency_ms``)
==============  ==========================================  ===============================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from sagellm_kv_cache._numbers import finite_number
from sagellm_kv_cache.observability.metrics import MetricsCollector

__all__ = ["CompositeHook", "MetricsHook", "MetricsHookProtocol", "create_callback_hook"]


def _count(kwargs: dict[str, Any], key: str, default: int = 0) -> int:
    value = kwargs.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value}")
    return value


class MetricsHook:
    """Stateless: every number lives in the collector passed to each call."""

    def on_alloc(self, collector: MetricsCollector, **kwargs: Any) -> None:
        tokens, blocks = _count(kwargs, "num_tokens"), _count(kwargs, "num_blocks")
        collector.inc("alloc_count")
        collector.inc("allocated_tokens", tokens)
        collector.inc("allocated_blocks", blocks)
        collector.inc("total_allocated_tokens", tokens)  # the seed's name
        collector.mark("alloc")

    def on_free(self, collector: MetricsCollector, **kwargs: Any) -> None:
        tokens, blocks = _count(kwargs, "num_tokens"), _count(kwargs, "num_blocks")
        collector.inc("free_count")
        collector.inc("freed_tokens", tokens)
        collector.inc("freed_blocks", blocks)
        collector.inc("total_freed_tokens", tokens)  # the seed's name
        collector.mark("free")

    def on_hit(self, collector: MetricsCollector, **kwargs: Any) -> None:
        hit_len = _count(kwargs, "hit_len") if "hit_len" in kwargs else None
        # The seed's call sites pass hit_len (tokens reused) rather than num_tokens.
        tokens, blocks = _count(kwargs, "num_tokens", hit_len or 0), _count(kwargs, "num_blocks")
        reuse = _count(kwargs, "reuse_bytes") if "reuse_bytes" in kwargs else None
        collector.inc("prefix_hits")
        collector.inc("hit_tokens", tokens)
        collector.inc("hit_blocks", blocks)
        collector.inc("hit_count")  # the seed's counters and gauges
        if hit_len is not None:
            collector.set_gauge("hit_len", hit_len)
        if reuse is not None:
            collector.inc("total_reuse_bytes", reuse)
            collector.set_gauge("reuse_bytes", reuse)
        collector.mark("cache_hit")
        self._update_hit_ratio(collector)

    def on_miss(self, collector: MetricsCollector, **kwargs: Any) -> None:
        tokens, blocks = _count(kwargs, "num_tokens"), _count(kwargs, "num_blocks")
        collector.inc("prefix_misses")
        collector.inc("miss_tokens", tokens)
        collector.inc("miss_blocks", blocks)
        collector.inc("miss_count")  # the seed's name
        collector.mark("cache_miss")
        self._update_hit_ratio(collector)

    def on_evict(self, collector: MetricsCollector, **kwargs: Any) -> None:
        victims = _count(kwargs, "num_victims", 1)
        tokens, blocks = _count(kwargs, "num_tokens"), _count(kwargs, "num_blocks")
        collector.inc("evict_count")
        collector.inc("evicted_handles", victims)
        collector.inc("evicted_tokens", tokens)
        collector.inc("evicted_blocks", blocks)
        collector.mark("eviction")

    def on_transfer(self, collector: MetricsCollector, **kwargs: Any) -> None:
        nbytes = _count(kwargs, "num_bytes")
        latency = kwargs.get("latency_ms")
        if latency is not None:
            latency = finite_number("latency_ms", latency, minimum=0)
        success = kwargs.get("success", True)
        if not isinstance(success, bool):
            raise TypeError(f"success must be a bool, got {type(success).__name__}")
        collector.inc("transfer_count")
        if success:
            collector.inc("transfer_bytes", nbytes)
        else:
            collector.inc("transfer_failures")
        if latency is not None:
            collector.set_gauge("last_transfer_latency_ms", float(latency))
            collector.set_gauge("transfer_latency", float(latency))  # the seed's name
        collector.mark("transfer_complete")

    @staticmethod
    def _update_hit_ratio(collector: MetricsCollector) -> None:
        # Token-weighted: a hit on a long prefix saves more prefill work than a hit on a short one.
        collector._set_ratio("prefix_hit_ratio", "hit_tokens", "miss_tokens")


@runtime_checkable
class MetricsHookProtocol(Protocol):
    """What a hook provides: one method per event, each taking the collector and keywords."""

    def on_alloc(self, collector: MetricsCollector, **kwargs: Any) -> None: ...
    def on_free(self, collector: MetricsCollector, **kwargs: Any) -> None: ...
    def on_hit(self, collector: MetricsCollector, **kwargs: Any) -> None: ...
    def on_miss(self, collector: MetricsCollector, **kwargs: Any) -> None: ...
    def on_evict(self, collector: MetricsCollector, **kwargs: Any) -> None: ...
    def on_transfer(self, collector: MetricsCollector, **kwargs: Any) -> None: ...


_EVENTS = ("on_alloc", "on_free", "on_hit", "on_miss", "on_evict", "on_transfer")


class CompositeHook:
    """Calls several hooks in order for every event; the first hook that raises stops the rest."""

    def __init__(self, hooks: list[MetricsHookProtocol]) -> None:
        hooks = list(hooks)
        for i, hook in enumerate(hooks):
            missing = [name for name in _EVENTS if not callable(getattr(hook, name, None))]
            if missing:
                raise TypeError(f"hooks[{i}] ({type(hook).__name__}) lacks {', '.join(missing)}")
        self.hooks = hooks

    def on_alloc(self, collector: MetricsCollector, **kwargs: Any) -> None:
        for hook in self.hooks:
            hook.on_alloc(collector, **kwargs)

    def on_free(self, collector: MetricsCollector, **kwargs: Any) -> None:
        for hook in self.hooks:
            hook.on_free(collector, **kwargs)

    def on_hit(self, collector: MetricsCollector, **kwargs: Any) -> None:
        for hook in self.hooks:
            hook.on_hit(collector, **kwargs)

    def on_miss(self, collector: MetricsCollector, **kwargs: Any) -> None:
        for hook in self.hooks:
            hook.on_miss(collector, **kwargs)

    def on_evict(self, collector: MetricsCollector, **kwargs: Any) -> None:
        for hook in self.hooks:
            hook.on_evict(collector, **kwargs)

    def on_transfer(self, collector: MetricsCollector, **kwargs: Any) -> None:
        for hook in self.hooks:
            hook.on_transfer(collector, **kwargs)


Callback = Callable[..., None]


def create_callback_hook(
    on_alloc: Callback | None = None,
    on_free: Callback | None = None,
    on_hit: Callback | None = None,
    on_miss: Callback | None = None,
    on_evict: Callback | None = None,
    on_transfer: Callback | None = None,
) -> MetricsHook:
    """A :class:`MetricsHook` that, after its own counting, calls ``callback(collector, **kwargs)``."""
    callbacks = {"on_alloc": on_alloc, "on_free": on_free, "on_hit": on_hit, "on_miss": on_miss,
                 "on_evict": on_evict, "on_transfer": on_transfer}
    for name, callback in callbacks.items():
        if callback is not None and not callable(callback):
            raise TypeError(f"{name} must be callable(collector, **kwargs), got {type(callback).__name__}")

    class CallbackHook(MetricsHook):
        def on_alloc(self, collector: MetricsCollector, **kwargs: Any) -> None:
            super().on_alloc(collector, **kwargs)
            if on_alloc is not None:
                on_alloc(collector, **kwargs)

        def on_free(self, collector: MetricsCollector, **kwargs: Any) -> None:
            super().on_free(collector, **kwargs)
            if on_free is not None:
                on_free(collector, **kwargs)

        def on_hit(self, collector: MetricsCollector, **kwargs: Any) -> None:
            super().on_hit(collector, **kwargs)
            if on_hit is not None:
                on_hit(collector, **kwargs)

        def on_miss(self, collector: MetricsCollector, **kwargs: Any) -> None:
            super().on_miss(collector, **kwargs)
            if on_miss is not None:
                on_miss(collector, **kwargs)

        def on_evict(self, collector: MetricsCollector, **kwargs: Any) -> None:
            super().on_evict(collector, **kwargs)
            if on_evict is not None:
                on_evict(collector, **kwargs)

        def on_transfer(self, collector: MetricsCollector, **kwargs: Any) -> None:
            super().on_transfer(collector, **kwargs)
            if on_transfer is not None:
                on_transfer(collector, **kwargs)

    return CallbackHook()
