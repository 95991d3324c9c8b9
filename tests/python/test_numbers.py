"""One "finite number" rule (``sagellm_kv_cache._numbers``) at every caller-facing number check that used
``math.isfinite`` or ``float()`` alone: an int past the float range raised a bare OverflowError there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sagellm_kv_cache._numbers import array_of, finite_number, is_finite_number, shown
from sagellm_kv_cache.kv_cache_manager import KVCacheManager
from sagellm_kv_cache.load_metrics import DeviceLoadMetrics
from sagellm_kv_cache.models.kv_handle import KVHandle
from sagellm_kv_cache.observability import MetricsCollector, MetricsHook
from sagellm_kv_cache.predictor.features import PredictorFeatures
from sagellm_kv_cache.predictor.historical import HistoricalPredictor
from sagellm_kv_cache.prefix.fingerprint import AdaptiveHashComputer, FingerprintConfig
from sagellm_kv_cache.prefix_cache import PrefixCache

HUGE = 10**400  # an int past the float range: float() and math.isfinite raise OverflowError
HUGER = 10**5000  # and past the 4300 digits repr() will print


def test_the_rule() -> None:
    assert [is_finite_number(v) for v in (0, -3, 2.5, 2**1023, float("nan"), float("inf"), HUGE, True, "1", None)] \
        == [True, True, True, True, False, False, False, False, False, False]
    assert finite_number("x", 3) == 3.0 and isinstance(finite_number("x", 3), float)
    for bad, text in ((HUGE, "an int of 1329 bits (past the float range)"), (HUGER, "an int of 16610 bits"),
                      (float("nan"), "nan"), (float("-inf"), "-inf")):
        with pytest.raises(ValueError, match=r"^x must be a finite number, got " + text.replace("(", r"\(")
                           .replace(")", r"\)")):
            finite_number("x", bad)
    with pytest.raises(ValueError, match=r"^x must be >= 0, got -1$"):
        finite_number("x", -1, minimum=0)
    for bad in ("1", True, None):
        with pytest.raises(TypeError, match=f"^x must be a number, got {type(bad).__name__}$"):
            finite_number("x", bad)
    assert shown(2.5) == "2.5" and shown(-HUGE) == "an int of 1329 bits (past the float range)"


def _collector() -> MetricsCollector:
    c = MetricsCollector("t", "r", "e")
    c.set_gauge("g", 1.0)
    return c


@pytest.mark.parametrize("bad", [HUGE, -HUGE, HUGER], ids=["huge", "-huge", "huger"])
def test_metrics_collector_gauge(bad: int) -> None:
    c = _collector()
    before = c.to_dict()
    with pytest.raises(ValueError, match="gauge 'g' must be a finite number, got an int of"):
        c.set_gauge("g", bad)
    assert c.to_dict() == before


@pytest.mark.parametrize("bad", [HUGE, HUGER, float("nan"), float("inf")], ids=["huge", "huger", "nan", "inf"])
def test_metrics_hook_transfer_latency(bad: float) -> None:
    """NaN was a TypeError there (ValueError is the convention for a bad value of the right type)."""
    c = _collector()
    before = c.to_dict()
    with pytest.raises(ValueError, match="latency_ms must be a finite number"):
        MetricsHook().on_transfer(c, num_bytes=10, latency_ms=bad)
    assert c.to_dict() == before
    with pytest.raises(ValueError, match="latency_ms must be >= 0, got -1"):
        MetricsHook().on_transfer(c, num_bytes=10, latency_ms=-1)
    with pytest.raises(TypeError, match="latency_ms must be a number, got str"):
        MetricsHook().on_transfer(c, num_bytes=10, latency_ms="fast")


@pytest.mark.parametrize("bad", [HUGE, HUGER], ids=["huge", "huger"])
def test_prometheus_exporter_transfer_seconds(bad: int) -> None:
    pytest.importorskip("prometheus_client")
    from sagellm_kv_cache.observability.prometheus import PrometheusExporter

    exporter = PrometheusExporter()
    before = exporter.render()
    with pytest.raises(ValueError, match="seconds must be a finite number, got an int of"):
        exporter.observe_transfer(10, bad)
    assert exporter.render() == before


@pytest.mark.parametrize("call", [
    lambda m: m.update_memory_usage(HUGE),
    lambda m: m.update_wait_time(1.0, HUGE),
    lambda m: m.update_wait_time(HUGER, 1.0),
], ids=["memory", "max", "avg"])
def test_device_load_metrics(call: Callable[[DeviceLoadMetrics], Any]) -> None:
    m = DeviceLoadMetrics.create("cuda:0", kv_tokens_capacity=100)
    before = m.model_dump()
    with pytest.raises(ValueError, match=r"(memory_used_mb|max_ms|avg_ms) must be a finite number, got an int of"):
        call(m)
    assert m.model_dump() == before
    with pytest.raises(ValueError, match="memory_capacity_mb must be a finite number"):
        DeviceLoadMetrics.create("cuda:0", memory_capacity_mb=HUGE)


@pytest.mark.parametrize("name", ["alpha", "default_reuse_prob", "default_lifetime"])
def test_historical_predictor_configuration(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be .*got an int of 1329 bits"):
        HistoricalPredictor(**{name: HUGE})


def test_historical_predictor_update() -> None:
    predictor = HistoricalPredictor()
    before = predictor.get_statistics()
    for bad in (HUGE, HUGER):
        with pytest.raises(ValueError, match="actual_lifetime must be a finite number of seconds >= 0, got an int"):
            predictor.update(PredictorFeatures.from_handle(KVHandle.create(8, session_id="s")), bad)
    assert predictor.get_statistics() == before


@pytest.mark.parametrize("call", [
    lambda t: KVCacheManager(1024, 16).query_prefix(t),
    lambda t: KVCacheManager(1024, 16).get_reused_blocks(t),
    lambda t: PrefixCache(block_size=4).compute_block_hashes(t),
    lambda t: AdaptiveHashComputer(FingerprintConfig()).compute(t),
], ids=["query_prefix", "get_reused_blocks", "compute_block_hashes", "fingerprint"])
def test_token_tensors_numpy_cannot_read_are_type_errors(call: Callable[[Any], Any]) -> None:
    """A tensor numpy cannot view (one that requires grad) raised torch's RuntimeError out of
    ``np.asarray`` where token ids are read through numpy; now a TypeError naming the argument."""
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"tokens must be a flat sequence of (ints|token ids), got Tensor \(Can't call"):
        call(torch.zeros(8, requires_grad=True))


def test_array_of_names_the_refusal() -> None:
    with pytest.raises(TypeError, match=r"ids must be integers, got list \(.*inhomogeneous"):
        array_of("ids", [[1, 2], [3]], "integers")
    assert array_of("ids", (1, 2)).tolist() == [1, 2]
