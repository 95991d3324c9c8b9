"""The seed's hook helpers: MetricsHookProtocol, CompositeHook, create_callback_hook."""

from __future__ import annotations

from typing import Any

import pytest
from sagellm_kv_cache.observability.hooks import (
    CompositeHook,
    MetricsHook,
    MetricsHookProtocol,
    create_callback_hook,
)
from sagellm_kv_cache.observability.metrics import MetricsCollector


def collector() -> MetricsCollector:
    return MetricsCollector("trace", "req", "engine")


def test_callback_hook_counts_then_calls_back() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    hook = create_callback_hook(on_alloc=lambda c, **kw: seen.append(("alloc", kw)),
                                on_transfer=lambda c, **kw: seen.append(("transfer", kw)))
    assert isinstance(hook, MetricsHook) and isinstance(hook, MetricsHookProtocol)
    c = collector()
    hook.on_alloc(c, num_tokens=128)
    hook.on_hit(c, num_tokens=16)  # no callback: the default counting only
    hook.on_transfer(c, num_bytes=10)
    assert seen == [("alloc", {"num_tokens": 128}), ("transfer", {"num_bytes": 10})]
    plain = collector()
    MetricsHook().on_alloc(plain, num_tokens=128)
    assert c.get_counter("alloc_count") == plain.get_counter("alloc_count") == 1
    with pytest.raises(TypeError, match="on_free must be callable"):
        create_callback_hook(on_free=42)  # type: ignore[arg-type]


def test_composite_calls_every_hook_in_order() -> None:
    order: list[str] = []
    first = create_callback_hook(on_evict=lambda c, **kw: order.append("first"))
    second = create_callback_hook(on_evict=lambda c, **kw: order.append("second"))
    composite = CompositeHook([first, second])
    c = collector()
    composite.on_evict(c, num_victims=1)
    assert order == ["first", "second"]
    assert c.get_counter("evict_count") == 2  # both MetricsHooks counted
    for event in ("on_alloc", "on_free", "on_hit", "on_miss", "on_transfer"):
        getattr(composite, event)(c)
    assert c.get_counter("alloc_count") == 2 and c.get_counter("transfer_count") == 2


def test_composite_propagates_errors_and_checks_hooks() -> None:
    class Failing(MetricsHook):
        def on_alloc(self, collector: MetricsCollector, **kwargs: Any) -> None:
            raise RuntimeError("hook broke")

    after = MetricsHook()
    c = collector()
    with pytest.raises(RuntimeError, match="hook broke"):
        CompositeHook([Failing(), after]).on_alloc(c, num_tokens=1)
    assert c.get_counter("alloc_count") == 0
    with pytest.raises(TypeError, match="lacks on_alloc"):
        CompositeHook([object()])  # type: ignore[list-item]


def test_seed_counter_names_timestamps_and_kv_metrics() -> None:
    hook = MetricsHook()
    c = collector()
    hook.on_alloc(c, num_tokens=128)
    hook.on_free(c, num_tokens=64)
    hook.on_hit(c, hit_len=512, reuse_bytes=2048)
    hook.on_miss(c)
    hook.on_evict(c)
    hook.on_transfer(c, num_bytes=4096, latency_ms=2.5)
    data = c.to_dict()
    assert list(data) == ["trace_id", "request_id", "engine_id", "timestamps", "kv_metrics", "counters", "gauges"]
    assert set(data["timestamps"]) == {"alloc_at", "free_at", "cache_hit_at", "cache_miss_at", "eviction_at",
                                       "transfer_complete_at"}
    counters = data["counters"]
    assert (counters["total_allocated_tokens"], counters["total_freed_tokens"], counters["hit_count"],
            counters["total_reuse_bytes"], counters["miss_count"], counters["transfer_count"]) == \
        (128, 64, 1, 2048, 1, 1)
    assert counters["hit_tokens"] == 512  # hit_len counts as the hit's tokens
    assert data["kv_metrics"] == {"hit_len": 512.0, "reuse_bytes": 2048.0, "transfer_latency": 2.5, "hit_count": 1,
                                  "miss_count": 1, "evict_count": 1}
    assert c.marks.keys() == {"alloc", "free", "cache_hit", "cache_miss", "eviction", "transfer_complete"}
    assert c.counters == counters and c.gauges == data["gauges"]
    with pytest.raises(ValueError, match="hit_len"):
        hook.on_hit(c, hit_len=-1)
    assert c.get_counter("hit_count") == 1
