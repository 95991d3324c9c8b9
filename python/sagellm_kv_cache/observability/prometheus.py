"""Prometheus exporter for the pool and prefix-cache gauges and the transfer path.

Pool and cache numbers live in the C++ core; copying them into Prometheus metrics on every change
would put Python on the hot path. Instead the exporter holds *sources*, callables that return a
dict of the current numbers, and reads them at scrape time through a custom collector. Transfers
are pushed (:meth:`PrometheusExporter.observe_transfer`) because latency is a distribution.

The exporter owns its :class:`prometheus_client.CollectorRegistry`, so several exporters (tests,
several engines in one process) never collide in the global registry.

Exposed metrics (``<ns>`` is the namespace, ``sagellm_kv`` by default)::

    <ns>_pool_{total,free,used}_blocks{pool}       gauge
    <ns>_pool_{total,free,used}_bytes{pool}        gauge
    <ns>_prefix_cache_queried_tokens_total{cache}  counter
    <ns>_prefix_cache_hit_tokens_total{cache}      counter
    <ns>_prefix_cache_hit_ratio{cache}             gauge (hit / queried tokens, 0 before any query)
    <ns>_prefix_cache_evictions_total{cache}       counter
    <ns>_prefix_cache_blocks{cache}                gauge (only when the source reports cached_blocks)
    <ns>_transfer_bytes_total                      counter
    <ns>_transfer_latency_seconds                  histogram
    <ns>_exporter_source_errors_total{kind,source} counter (a source that raised or returned bad data)
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from sagellm_kv_cache._numbers import is_finite_number, shown

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - exercised by monkeypatching _IMPORT_ERROR
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

__all__ = ["DEFAULT_LATENCY_BUCKETS", "PoolSource", "PrefixSource", "PrometheusExporter"]

_log = logging.getLogger(__name__)

# Prometheus metric names are ASCII: a letter or an underscore, then letters, digits, underscores (colons
# are for recording rules). str.isalnum() would also pass "é" or "ª", which the exposition escapes to "_".
_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

PoolSource = Callable[[], Mapping[str, Any]]
"""Returns ``{"total_blocks": int, "free_blocks": int, "block_bytes": int}`` (``used_blocks`` optional)."""

PrefixSource = Callable[[], Mapping[str, Any]]
"""Returns cumulative ``{"queried_tokens": int, "hit_tokens": int, "evictions": int}``
(``cached_blocks`` optional)."""

# Transfers of a few blocks over shared memory take tens of microseconds; pool regions over a
# network take seconds.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def _require_prometheus() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError(
            "the Prometheus exporter needs prometheus-client: pip install isagellm-kv-cache[metrics]"
        ) from _IMPORT_ERROR


def _non_negative_int(data: Mapping[str, Any], key: str) -> int:
    if not isinstance(data, Mapping):
        raise TypeError(f"source must return a dict, returned {type(data).__name__}")
    if key not in data:
        raise KeyError(f"source result lacks {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an int >= 0, got {value!r}")
    return value


def _stop_serving(serving: list[tuple[Any, threading.Thread]]) -> None:
    """An exporter dropped without stop(): shuts its server down from a thread of its own, since
    ``shutdown`` waits for the serving loop and the collection may run on that loop's thread."""
    for server, thread in serving:
        threading.Thread(target=_shut_server, args=(server, thread), name="kv-prometheus-stop", daemon=True).start()
    serving.clear()


def _shut_server(server: Any, thread: threading.Thread | None) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=5.0)


class _SourceCollector:
    """Reads the exporter's sources at scrape time; a broken source is skipped and counted.

    Holds the exporter weakly (and strongly only during a scrape): the server reaches this collector
    through the registry, so a strong link would keep a dropped exporter, and its server, alive."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._ref = weakref.ref(exporter)
        self._namespace = exporter.namespace

    def describe(self) -> Iterable[Metric]:
        # Names only (no samples), so registering does not call the sources.
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        exporter = self._ref()
        if exporter is None:  # a scrape that raced the exporter's collection: nothing to read
            return
        yield from self._collect(exporter)

    def _collect(self, exporter: PrometheusExporter) -> Iterator[Metric]:
        families = self._families()
        pools, caches = exporter._snapshot_sources()
        for name, source in pools:
            try:
                data = source()
                total = _non_negative_int(data, "total_blocks")
                free = _non_negative_int(data, "free_blocks")
                block_bytes = _non_negative_int(data, "block_bytes")
                used = _non_negative_int(data, "used_blocks") if "used_blocks" in data else total - free
                if free > total or used < 0:
                    raise ValueError(f"free_blocks={free} exceeds total_blocks={total}")
            except Exception as err:
                exporter._source_failed("pool", name, source, err)
                continue
            for key, value in (("total", total), ("free", free), ("used", used)):
                families[f"pool_{key}_blocks"].add_metric([name], value)
                families[f"pool_{key}_bytes"].add_metric([name], value * block_bytes)
        for name, source in caches:
            try:
                data = source()
                queried = _non_negative_int(data, "queried_tokens")
                hits = _non_negative_int(data, "hit_tokens")
                evictions = _non_negative_int(data, "evictions")
                cached = _non_negative_int(data, "cached_blocks") if "cached_blocks" in data else None
                if hits > queried:
                    raise ValueError(f"hit_tokens={hits} exceeds queried_tokens={queried}")
            except Exception as err:
                exporter._source_failed("prefix", name, source, err)
                continue
            families["prefix_cache_queried_tokens"].add_metric([name], queried)
            families["prefix_cache_hit_tokens"].add_metric([name], hits)
            families["prefix_cache_hit_ratio"].add_metric([name], hits / queried if queried else 0.0)
            families["prefix_cache_evictions"].add_metric([name], evictions)
            if cached is not None:
                families["prefix_cache_blocks"].add_metric([name], cached)
        # Counted here, after reading the sources, so a scrape reports its own failures.
        for (kind, name), count in exporter._source_error_counts().items():
            families["exporter_source_errors"].add_metric([kind, name], count)
        yield from families.values()

    def _families(self) -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        ns = self._namespace
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for key in ("total", "free", "used"):
            fams[f"pool_{key}_blocks"] = GaugeMetricFamily(
                f"{ns}_pool_{key}_blocks", f"KV pool blocks ({key})", labels=["pool"]
            )
            fams[f"pool_{key}_bytes"] = GaugeMetricFamily(
                f"{ns}_pool_{key}_bytes", f"KV pool bytes ({key})", labels=["pool"]
            )
        fams["prefix_cache_queried_tokens"] = CounterMetricFamily(
            f"{ns}_prefix_cache_queried_tokens", "Tokens looked up in the prefix cache", labels=["cache"]
        )
        fams["prefix_cache_hit_tokens"] = CounterMetricFamily(
            f"{ns}_prefix_cache_hit_tokens", "Tokens served from the prefix cache", labels=["cache"]
        )
        fams["prefix_cache_hit_ratio"] = GaugeMetricFamily(
            f"{ns}_prefix_cache_hit_ratio", "Hit tokens / queried tokens since start", labels=["cache"]
        )
        fams["prefix_cache_evictions"] = CounterMetricFamily(
            f"{ns}_prefix_cache_evictions", "Blocks evicted from the prefix cache", labels=["cache"]
        )
        fams["prefix_cache_blocks"] = GaugeMetricFamily(
            f"{ns}_prefix_cache_blocks", "Blocks held by the prefix cache", labels=["cache"]
        )
        fams["exporter_source_errors"] = CounterMetricFamily(
            f"{ns}_exporter_source_errors",
            "Scrapes at which a source raised or returned invalid data",
            labels=["kind", "source"],
        )
        return fams


class PrometheusExporter:
    """Serves pool, prefix-cache and transfer metrics from its own registry.

    One dropped while serving, without :meth:`stop`, stops serving when it is collected (its server
    thread ends and its port is freed), as :meth:`stop` would have done."""

    def __init__(
        self,
        namespace: str = "sagellm_kv",
        latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS,
    ) -> None:
        _require_prometheus()
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        if _NAMESPACE.fullmatch(namespace) is None:
            raise ValueError(f"namespace must be a Prometheus identifier, got {namespace!r}")
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._pool_sources: dict[str, PoolSource] = {}
        self._prefix_sources: dict[str, PrefixSource] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None
        # The server and its thread while serving, for the finaliser: one dropped without stop() kept
        # its thread and its port for the rest of the process.
        self._serving: list[tuple[Any, threading.Thread]] = []
        self._finalizer = weakref.finalize(self, _stop_serving, self._serving)
        self._finalizer.atexit = False  # the daemon thread and its socket end with the process
        self._transfer_bytes = Counter(
            f"{namespace}_transfer_bytes", "Bytes of KV moved by completed transfers", registry=self.registry
        )
        self._transfer_latency = Histogram(
            f"{namespace}_transfer_latency_seconds",
            "Latency of KV transfers",
            buckets=latency_buckets,
            registry=self.registry,
        )
        self._source_errors: dict[tuple[str, str], int] = {}
        self.registry.register(_SourceCollector(self))

    # --- sources ------------------------------------------------------------------------------

    def add_pool_source(self, source: PoolSource, name: str = "default") -> None:
        """Adds a pool read at every scrape; ``name`` becomes the ``pool`` label and must be unique."""
        self._add(self._pool_sources, "pool", source, name)

    def add_prefix_source(self, source: PrefixSource, name: str = "default") -> None:
        """Adds a prefix cache read at every scrape; ``name`` becomes the ``cache`` label."""
        self._add(self._prefix_sources, "prefix", source, name)

    def remove_pool_source(self, name: str) -> None:
        """Removes a pool source, and its ``exporter_source_errors`` series with it."""
        self._remove(self._pool_sources, "pool", name)

    def remove_prefix_source(self, name: str) -> None:
        """Removes a prefix source, and its ``exporter_source_errors`` series with it."""
        self._remove(self._prefix_sources, "prefix", name)

    def _add(self, table: dict[str, Any], kind: str, source: Callable[[], Any], name: str) -> None:
        if not callable(source):
            raise TypeError(f"{kind} source must be callable, got {type(source).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{kind} source name must be a non-empty str, got {name!r}")
        with self._lock:
            if name in table:
                raise ValueError(f"a {kind} source named {name!r} is already registered")
            table[name] = source

    def _remove(self, table: dict[str, Any], kind: str, name: str) -> None:
        with self._lock:
            if name not in table:
                raise KeyError(f"no {kind} source named {name!r}")
            del table[name]
            # A gone source's error series would otherwise be exported forever: sources that come
            # and go (one per worker or model) would grow the table and every scrape without bound.
            self._source_errors.pop((kind, name), None)

    def _snapshot_sources(self) -> tuple[list[tuple[str, PoolSource]], list[tuple[str, PrefixSource]]]:
        with self._lock:
            return list(self._pool_sources.items()), list(self._prefix_sources.items())

    def _source_failed(self, kind: str, name: str, source: Callable[[], Any], err: Exception) -> None:
        with self._lock:
            # A source removed while this scrape was reading it (a worker shutting down, whose source
            # then fails) is not counted: its series would come back after the removal, for good.
            if (self._pool_sources if kind == "pool" else self._prefix_sources).get(name) is not source:
                return
            count = self._source_errors.get((kind, name), 0) + 1
            self._source_errors[(kind, name)] = count
        # Warn once per source: a broken source fails at every scrape and would flood the log.
        level = logging.WARNING if count == 1 else logging.DEBUG
        _log.log(level, "%s source %r failed at scrape (%d times so far): %s", kind, name, count, err)

    def _source_error_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._source_errors)

    # --- transfers ----------------------------------------------------------------------------

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        """Records one completed transfer of ``nbytes`` bytes that took ``seconds``."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        if not is_finite_number(seconds):
            raise ValueError(f"seconds must be a finite number, got {shown(seconds)}")
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self._transfer_bytes.inc(nbytes)
        self._transfer_latency.observe(float(seconds))

    # --- exposition ---------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what a scrape returns)."""
        return generate_latest(self.registry)

    def start(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serves ``/metrics`` over HTTP on a daemon thread; ``port=0`` picks a free port.

        Binds to loopback by default: metrics reveal traffic patterns, so exposing them to the
        network is the operator's explicit choice. Returns the WSGI server (``server_port`` tells
        the port).
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535, got {port!r}")
        if not isinstance(addr, str):
            raise TypeError(f"addr must be a host name or IP address (str), got {type(addr).__name__}")
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"exporter already serving on port {self._server.server_port}")
            try:
                result = start_http_server(port, addr=addr, registry=self.registry)
            except socket.gaierror as err:  # names neither the address nor the call
                raise ValueError(f"addr {addr!r} is not an address to serve on: {err.strerror}") from err
            if not isinstance(result, tuple):  # prometheus-client < 0.20 returns None
                raise RuntimeError("PrometheusExporter.start needs prometheus-client >= 0.20")
            self._server, self._thread = result
            self._serving.append(result)
            return self._server

    @property
    def port(self) -> int | None:
        """The port being served, or None when not started."""
        server = self._server
        return None if server is None else int(server.server_port)

    def stop(self) -> None:
        """Stops the HTTP server and closes its socket; does nothing when not started."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server, self._thread = None, None
            self._serving.clear()
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> PrometheusExporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
