"""AccessStatsCollector's seed attributes and the 0.5.4 additions: windows, cold blocks, histograms,
heatmap, block lifetimes. Times are driven through a fake monotonic clock, so nothing sleeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sagellm_kv_cache.profiling import TIME_WINDOWS, AccessStatsCollector
from sagellm_kv_cache.profiling import access_stats as module


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(module.time, "perf_counter", fake)
    return fake


def scripted(clock: Clock) -> AccessStatsCollector:
    """c at t=0..3 (4 accesses), a at t=100, 150, 195, b at t=170; now is t=200."""
    c = AccessStatsCollector()
    for t, block in [(0, "c"), (1, "c"), (2, "c"), (3, "c"), (100, "a"), (150, "a"), (170, "b"), (195, "a")]:
        clock.now = 1000.0 + t
        c.record_access(block, is_hit=block != "b")
    clock.now = 1200.0
    return c


def test_seed_attributes(clock: Clock) -> None:
    c = scripted(clock)
    assert (c.total_accesses, c.cache_hits, c.cache_misses) == (8, 7, 1)
    assert c.access_count == {"c": 4, "a": 3, "b": 1}
    times = c.access_times
    assert [t - c.start_time for t in times["a"]] == pytest.approx([100, 150, 195])
    times["a"].append(0.0)  # a copy: the collector is unchanged
    assert len(c.access_times["a"]) == 3


def test_windows(clock: Clock) -> None:
    c = scripted(clock)
    assert c.get_window_stats(60) == {
        "window_s": 60, "total_accesses": 3, "unique_blocks": 2,
        "top_blocks": [{"block_id": "a", "access_count": 2}, {"block_id": "b", "access_count": 1}],
    }
    assert c.get_window_stats(150)["total_accesses"] == 4
    assert c.get_window_stats(0)["total_accesses"] == 0
    every = c.get_all_window_stats()
    assert list(every) == list(TIME_WINDOWS) == ["1min", "5min", "1h"]
    assert every["5min"]["total_accesses"] == 8 and every["1min"]["window_s"] == 60.0


def test_cold_blocks(clock: Clock) -> None:
    c = scripted(clock)
    assert c.get_cold_blocks(20) == [("c", pytest.approx(197)), ("b", pytest.approx(30))]
    assert [b for b, _ in c.get_cold_blocks()] == ["c"]


def test_frequency_histogram(clock: Clock) -> None:
    c = scripted(clock)
    assert c.get_frequency_histogram(3) == [
        {"range_low": 1.0, "range_high": 2.0, "count": 1},
        {"range_low": 2.0, "range_high": 3.0, "count": 0},
        {"range_low": 3.0, "range_high": 4.0, "count": 2},
    ]
    same = AccessStatsCollector()
    same.record_access("x")
    same.record_access("y")
    assert [h["count"] for h in same.get_frequency_histogram(4)] == [2, 0, 0, 0]
    assert AccessStatsCollector().get_frequency_histogram() == []


def test_heatmap(clock: Clock) -> None:
    c = scripted(clock)
    heat = c.get_heatmap_data(4)
    assert heat["block_heatmap"] == {"c": [4, 0, 0, 0], "a": [0, 0, 1, 2], "b": [0, 0, 0, 1]}
    starts = [t - c.start_time for t in heat["time_bins"]]
    assert starts == pytest.approx([0, 48.75, 97.5, 146.25])
    assert AccessStatsCollector().get_heatmap_data() == {"time_bins": [], "block_heatmap": {}}


def test_lifetimes(clock: Clock) -> None:
    c = AccessStatsCollector()
    assert c.get_lifecycle_distribution() == {"count": 0, "min_s": None, "max_s": None, "mean_s": None,
                                              "histogram": []}
    for block, start, end in [("p", 0, 0.5), ("q", 1, 3), ("r", 2, 27), ("s", 3, 10)]:
        clock.now = 1000.0 + start
        c.record_alloc(block)
        clock.now = 1000.0 + end
        c.record_free(block)
    c.record_alloc("still-alive")
    c.record_free("never-allocated")
    life = c.get_lifecycle_distribution()
    assert (life["count"], life["min_s"], life["max_s"], life["mean_s"]) == (4, 0.5, 25.0, 8.625)
    assert [h["count"] for h in life["histogram"]] == [2, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert life["histogram"][0]["range_high"] == pytest.approx(2.95)
    c.reset()
    assert c.get_lifecycle_distribution()["count"] == 0


def test_export_carries_the_new_sections(clock: Clock, tmp_path: Path) -> None:
    c = scripted(clock)
    out = tmp_path / "s.json"
    c.export_stats(out)
    data = json.loads(out.read_text())
    assert data["window_stats"]["1min"]["total_accesses"] == 3
    assert data["cold_blocks"] == [["c", pytest.approx(197)]]
    assert len(data["heatmap"]["time_bins"]) == 20
    assert data["frequency_histogram"][0]["range_low"] == 1.0


@pytest.mark.parametrize(
    ("method", "args", "error"),
    [("get_window_stats", (-1,), ValueError), ("get_window_stats", ("60",), TypeError),
     ("get_cold_blocks", (-1.0,), ValueError), ("get_frequency_histogram", (0,), ValueError),
     ("get_heatmap_data", (0,), ValueError), ("get_heatmap_data", (2.5,), TypeError),
     ("record_alloc", ("",), ValueError), ("record_free", (3,), TypeError)],
)
def test_bad_arguments(method: str, args: tuple[object, ...], error: type[Exception]) -> None:
    c = AccessStatsCollector()
    with pytest.raises(error):
        getattr(c, method)(*args)
    assert c.total_accesses == 0 and c.get_lifecycle_distribution()["count"] == 0


def test_heatmap_slots_and_histogram_bins_are_bounded() -> None:
    """time_slots=10**9 built a row of 10**9 counts per block (8 GB each), bins=10**9 as many bins."""
    c = AccessStatsCollector()
    for block in ("a", "b", "a"):
        c.record_access(block)
    for method, name, limit in (("get_heatmap_data", "time_slots", module.MAX_TIME_SLOTS),
                                ("get_frequency_histogram", "bins", module.MAX_HISTOGRAM_BINS)):
        for bad, text in ((limit + 1, str(limit + 1)), (10**9, "1000000000"), (10**5000, "an int of 16610 bits")):
            with pytest.raises(ValueError, match=f"^{name} must be at most {limit}, got {text}"):
                getattr(c, method)(bad)
    assert len(c.get_heatmap_data(module.MAX_TIME_SLOTS)["block_heatmap"]["a"]) == module.MAX_TIME_SLOTS
    assert len(c.get_frequency_histogram(module.MAX_HISTOGRAM_BINS)) == module.MAX_HISTOGRAM_BINS
    assert c.total_accesses == 3


def test_seconds_past_the_float_range_are_a_value_error() -> None:
    """An int past the float range was a bare OverflowError from float()."""
    c = AccessStatsCollector()
    c.record_access("a")
    for method, name in (("get_window_stats", "window_s"), ("get_cold_blocks", "idle_threshold_s")):
        with pytest.raises(ValueError, match=f"^{name} must be a number of seconds a float can hold, got an int of"):
            getattr(c, method)(10**400)
    assert c.get_window_stats(float("inf"))["total_accesses"] == 1
