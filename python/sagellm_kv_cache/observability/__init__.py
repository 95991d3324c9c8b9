"""Observability: per-request metrics and hooks, a Prometheus exporter, a KV-event publisher.

``MetricsCollector`` and ``MetricsHook`` need nothing beyond the standard library. The exporter
(``prometheus-client``, extra ``metrics``) and the event publisher (``pyzmq`` + ``msgpack``, extra
``events``) are loaded on first access, so importing this package never needs the optional extras.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sagellm_kv_cache.observability.hooks import MetricsHook
from sagellm_kv_cache.observability.metrics import MetricsCollector

if TYPE_CHECKING:
    from sagellm_kv_cache.observability.events import KVEventPublisher, KVEventSubscriber
    from sagellm_kv_cache.observability.prometheus import PrometheusExporter
    from sagellm_kv_cache.observability.wiring import (
        PrefixCacheObserver,
        publish_prefix_events,
        register_prometheus_sources,
    )

__all__ = [
    "KVEventPublisher",
    "KVEventSubscriber",
    "MetricsCollector",
    "MetricsHook",
    "PrefixCacheObserver",
    "PrometheusExporter",
    "publish_prefix_events",
    "register_prometheus_sources",
]

_LAZY = {
    "PrometheusExporter": "sagellm_kv_cache.observability.prometheus",
    "KVEventPublisher": "sagellm_kv_cache.observability.events",
    "KVEventSubscriber": "sagellm_kv_cache.observability.events",
    "PrefixCacheObserver": "sagellm_kv_cache.observability.wiring",
    "register_prometheus_sources": "sagellm_kv_cache.observability.wiring",
    "publish_prefix_events": "sagellm_kv_cache.observability.wiring",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
