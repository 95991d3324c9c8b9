"""AccessStatsCollector and the plotting functions."""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sagellm_kv_cache.profiling import AccessStatsCollector
from sagellm_kv_cache.profiling.visualize import (
    PLOT_TYPES,
    StatsFileError,
    format_summary,
    load_stats,
    validate_stats,
    visualize,
)

SUMMARY_KEYS = {
    "average_access_interval",
    "cache_hits",
    "cache_misses",
    "duration_seconds",
    "frequency_histogram",
    "hit_rate",
    "lifecycle_distribution",
    "top_10_blocks",
    "total_accesses",
    "unique_blocks",
}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def filled() -> AccessStatsCollector:
    c = AccessStatsCollector()
    for block, hit in [("a", False), ("b", False), ("a", True), ("c", False), ("a", True), ("b", True)]:
        c.record_access(block, is_hit=hit)
        time.sleep(0.001)
    return c


# --- collector ---------------------------------------------------------------------------------


def test_empty_collector() -> None:
    c = AccessStatsCollector()
    assert c.get_hit_rate() == 0.0
    assert c.get_top_blocks() == []
    assert c.get_all_intervals() == []
    assert c.get_access_intervals("x") == []
    summary = c.get_stats_summary()
    assert set(summary) == SUMMARY_KEYS
    assert summary["total_accesses"] == 0 and summary["duration_seconds"] == 0.0


def test_counts_hit_rate_and_top_blocks() -> None:
    c = filled()
    assert c.get_hit_rate() == pytest.approx(3 / 6)
    assert c.get_top_blocks(2) == [("a", 3), ("b", 2)]
    assert c.get_top_blocks(0) == []
    assert len(c) == 3
    summary = c.get_stats_summary()
    assert set(summary) == SUMMARY_KEYS
    assert summary["total_accesses"] == 6
    assert summary["unique_blocks"] == 3
    assert (summary["cache_hits"], summary["cache_misses"]) == (3, 3)
    assert summary["top_10_blocks"] == [
        {"block_id": "a", "access_count": 3},
        {"block_id": "b", "access_count": 2},
        {"block_id": "c", "access_count": 1},
    ]
    assert summary["duration_seconds"] >= 0.005


def test_ties_go_to_first_seen_block() -> None:
    c = AccessStatsCollector()
    for block in ["z", "y", "x"]:
        c.record_access(block)
    assert [block for block, _ in c.get_top_blocks()] == ["z", "y", "x"]


def test_intervals_are_positive_and_consistent() -> None:
    c = filled()
    a = c.get_access_intervals("a")
    assert len(a) == 2 and all(gap > 0 for gap in a)
    assert len(c.get_access_intervals("c")) == 0
    everything = c.get_all_intervals()
    assert len(everything) == 3  # 2 for a, 1 for b
    assert c.get_stats_summary()["average_access_interval"] == pytest.approx(sum(everything) / 3)


def test_export_shape(tmp_path: Path) -> None:
    c = filled()
    out = tmp_path / "stats.json"
    c.export_stats(out)
    data = json.loads(out.read_text())
    assert set(data) == SUMMARY_KEYS | {"access_intervals", "block_details", "window_stats", "cold_blocks", "heatmap"}
    detail = data["block_details"]["a"]
    assert set(detail) == {"access_count", "first_access", "last_access", "intervals"}
    assert detail["access_count"] == 3 and len(detail["intervals"]) == 2
    assert 0 <= detail["first_access"] <= detail["last_access"] <= data["duration_seconds"]
    assert detail["last_access"] - detail["first_access"] == pytest.approx(sum(detail["intervals"]))
    assert validate_stats(data) is data
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temporary left behind


def test_export_writes_through_links_and_into_fifos(tmp_path: Path) -> None:
    """The atomic replace put a regular file in place of a symbolic link (leaving its target stale) and of a
    FIFO or a device: `sage-kv-stats demo -o /dev/full`, run as root, turned /dev/full into a JSON file."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "stats.json"
    target.write_text("old")
    link = tmp_path / "stats.json"
    link.symlink_to(target)
    filled().export_stats(link)
    assert link.is_symlink() and json.loads(target.read_text())["total_accesses"] == 6
    assert sorted(p.name for p in target.parent.iterdir()) == ["stats.json"]  # no temporary left behind

    fifo = tmp_path / "stats.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    filled().export_stats(fifo)
    reader.join(10)  # replaced, the FIFO would never see a writer: the (daemon) reader would wait forever
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert json.loads(received[0])["total_accesses"] == 6


def test_export_to_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        filled().export_stats(tmp_path / "missing" / "stats.json")


def test_reset() -> None:
    c = filled()
    c.reset()
    assert c.get_stats_summary()["total_accesses"] == 0 and len(c) == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [((3,), TypeError), (("",), ValueError), (("a", 1), TypeError), ((None,), TypeError)],
)
def test_bad_record_is_typed_and_changes_nothing(args: tuple[Any, ...], error: type[Exception]) -> None:
    c = filled()
    before = c.get_stats_summary()
    with pytest.raises(error):
        c.record_access(*args)
    assert c.get_stats_summary() == before


@pytest.mark.parametrize(("n", "error"), [(-1, ValueError), (2.0, TypeError)])
def test_bad_top_n(n: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        filled().get_top_blocks(n)


def test_thread_safe_recording() -> None:
    c = AccessStatsCollector(max_times_per_block=None)  # every interval kept, to count them

    def work(worker: int) -> None:
        for i in range(2000):
            c.record_access(f"block_{(worker * 7 + i) % 50}", is_hit=i % 3 != 0)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = c.get_stats_summary()
    assert summary["total_accesses"] == 16_000
    assert summary["cache_hits"] + summary["cache_misses"] == 16_000
    assert sum(count for _, count in c.get_top_blocks(50)) == 16_000
    assert len(c.get_all_intervals()) == 16_000 - 50


# --- loading and plotting ----------------------------------------------------------------------


def test_load_stats_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StatsFileError, match="malformed JSON at line 1"):
        load_stats(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(StatsFileError, match="JSON object"):
        load_stats(bad)
    good = tmp_path / "good.json"
    filled().export_stats(good)
    data = json.loads(good.read_text())
    del data["block_details"]
    bad.write_text(json.dumps(data))
    with pytest.raises(StatsFileError, match="block_details"):
        load_stats(bad)
    data = json.loads(good.read_text())
    data["block_details"]["a"]["intervals"] = [0.1, 0.1, 0.1]
    bad.write_text(json.dumps(data))
    with pytest.raises(StatsFileError, match="3 intervals for 3 accesses"):
        load_stats(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(StatsFileError, match="UTF-8"):
        load_stats(bad)


def test_a_bounded_collectors_export_loads_and_plots_its_kept_times(tmp_path: Path) -> None:
    """A collector keeps max_times_per_block times (256 by default) but counts every access: its export
    had fewer intervals than accesses - 1 and load_stats (so sage-kv-stats visualize) refused it; the
    heatmap drew the kept times from first_access, shifted before they happened."""
    pytest.importorskip("matplotlib")
    from sagellm_kv_cache.profiling.visualize import _access_times

    collector = AccessStatsCollector(max_times_per_block=4)
    for i in range(10):
        collector.record_access("a", is_hit=i > 0)
        time.sleep(0.002)
    collector.record_access("b", is_hit=False)
    path = tmp_path / "bounded.json"
    collector.export_stats(path)
    stats = load_stats(path)
    detail = stats["block_details"]["a"]
    assert detail["access_count"] == 10 and len(detail["intervals"]) == 3
    kept = [t - collector.start_time for t in collector.access_times["a"]]
    assert _access_times(detail) == pytest.approx(kept, abs=1e-6)  # wall-clock floats: microseconds
    assert _access_times(detail)[0] > detail["first_access"] + 0.005  # the six older times were dropped
    for plot_type in PLOT_TYPES:
        assert visualize(stats, tmp_path / f"{plot_type}.png", plot_type).stat().st_size > 0


def test_heatmap_starts_at_the_first_access_not_at_the_collectors_start() -> None:
    """The time axis ran from the collector's creation: 50 ms before the first access left the first
    buckets of a 5 ms recording empty, and the accesses squeezed into the right-hand edge."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from sagellm_kv_cache.profiling.visualize import _draw_heatmap

    collector = AccessStatsCollector()
    time.sleep(0.05)
    for i in range(6):
        collector.record_access("a" if i % 2 else "b", is_hit=i > 1)
        time.sleep(0.001)
    stats = collector.to_dict()
    fig = Figure()
    ax = fig.add_subplot()
    _draw_heatmap(fig, ax, stats, top_n=30, num_buckets=60)
    counts = ax.images[0].get_array()
    assert counts[:, 0].max() >= 1 and counts[:, -1].max() >= 1  # the first and the last access
    assert int(counts.sum()) == 6
    assert ax.get_xlabel().startswith("time since the first access")


def test_format_summary_mentions_the_numbers() -> None:
    text = format_summary(filled().to_dict())
    assert "total accesses        6" in text
    assert "50.00%" in text
    assert "1. a" in text


def test_format_summary_escapes_control_characters_in_block_ids(tmp_path: Path) -> None:
    """Block ids from a stats file were printed raw: an escape sequence in a crafted file reached the terminal."""
    c = AccessStatsCollector()
    crafted = ["\x1b]0;owned\x07blk", "a\u202eb\nc", "blk_1", "blk_$2 é"]
    for block in crafted:
        c.record_access(block, is_hit=False)
    path = tmp_path / "crafted.json"
    c.export_stats(path)
    text = format_summary(load_stats(path))
    assert all(ch == "\n" or ch.isprintable() for ch in text)
    lines = text.splitlines()[-4:]
    assert lines[0].startswith("     1. \\x1b]0;owned\\x07blk ")
    assert lines[1].startswith("     2. a\\u202eb\\nc ")
    assert lines[2].startswith("     3. blk_1 ") and lines[3].startswith("     4. blk_$2 é ")  # unchanged
    assert len({line.index("(") for line in lines}) == 1  # still aligned


def skewed_stats(tmp_path: Path) -> dict[str, Any]:
    c = AccessStatsCollector()
    for i in range(600):
        block = f"block_{int(40 * (i * 0.6180339887 % 1) ** 3):03d}"
        c.record_access(block, is_hit=i % 4 != 0)
    path = tmp_path / "skewed.json"
    c.export_stats(path)
    return load_stats(path)


@pytest.mark.parametrize("plot_type", PLOT_TYPES)
def test_every_plot_type_writes_a_png(tmp_path: Path, plot_type: str) -> None:
    pytest.importorskip("matplotlib")
    stats = skewed_stats(tmp_path)
    out = visualize(stats, tmp_path / f"{plot_type}.png", plot_type)
    width, height = png_size(out)
    assert 800 <= width <= 4000 and 400 <= height <= 4000


@pytest.mark.parametrize("plot_type", PLOT_TYPES)
def test_plots_of_empty_stats(tmp_path: Path, plot_type: str) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "empty.json"
    AccessStatsCollector().export_stats(path)
    out = visualize(load_stats(path), tmp_path / "empty.png", plot_type)
    assert png_size(out)[0] > 0


def test_unknown_plot_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown plot type 'pie'"):
        visualize(skewed_stats(tmp_path), tmp_path / "x.png", "pie")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    stats = skewed_stats(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"isagellm-kv-cache\[visualization\]"):
        visualize(stats, tmp_path / "x.png", "heatmap")


def test_history_stays_bounded_under_endless_distinct_blocks() -> None:
    # A collector on a server's prefix cache sees new block digests for as long as it runs.
    c = AccessStatsCollector(max_blocks=64, max_times_per_block=8, max_lifetimes=32)
    for i in range(5000):
        block = f"b{i}" if i % 2 else f"hot{i // 2 % 4}"
        c.record_access(block, is_hit=i % 2 == 0)
        c.record_alloc(f"b{i}")
        if i % 3:
            c.record_free(f"b{i}")
    assert len(c) == 64 and len(c._alloc_at) <= 64
    assert max(len(times) for times in c.access_times.values()) == 8
    assert c.get_lifecycle_distribution()["count"] == 32
    summary = c.get_stats_summary()
    assert (summary["total_accesses"], summary["cache_hits"]) == (5000, 2500)  # totals stay exact
    # The four hot blocks are the most recently used, so they are kept, with exact counts.
    assert c.get_top_blocks(4) == [(f"hot{k}", 625) for k in range(4)]
    assert c.to_dict()["block_details"]["hot0"]["access_count"] == 625


def test_history_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="max_blocks"):
        AccessStatsCollector(max_blocks=0)
    with pytest.raises(TypeError, match="max_times_per_block"):
        AccessStatsCollector(max_times_per_block=1.5)  # type: ignore[arg-type]
