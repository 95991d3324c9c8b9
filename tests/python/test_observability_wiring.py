"""Observability wiring: prefix-cache hooks, access stats, Prometheus sources over HTTP, KV events."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sagellm_kv_cache import (
    AccessStatsCollector,
    KVCacheManager,
    KVCacheSpec,
    MetricsCollector,
    MetricsHook,
    PagedKVPool,
    RadixPrefixCache,
)
from sagellm_kv_cache.observability import publish_prefix_events, register_prometheus_sources
from sagellm_kv_cache.observability.wiring import digest_labels
from sagellm_kv_cache.pool import KVPool


def make_pool(num_blocks: int = 64) -> PagedKVPool:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="fp16", block_size=4)
    return PagedKVPool(spec, num_blocks)


def prompt(*values: int) -> np.ndarray:
    return np.array([v + 1000 * k for v in values for k in range(4)], dtype=np.int64)


def fill(cache: RadixPrefixCache, pool: PagedKVPool | None, *values: int) -> np.ndarray:
    """Caches the prompt's blocks the way a scheduler does (allocate, insert, drop the caller's refs)."""
    tokens = prompt(*values)
    digests = cache.hash_tokens(tokens)
    hit, _ = cache.peek(digests)
    if hit < len(digests):
        ids = pool.allocate(len(digests) - hit) if pool is not None else np.arange(
            100 * values[0] + hit, 100 * values[0] + len(digests), dtype=np.int32)
        # Routers re-hash the tokens of a stored block, so the events carry them.
        cache.insert(digests[hit:], ids, parent=digests[hit - 1] if hit else None, token_ids=tokens[4 * hit :])
        if pool is not None:
            pool.free(ids)
    return digests


def collector() -> MetricsCollector:
    return MetricsCollector("trace", "request", "engine")


# --- hooks ---------------------------------------------------------------------------------------


def test_no_hooks_means_no_observer() -> None:
    assert RadixPrefixCache(block_size=4)._observer is None


def test_metrics_hook_counts_lookups_and_evictions() -> None:
    metrics = collector()
    pool = make_pool()
    cache = RadixPrefixCache(block_size=4, capacity_blocks=5, pool=pool, metrics_collector=metrics)
    fill(cache, pool, 1, 2, 3)
    digests = cache.hash_tokens(prompt(1, 2, 9, 9, 9))
    hit, _ = cache.match(digests)  # 2 blocks hit, 3 miss
    cache.release(digests[:hit])
    counters = metrics.to_dict()["counters"]
    assert (counters["prefix_hits"], counters["hit_blocks"], counters["hit_tokens"]) == (1, 2, 8)
    assert (counters["prefix_misses"], counters["miss_blocks"], counters["miss_tokens"]) == (1, 3, 12)
    assert metrics.get_gauge("prefix_hit_ratio") == pytest.approx(0.4)

    n, _, d = cache.match_tokens(prompt(7))  # a full miss through the one-call path
    assert n == 0 and metrics.get_counter("prefix_misses") == 2
    cache.peek(d)  # peeking is not a lookup
    assert metrics.get_counter("prefix_misses") == 2
    cache.match([])  # an empty lookup counts nothing
    assert metrics.get_counter("prefix_hits") + metrics.get_counter("prefix_misses") == 3

    fill(cache, pool, 4, 5, 6)  # 3 + 3 > capacity 5: one capacity eviction inside insert
    assert metrics.get_counter("evicted_blocks") == 1
    assert cache.evict(2) == 2
    counters = metrics.to_dict()["counters"]
    assert counters["evicted_blocks"] == 3 and counters["evicted_tokens"] == 12 and counters["evict_count"] == 2
    assert cache.stats()["evictions"] == 3


def test_custom_hook_and_validation() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    class Recording(MetricsHook):
        def on_hit(self, collector: MetricsCollector, **kwargs: Any) -> None:
            calls.append(("hit", kwargs))

        def on_miss(self, collector: MetricsCollector, **kwargs: Any) -> None:
            calls.append(("miss", kwargs))

    cache = RadixPrefixCache(block_size=4, metrics_collector=collector(), metrics_hook=Recording())
    fill(cache, None, 1)
    cache.release(cache.hash_tokens(prompt(1))[: cache.match(cache.hash_tokens(prompt(1, 2)))[0]])
    assert calls == [("hit", {"num_tokens": 4, "num_blocks": 1}), ("miss", {"num_tokens": 4, "num_blocks": 1})]

    with pytest.raises(ValueError, match="metrics_hook needs a metrics_collector"):
        RadixPrefixCache(block_size=4, metrics_hook=MetricsHook())
    with pytest.raises(TypeError, match="metrics_collector"):
        RadixPrefixCache(block_size=4, metrics_collector={})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="access_stats"):
        RadixPrefixCache(block_size=4, access_stats=object())  # type: ignore[arg-type]


def test_access_stats_record_each_queried_block(tmp_path: Path) -> None:
    stats = AccessStatsCollector()
    cache = RadixPrefixCache(block_size=4, access_stats=stats)
    fill(cache, None, 1, 2)
    digests = cache.hash_tokens(prompt(1, 2, 3))
    hit, _ = cache.match(digests)
    cache.release(digests[:hit])
    hit, _ = cache.match(digests[:1])
    cache.release(digests[:hit])
    labels = [d.tobytes().hex()[:16] for d in digests]
    assert digest_labels(digests) == labels == digest_labels([d.tobytes() for d in digests])
    summary = stats.get_stats_summary()
    assert (summary["cache_hits"], summary["cache_misses"], summary["unique_blocks"]) == (3, 1, 3)
    assert stats.get_top_blocks(1) == [(labels[0], 2)]
    assert len(stats.get_access_intervals(labels[0])) == 1
    stats.export_stats(tmp_path / "access.json")
    exported = json.loads((tmp_path / "access.json").read_text())
    assert set(exported["block_details"]) == set(labels)


def test_manager_feeds_collector_and_access_stats() -> None:
    metrics, stats = collector(), AccessStatsCollector()
    manager = KVCacheManager(256, 4, metrics_collector=metrics, access_stats=stats)
    handle = manager.alloc(16)
    manager.register_prefix(prompt(1, 2, 3, 4), handle)
    assert manager.query_prefix(prompt(1, 2, 8))[1] == 8
    manager.free(handle)
    counters = metrics.to_dict()["counters"]
    assert counters["alloc_count"] == counters["free_count"] == 1
    assert counters["allocated_blocks"] == counters["freed_blocks"] == 4
    assert (counters["hit_blocks"], counters["miss_blocks"]) == (2, 1)
    assert stats.get_hit_rate() == pytest.approx(2 / 3)


# --- Prometheus ----------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_scrape_of_pool_cache_and_manager_over_http() -> None:
    pytest.importorskip("prometheus_client")
    from sagellm_kv_cache import PrometheusExporter

    pool = make_pool(32)
    cache = RadixPrefixCache(block_size=4, pool=pool)
    manager = KVCacheManager(1024, 16, bytes_per_token=8)
    seed_pool = KVPool(512, 16, bytes_per_token=4)
    with PrometheusExporter(namespace="kvtest") as exporter:
        register_prometheus_sources(exporter, pool=pool, prefix_cache=cache, name="engine0")
        register_prometheus_sources(exporter, pool=manager, prefix_cache=manager, name="manager")
        register_prometheus_sources(exporter, pool=seed_pool, name="seed")
        exporter.start(0, addr="127.0.0.1")
        assert exporter.port is not None

        fill(cache, pool, 1, 2, 3)
        digests = cache.hash_tokens(prompt(1, 2, 5, 6))
        hit, _ = cache.match(digests)
        handle = manager.alloc(100)
        manager.register_prefix(list(range(64)), handle)
        manager.query_prefix(list(range(80)))
        seed_pool.alloc(40)

        values = scrape(exporter.port)
        engine, mgr, seed = (("pool", "engine0"),), (("pool", "manager"),), (("pool", "seed"),)
        assert values[("kvtest_pool_used_blocks", engine)] == 3
        assert values[("kvtest_pool_free_blocks", engine)] == 29
        assert values[("kvtest_pool_used_bytes", engine)] == 3 * pool.block_nbytes
        cache_label = (("cache", "engine0"),)
        assert values[("kvtest_prefix_cache_queried_tokens_total", cache_label)] == 16
        assert values[("kvtest_prefix_cache_hit_tokens_total", cache_label)] == 8
        assert values[("kvtest_prefix_cache_hit_ratio", cache_label)] == 0.5
        assert values[("kvtest_prefix_cache_blocks", cache_label)] == 3
        assert values[("kvtest_pool_used_blocks", mgr)] == 7
        assert values[("kvtest_pool_total_bytes", mgr)] == 64 * 16 * 8
        assert values[("kvtest_prefix_cache_hit_tokens_total", (("cache", "manager"),))] == 64
        assert values[("kvtest_pool_used_blocks", seed)] == 3
        assert values[("kvtest_pool_used_bytes", seed)] == 3 * 16 * 4
        assert not any(name == "kvtest_exporter_source_errors_total" for name, _ in values)

        cache.release(digests[:hit])
        assert cache.evict(10) == 3
        values = scrape(exporter.port)
        assert values[("kvtest_pool_used_blocks", engine)] == 0
        assert values[("kvtest_prefix_cache_evictions_total", cache_label)] == 3


def test_register_sources_validates_before_registering() -> None:
    pytest.importorskip("prometheus_client")
    from sagellm_kv_cache import PrometheusExporter

    exporter = PrometheusExporter(namespace="kvcheck")
    cache = RadixPrefixCache(block_size=4)
    with pytest.raises(ValueError, match="needs a pool"):
        register_prometheus_sources(exporter)
    with pytest.raises(TypeError, match="pool must be"):
        register_prometheus_sources(exporter, pool="pool", prefix_cache=cache, name="x")
    with pytest.raises(TypeError, match="prefix_cache must be"):
        register_prometheus_sources(exporter, pool=make_pool(), prefix_cache=object(), name="x")
    exporter.add_prefix_source(cache.stats, "taken")
    with pytest.raises(ValueError, match="already registered"):
        register_prometheus_sources(exporter, pool=make_pool(), prefix_cache=cache, name="taken")
    text = exporter.render().decode()
    assert 'pool="x"' not in text and 'pool="taken"' not in text  # nothing half-registered
    register_prometheus_sources(exporter, pool=make_pool(), name="taken")  # the name is still free for a pool


# --- KV events -----------------------------------------------------------------------------------

SUBSCRIBER = textwrap.dedent(
    """
    import json, sys
    from sagellm_kv_cache.observability.events import DigestSetTracker, KVEventSubscriber

    tracker = DigestSetTracker()
    with KVEventSubscriber(sys.argv[1], sys.argv[2]) as sub:
        batch = None
        while batch is None:
            batch = sub.receive(100)
        tracker.apply(*batch)
        print("SYNCED", flush=True)
        last = int(sys.stdin.readline())
        while tracker.last_seq < last:
            batch = sub.receive(20_000)
            if batch is None:
                break
            tracker.apply(*batch)
    print(json.dumps({"digests": sorted(tracker.block_hashes), "missed": tracker.missed_batches,
                      "consistent": tracker.consistent}), flush=True)
    """
)


def test_nothing_is_published_without_events() -> None:
    pytest.importorskip("zmq")
    from sagellm_kv_cache import KVEventPublisher

    with KVEventPublisher("tcp://127.0.0.1:*") as publisher:
        cache = RadixPrefixCache(block_size=4)  # events off
        fill(cache, None, 1)
        assert publish_prefix_events(cache, publisher) == 0 and publisher.next_seq == 0
        with pytest.raises(TypeError, match="RadixPrefixCache"):
            publish_prefix_events(object(), publisher)


def test_a_closed_publisher_leaves_the_events_queued() -> None:
    pytest.importorskip("zmq")
    from sagellm_kv_cache import KVEventPublisher

    cache = RadixPrefixCache(block_size=4, event_queue_capacity=64)
    fill(cache, None, 1)
    closed = KVEventPublisher("tcp://127.0.0.1:*")
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        publish_prefix_events(cache, closed)
    with KVEventPublisher("tcp://127.0.0.1:*") as publisher:  # the events went nowhere: the next one sends them
        assert publish_prefix_events(cache, publisher) > 0 and publisher.next_seq == 1


@pytest.mark.multiprocess
def test_events_reach_a_subscriber_in_another_process(tmp_path: Path) -> None:
    pytest.importorskip("zmq")
    from sagellm_kv_cache import KVEventPublisher
    from sagellm_kv_cache.observability.events import wire_block_id

    script = tmp_path / "subscriber.py"
    script.write_text(SUBSCRIBER)
    pool = make_pool(64)
    cache = RadixPrefixCache(block_size=4, capacity_blocks=8, pool=pool, event_queue_capacity=1024)
    with KVEventPublisher("tcp://127.0.0.1:*", topic="wiring") as publisher:
        child = subprocess.Popen([sys.executable, str(script), publisher.endpoint, "wiring"], cwd=tmp_path,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None
            first: list[str] = []
            reader = threading.Thread(target=lambda: first.append(child.stdout.readline()))  # type: ignore[union-attr]
            reader.start()
            deadline = time.monotonic() + 30
            while reader.is_alive() and time.monotonic() < deadline:
                publisher.publish([])  # until the subscription has propagated (ZMQ's slow joiner)
                time.sleep(0.02)
            reader.join(timeout=1)
            assert first and first[0].startswith("SYNCED"), child.stderr.read() if child.stderr else ""

            rng = np.random.default_rng(3)
            seen: list[np.ndarray] = []
            sent = 0
            for step in range(40):
                values = [int(v) for v in rng.integers(0, 4, size=int(rng.integers(1, 5)))]
                seen.append(fill(cache, pool, *values))  # capacity 8: evictions produce removed events
                if step == 25:
                    cache.clear()
                if step % 3 == 0:
                    sent += publish_prefix_events(cache, publisher)
            sent += publish_prefix_events(cache, publisher)
            assert sent > 0 and cache.drain_events() == []
            child.stdin.write(f"{publisher.next_seq - 1}\n")
            child.stdin.flush()
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    expected = sorted({wire_block_id(d.tobytes()) for digests in seen for d in digests if cache.contains(d)})
    assert result == {"digests": expected, "missed": 0, "consistent": True}
    assert len(expected) == len(cache) > 0
