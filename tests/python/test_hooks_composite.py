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
