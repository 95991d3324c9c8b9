"""Wiring the pool and prefix cache into the observability tools without touching their hot paths.

* :class:`PrefixCacheObserver` is what ``RadixPrefixCache(..., metrics_collector=, access_stats=)``
  calls after each match / insert / evict: a :class:`MetricsHook` gets ``on_hit`` / ``on_miss``
  (token and block counts of one lookup) and ``on_evict``; an :class:`AccessStatsCollector` gets one
  access per queried block (hit for the matched ones, miss for the rest), labelled with the first
  16 hex digits of the block's digest. A cache built without them never creates an observer, so its
  calls stay single C++ calls with no per-block Python work.
* :func:`register_prometheus_sources` hands a pool and a prefix cache to a
  :class:`~sagellm_kv_cache.observability.prometheus.PrometheusExporter`; their numbers are read at
  scrape time, never copied on the hot path.
* :func:`publish_prefix_events` drains the cache's stored / removed / cleared events and sends them
  as one batch through a :class:`~sagellm_kv_cache.observability.events.KVEventPublisher`.

Only the standard library and numpy are imported here; prometheus-client and pyzmq stay optional.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from sagellm_kv_cache.observability.hooks import MetricsHook
from sagellm_kv_cache.observability.metrics import MetricsCollector

if TYPE_CHECKING:
    from sagellm_kv_cache.observability.events import KVEventPublisher
    from sagellm_kv_cache.observability.prometheus import PrometheusExporter
    from sagellm_kv_cache.profiling.access_stats import AccessStatsCollector

__all__ = ["DIGEST_LABEL_CHARS", "PrefixCacheObserver", "digest_labels", "publish_prefix_events",
           "register_prometheus_sources"]

DIGEST_LABEL_CHARS = 16
"""Hex digits of a digest used as its block label: 64 bits, unique in practice, short in plots."""


def digest_labels(digests: Any, chars: int = DIGEST_LABEL_CHARS) -> list[str]:
    """Labels (hex prefixes) of an (n, 32) uint8 digest array or a sequence of 32-byte digests."""
    if isinstance(digests, np.ndarray):
        rows = digests.reshape(-1, 32) if digests.size else digests.reshape(0, 32)
        hexed = np.ascontiguousarray(rows).tobytes().hex()
        count = rows.shape[0]
    else:
        hexed = b"".join(bytes(d) for d in digests).hex()
        count = len(hexed) // 64
    return [hexed[i * 64 : i * 64 + chars] for i in range(count)]


class PrefixCacheObserver:
    """Feeds one prefix cache's lookups and evictions to a metrics collector and/or access stats."""

    def __init__(
        self,
        block_size: int,
        metrics_collector: MetricsCollector | None = None,
        metrics_hook: MetricsHook | None = None,
        access_stats: AccessStatsCollector | None = None,
    ) -> None:
        if metrics_collector is not None and not isinstance(metrics_collector, MetricsCollector):
            raise TypeError(f"metrics_collector must be a MetricsCollector or None, "
                            f"got {type(metrics_collector).__name__}")
        if metrics_hook is not None and not isinstance(metrics_hook, MetricsHook):
            raise TypeError(f"metrics_hook must be a MetricsHook or None, got {type(metrics_hook).__name__}")
        if metrics_hook is not None and metrics_collector is None:
            raise ValueError("metrics_hook needs a metrics_collector to write its numbers into")
        if access_stats is not None and not callable(getattr(access_stats, "record_access", None)):
            raise TypeError(f"access_stats must be an AccessStatsCollector or None, got {type(access_stats).__name__}")
        self.block_size = int(block_size)
        self.metrics_collector = metrics_collector
        self.metrics_hook = metrics_hook if metrics_hook is not None or metrics_collector is None else MetricsHook()
        self.access_stats = access_stats

    @classmethod
    def create(
        cls,
        block_size: int,
        metrics_collector: MetricsCollector | None,
        metrics_hook: MetricsHook | None,
        access_stats: AccessStatsCollector | None,
    ) -> PrefixCacheObserver | None:
        """An observer, or None when there is nothing to feed (the cache then skips all of this)."""
        if metrics_collector is None and metrics_hook is None and access_stats is None:
            return None
        return cls(block_size, metrics_collector, metrics_hook, access_stats)

    def matched(self, digests: Any, num_matched: int) -> None:
        """One lookup of ``len(digests)`` blocks whose first ``num_matched`` were cached."""
        total = len(digests)
        if total == 0:
            return
        missed = total - num_matched
        if self.metrics_collector is not None and self.metrics_hook is not None:
            if num_matched:
                self.metrics_hook.on_hit(self.metrics_collector, num_tokens=num_matched * self.block_size,
                                         num_blocks=num_matched)
            if missed:
                self.metrics_hook.on_miss(self.metrics_collector, num_tokens=missed * self.block_size,
                                          num_blocks=missed)
        if self.access_stats is not None:
            record = self.access_stats.record_access
            for index, label in enumerate(digest_labels(digests)):
                record(label, is_hit=index < num_matched)

    def evicted(self, num_blocks: int) -> None:
        """``num_blocks`` nodes left the cache by its eviction policy (capacity or ``evict``)."""
        if num_blocks <= 0 or self.metrics_collector is None or self.metrics_hook is None:
            return
        self.metrics_hook.on_evict(self.metrics_collector, num_victims=num_blocks, num_blocks=num_blocks,
                                   num_tokens=num_blocks * self.block_size)


def _pool_source(pool: Any) -> Callable[[], Mapping[str, Any]]:
    from sagellm_kv_cache.paged import PagedKVPool
    from sagellm_kv_cache.pool.kv_pool import KVPool

    if isinstance(pool, PagedKVPool):
        return pool.stats
    if isinstance(pool, KVPool):
        block_bytes = pool.block_size * pool.bytes_per_token

        def seed_pool_stats() -> Mapping[str, Any]:
            return {**pool.get_block_stats(), "block_bytes": block_bytes}

        return seed_pool_stats
    manager_pool = getattr(pool, "pool", None)  # a KVCacheManager
    if isinstance(manager_pool, KVPool):
        return _pool_source(manager_pool)
    raise TypeError(f"pool must be a PagedKVPool, KVPool or KVCacheManager, got {type(pool).__name__}")


def _prefix_source(cache: Any) -> Callable[[], Mapping[str, Any]]:
    from sagellm_kv_cache.prefix_cache import RadixPrefixCache

    if isinstance(cache, RadixPrefixCache):
        return cache.stats
    inner = getattr(cache, "prefix_cache", None)  # a KVCacheManager
    if isinstance(inner, RadixPrefixCache):
        return inner.stats
    raise TypeError(f"prefix_cache must be a RadixPrefixCache or KVCacheManager, got {type(cache).__name__}")


def register_prometheus_sources(
    exporter: PrometheusExporter,
    *,
    pool: Any = None,
    prefix_cache: Any = None,
    name: str = "default",
) -> None:
    """Registers ``pool`` (PagedKVPool, KVPool or KVCacheManager) and ``prefix_cache``
    (RadixPrefixCache or KVCacheManager) with ``exporter`` under the label ``name``.

    Both are checked before either is registered, so a bad argument registers nothing.
    """
    if pool is None and prefix_cache is None:
        raise ValueError("register_prometheus_sources needs a pool, a prefix_cache or both")
    pool_source = None if pool is None else _pool_source(pool)
    prefix_source = None if prefix_cache is None else _prefix_source(prefix_cache)
    if pool_source is not None:
        exporter.add_pool_source(pool_source, name)
    if prefix_source is not None:
        try:
            exporter.add_prefix_source(prefix_source, name)
        except Exception:
            if pool_source is not None:
                exporter.remove_pool_source(name)
            raise


def publish_prefix_events(cache: Any, publisher: KVEventPublisher) -> int:
    """Drains ``cache``'s events and publishes them as one batch; returns how many were sent.

    Nothing is sent when nothing happened (a router needs no empty batches: sequence numbers only
    advance with content). The cache needs ``event_queue_capacity > 0`` to record events at all.
    A closed publisher is refused (RuntimeError) before the cache is drained, so its events stay
    queued for another publisher; a close waits for a call under way. Safe from several threads: the
    drain and the publish happen under the publisher's drain lock
    (:meth:`~sagellm_kv_cache.observability.events.KVEventPublisher.publish_drained`), so batches go
    out in the order their events happened. Events that cannot be encoded raise, after an
    ``AllBlocksCleared`` batch tells routers to forget what they may have missed.
    """
    drain = getattr(cache, "drain_events", None)
    if drain is None:
        inner = getattr(cache, "prefix_cache", None)  # a KVCacheManager
        drain = getattr(inner, "drain_events", None)
    if drain is None:
        raise TypeError(f"cache must be a RadixPrefixCache or KVCacheManager, got {type(cache).__name__}")
    if publisher.closed:
        raise RuntimeError("KVEventPublisher is closed: the cache's events stay queued")
    return publisher.publish_drained(drain)
