"""MetricsCollector, MetricsHook and the Prometheus exporter (scraped over real HTTP)."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from sagellm_kv_cache.observability import MetricsCollector, MetricsHook
from sagellm_kv_cache.observability import prometheus as prom_module
from sagellm_kv_cache.observability.prometheus import PrometheusExporter

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def collector() -> MetricsCollector:
    return MetricsCollector(trace_id="t-1", request_id="r-1", engine_id="e-1")


# --- MetricsCollector ---------------------------------------------------------------------------


def test_counters_gauges_and_defaults() -> None:
    c = collector()
    assert c.get_counter("nothing") == 0
    assert c.get_gauge("nothing") == 0.0
    c.inc("hits")
    c.inc("hits", 4)
    c.set_gauge("ratio", 0.25)
    c.set_gauge("ratio", 0.5)
    assert c.get_counter("hits") == 5
    assert c.get_gauge("ratio") == 0.5


def test_mark_records_wall_clock_time() -> None:
    c = collector()
    c.mark("prefill_start")
    stamp = c.get_timestamp("prefill_start")
    assert stamp is not None and stamp > 1e9
    assert c.get_timestamp("never") is None


def test_to_dict_and_json_round_trip() -> None:
    c = collector()
    c.inc("alloc_count", 2)
    c.set_gauge("util", 0.75)
    c.mark("done")
    data = c.to_dict()
    assert data["trace_id"] == "t-1" and data["request_id"] == "r-1" and data["engine_id"] == "e-1"
    assert data["counters"] == {"alloc_count": 2}
    assert data["gauges"] == {"util": 0.75}
    assert set(data["timestamps"]) == {"done_at"}  # the seed names events <event>_at
    assert json.loads(c.to_json()) == data
    assert c.to_json(indent=4).startswith("{\n    ")
    data["counters"]["alloc_count"] = 99  # a snapshot, not a view
    assert c.get_counter("alloc_count") == 2


@pytest.mark.parametrize(("first", "second"), [("x", "x_at"), ("x_at", "x")])
def test_events_reported_under_one_key_are_refused(first: str, second: str) -> None:
    """to_dict merged mark("x") and mark("x_at") into one "x_at" key: one of the two times was lost."""
    c = collector()
    c.mark(first)
    before = c.marks
    with pytest.raises(ValueError, match=f"event '{second}' would be reported as 'x_at'.*'{first}'"):
        c.mark(second)
    assert c.marks == before and list(c.to_dict()["timestamps"]) == ["x_at"]
    c.mark(first)  # marking the same event again still overwrites it
    c.mark("y_at")  # a name ending in _at with no twin keeps its name
    assert set(c.to_dict()["timestamps"]) == {"x_at", "y_at"}
    c.reset()
    c.mark(second)
    assert set(c.to_dict()["timestamps"]) == {"x_at"}


def test_reset_keeps_ids() -> None:
    c = collector()
    c.inc("x")
    c.set_gauge("y", 1.0)
    c.mark("z")
    c.reset()
    assert c.to_dict() == {
        "trace_id": "t-1",
        "request_id": "r-1",
        "engine_id": "e-1",
        "timestamps": {},
        "kv_metrics": {},
        "counters": {},
        "gauges": {},
    }


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.inc("x", -1), ValueError),
        (lambda c: c.inc("x", 1.5), TypeError),
        (lambda c: c.inc("", 1), ValueError),
        (lambda c: c.inc(3, 1), TypeError),
        (lambda c: c.set_gauge("g", float("nan")), ValueError),
        (lambda c: c.set_gauge("g", "1"), TypeError),
        (lambda c: c.mark(None), TypeError),
    ],
)
def test_bad_input_is_typed_and_changes_nothing(call: Any, error: type[Exception]) -> None:
    c = collector()
    c.inc("x", 3)
    c.set_gauge("g", 2.0)
    before = c.to_dict()
    with pytest.raises(error):
        call(c)
    assert c.to_dict() == before


def test_counters_are_thread_safe() -> None:
    c = collector()

    def work() -> None:
        for _ in range(5000):
            c.inc("n")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get_counter("n") == 40_000


# --- MetricsHook --------------------------------------------------------------------------------


def test_hooks_update_counters() -> None:
    c = collector()
    hook = MetricsHook()
    hook.on_alloc(c, num_tokens=128, num_blocks=8)
    hook.on_alloc(c, num_tokens=32, num_blocks=2, handle="ignored extra context")
    hook.on_free(c, num_tokens=32, num_blocks=2)
    hook.on_hit(c, num_tokens=48, num_blocks=3)
    hook.on_miss(c, num_tokens=16, num_blocks=1)
    hook.on_evict(c, num_victims=2, num_tokens=64, num_blocks=4)
    hook.on_transfer(c, num_bytes=4096, latency_ms=1.5)
    hook.on_transfer(c, num_bytes=4096, success=False)
    expected = {
        "alloc_count": 2,
        "allocated_tokens": 160,
        "allocated_blocks": 10,
        "total_allocated_tokens": 160,
        "free_count": 1,
        "freed_tokens": 32,
        "freed_blocks": 2,
        "total_freed_tokens": 32,
        "prefix_hits": 1,
        "hit_tokens": 48,
        "hit_blocks": 3,
        "hit_count": 1,
        "prefix_misses": 1,
        "miss_tokens": 16,
        "miss_blocks": 1,
        "miss_count": 1,
        "evict_count": 1,
        "evicted_handles": 2,
        "evicted_tokens": 64,
        "evicted_blocks": 4,
        "transfer_count": 2,
        "transfer_bytes": 4096,
        "transfer_failures": 1,
    }
    assert c.to_dict()["counters"] == expected
    assert c.get_gauge("prefix_hit_ratio") == pytest.approx(48 / 64)
    assert c.get_gauge("last_transfer_latency_ms") == 1.5


def test_hit_ratio_is_never_left_stale_by_concurrent_hooks() -> None:
    """The ratio was computed from two counter reads and set after them: a thread preempted in between
    set an older ratio after a newer one (about 1 race in 250 here), and it stayed."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    hook = MetricsHook()
    try:
        for _ in range(1500):
            c = MetricsCollector("t", "r", "e")
            start = threading.Barrier(4)

            def work(k: int, c: MetricsCollector = c, start: threading.Barrier = start) -> None:
                start.wait()
                for _ in range(3):
                    (hook.on_hit if k % 2 else hook.on_miss)(c, num_tokens=1 + k)

            threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            hit, miss = c.get_counter("hit_tokens"), c.get_counter("miss_tokens")
            assert c.get_gauge("prefix_hit_ratio") == hit / (hit + miss)
    finally:
        sys.setswitchinterval(old_interval)


def test_hooks_without_numbers_count_events() -> None:
    c = collector()
    MetricsHook().on_evict(c)
    assert c.get_counter("evict_count") == 1 and c.get_counter("evicted_handles") == 1


@pytest.mark.parametrize(
    ("hook", "kwargs", "error"),
    [
        ("on_alloc", {"num_tokens": -1}, ValueError),
        ("on_alloc", {"num_tokens": 8, "num_blocks": "2"}, TypeError),
        ("on_hit", {"num_tokens": 2.5}, TypeError),
        ("on_transfer", {"num_bytes": 10, "latency_ms": -3.0}, ValueError),
        ("on_transfer", {"num_bytes": 10, "latency_ms": "fast"}, TypeError),
        ("on_transfer", {"num_bytes": 10, "success": "yes"}, TypeError),
    ],
)
def test_bad_hook_arguments_change_nothing(hook: str, kwargs: dict[str, Any], error: type[Exception]) -> None:
    c = collector()
    with pytest.raises(error):
        getattr(MetricsHook(), hook)(c, **kwargs)
    assert c.to_dict()["counters"] == {} and c.to_dict()["gauges"] == {}


# --- Prometheus exporter ------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class FakePool:
    def __init__(self) -> None:
        self.free = 30

    def stats(self) -> dict[str, int]:
        return {"total_blocks": 100, "free_blocks": self.free, "block_bytes": 4096}


def make_exporter() -> tuple[PrometheusExporter, FakePool]:
    exporter = PrometheusExporter()
    pool = FakePool()
    exporter.add_pool_source(pool.stats, name="gpu0")
    exporter.add_prefix_source(lambda: {"queried_tokens": 400, "hit_tokens": 300, "evictions": 7, "cached_blocks": 12})
    return exporter, pool


def test_render_reads_sources_at_scrape_time() -> None:
    exporter, pool = make_exporter()
    exporter.observe_transfer(1 << 20, 0.003)
    s = samples(exporter.render().decode())
    pool_label = (("pool", "gpu0"),)
    assert s[("sagellm_kv_pool_total_blocks", pool_label)] == 100
    assert s[("sagellm_kv_pool_free_blocks", pool_label)] == 30
    assert s[("sagellm_kv_pool_used_blocks", pool_label)] == 70
    assert s[("sagellm_kv_pool_used_bytes", pool_label)] == 70 * 4096
    assert s[("sagellm_kv_pool_free_bytes", pool_label)] == 30 * 4096
    cache_label = (("cache", "default"),)
    assert s[("sagellm_kv_prefix_cache_queried_tokens_total", cache_label)] == 400
    assert s[("sagellm_kv_prefix_cache_hit_tokens_total", cache_label)] == 300
    assert s[("sagellm_kv_prefix_cache_hit_ratio", cache_label)] == 0.75
    assert s[("sagellm_kv_prefix_cache_evictions_total", cache_label)] == 7
    assert s[("sagellm_kv_prefix_cache_blocks", cache_label)] == 12
    assert s[("sagellm_kv_transfer_bytes_total", ())] == 1 << 20
    assert s[("sagellm_kv_transfer_latency_seconds_count", ())] == 1
    assert s[("sagellm_kv_transfer_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("sagellm_kv_transfer_latency_seconds_bucket", (("le", "0.0025"),))] == 0
    pool.free = 90
    assert samples(exporter.render().decode())[("sagellm_kv_pool_used_blocks", pool_label)] == 10


def test_exporters_use_private_registries() -> None:
    first, _ = make_exporter()
    second, _ = make_exporter()  # the same metric names again: would collide in the global registry
    assert first.registry is not second.registry
    assert first.registry is not prometheus_client.REGISTRY
    first.observe_transfer(10, 0.1)
    assert samples(second.render().decode())[("sagellm_kv_transfer_bytes_total", ())] == 0


def test_broken_source_is_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    exporter, _ = make_exporter()
    exporter.add_pool_source(lambda: {"total_blocks": 1}, name="broken")

    def boom() -> dict[str, int]:
        raise RuntimeError("pool gone")

    exporter.add_prefix_source(boom, name="gone")
    exporter.render()
    s = samples(exporter.render().decode())
    assert s[("sagellm_kv_pool_total_blocks", (("pool", "gpu0"),))] == 100
    assert ("sagellm_kv_pool_total_blocks", (("pool", "broken"),)) not in s
    assert s[("sagellm_kv_exporter_source_errors_total", (("kind", "pool"), ("source", "broken")))] == 2
    assert s[("sagellm_kv_exporter_source_errors_total", (("kind", "prefix"), ("source", "gone")))] == 2
    assert any("pool gone" in record.getMessage() for record in caplog.records)


def test_removed_sources_take_their_error_series_with_them() -> None:
    exporter, _ = make_exporter()

    def boom() -> dict[str, int]:
        raise RuntimeError("worker gone")

    for i in range(300):  # sources that come and go, as workers of a long-running server do
        exporter.add_pool_source(boom, name=f"worker{i}")
        exporter.add_prefix_source(boom, name=f"worker{i}")
        exporter.render()
        exporter.remove_pool_source(f"worker{i}")
        exporter.remove_prefix_source(f"worker{i}")
    assert exporter._source_error_counts() == {}
    assert not [k for k in samples(exporter.render().decode()) if k[0] == "sagellm_kv_exporter_source_errors_total"]


def test_a_source_removed_during_a_scrape_leaves_no_error_series() -> None:
    """The scrape reads a snapshot of the sources; one removed meanwhile that then fails (its worker shut
    down) was counted after its removal, and its error series was exported forever."""
    exporter, _ = make_exporter()

    def closing(kind: str) -> Callable[[], dict[str, int]]:
        def source() -> dict[str, int]:
            (exporter.remove_pool_source if kind == "pool" else exporter.remove_prefix_source)("worker")
            raise RuntimeError("worker closed")
        return source

    exporter.add_pool_source(closing("pool"), name="worker")
    exporter.add_prefix_source(closing("prefix"), name="worker")
    text = exporter.render().decode()
    assert exporter._source_error_counts() == {}
    assert not [k for k in samples(text) if k[0] == "sagellm_kv_exporter_source_errors_total"]


def test_source_validation() -> None:
    exporter, _ = make_exporter()
    with pytest.raises(ValueError, match="already registered"):
        exporter.add_pool_source(lambda: {}, name="gpu0")
    with pytest.raises(TypeError, match="callable"):
        exporter.add_pool_source(42, name="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        exporter.add_prefix_source(lambda: {}, name="")
    with pytest.raises(KeyError):
        exporter.remove_pool_source("nope")
    exporter.remove_pool_source("gpu0")
    assert ("sagellm_kv_pool_total_blocks", (("pool", "gpu0"),)) not in samples(exporter.render().decode())


@pytest.mark.parametrize(("nbytes", "seconds"), [(-1, 0.1), (10, -0.5), (10, float("inf")), (1.5, 0.1), (10, "1")])
def test_bad_transfer_observation_changes_nothing(nbytes: Any, seconds: Any) -> None:
    exporter, _ = make_exporter()
    with pytest.raises(ValueError):
        exporter.observe_transfer(nbytes, seconds)
    assert samples(exporter.render().decode())[("sagellm_kv_transfer_latency_seconds_count", ())] == 0


@pytest.mark.parametrize("namespace", ["bad-name", "", "9lives", "métrique", "ª", "kv\n"])
def test_bad_namespace(namespace: str) -> None:
    # Non-ASCII letters passed str.isalnum(): the exposition then served "m_trique_*" (or "__*" for
    # "ª" and "ǅ" alike, colliding), not the names the operator configured.
    with pytest.raises(ValueError, match="namespace must be a Prometheus identifier"):
        PrometheusExporter(namespace=namespace)


def test_bad_namespace_type() -> None:
    with pytest.raises(TypeError, match="namespace must be a str, got int"):  # was an AttributeError
        PrometheusExporter(namespace=5)  # type: ignore[arg-type]


def test_http_scrape_on_loopback() -> None:
    exporter, pool = make_exporter()
    exporter.observe_transfer(2048, 0.02)
    with exporter:
        server = exporter.start(0)
        port = exporter.port
        assert port is not None and port > 0 and server.server_port == port
        with pytest.raises(RuntimeError, match="already serving"):
            exporter.start(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            body = response.read().decode()
        s = samples(body)
        assert s[("sagellm_kv_pool_used_blocks", (("pool", "gpu0"),))] == 70
        assert s[("sagellm_kv_transfer_bytes_total", ())] == 2048
        pool.free = 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert samples(response.read().decode())[("sagellm_kv_pool_used_blocks", (("pool", "gpu0"),))] == 100
    assert exporter.port is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    exporter.stop()  # idempotent


def test_an_exporter_dropped_without_stop_stops_serving_and_frees_its_port() -> None:
    # The server's registry held the exporter (through the collector that reads its sources): one
    # dropped while started was never collected, and kept its server thread and its port for good.
    import gc
    import socket
    import weakref

    def serving() -> int:
        return sum(1 for t in threading.enumerate() if t.is_alive() and "serve_forever" in t.name)

    before = serving()
    exporter, _ = make_exporter()
    exporter.start(0)
    port = exporter.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
    gone = weakref.ref(exporter)
    del exporter
    gc.collect()
    assert gone() is None
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and serving() > before:
        time.sleep(0.02)
    assert serving() == before
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.create_server(("127.0.0.1", port)):  # the port is free again
        pass


def test_bad_port() -> None:
    exporter, _ = make_exporter()
    with pytest.raises(ValueError, match="port"):
        exporter.start(70000)


@pytest.mark.parametrize(("addr", "error", "match"), [
    ("", ValueError, "addr '' is not an address to serve on"),  # was socket.gaierror 'Name or service not known'
    (5, TypeError, "addr must be a host name or IP address"),  # was getaddrinfo()'s TypeError
])
def test_bad_address_is_named(addr: Any, error: type[Exception], match: str) -> None:
    exporter, _ = make_exporter()
    with pytest.raises(error, match=match):
        exporter.start(0, addr=addr)
    assert exporter.port is None
    exporter.start(0)  # nothing was left half-started
    with urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5) as response:
        assert ("sagellm_kv_pool_total_blocks", (("pool", "gpu0"),)) in samples(response.read().decode())
    exporter.stop()


def test_missing_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prom_module, "_IMPORT_ERROR", ImportError("No module named 'prometheus_client'"))
    with pytest.raises(ImportError, match=r"isagellm-kv-cache\[metrics\]"):
        PrometheusExporter()


def test_seed_repr() -> None:
    c = MetricsCollector("t", "r", "e")
    c.inc("a")
    c.mark("b")
    assert repr(c) == "MetricsCollector(trace_id='t', request_id='r', engine_id='e', marks=1, counters=1, gauges=0)"
