"""The ``sage-kv-stats`` CLI and its thin wrappers, run as real subprocesses."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import types
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sagellm_kv_cache import cli
from sagellm_kv_cache.profiling import AccessStatsCollector, load_stats
from sagellm_kv_cache.profiling.visualize import StatsFileError

REPO = Path(__file__).resolve().parents[2]


def real_prefix_cache_available() -> bool:
    try:
        from sagellm_kv_cache.prefix_cache import PrefixCache  # noqa: F401
    except ImportError:
        return False
    return True


needs_prefix_cache = pytest.mark.skipif(
    not real_prefix_cache_available(), reason="sagellm_kv_cache.prefix_cache is not built yet"
)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p)
    env["MPLBACKEND"] = "Agg"
    return env


def run(args: Sequence[str], cwd: Path, script: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "sagellm_kv_cache.cli"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=120, check=False
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sage-kv-stats: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def stats_file(tmp_path: Path) -> Path:
    collector = AccessStatsCollector()
    for i in range(400):
        collector.record_access(f"block_{(i * i) % 37:03d}", is_hit=i % 3 != 0)
    path = tmp_path / "stats.json"
    collector.export_stats(path)
    return path


# --- a stand-in prefix cache, only to test the demo's logic in-process ---------------------------


class StandInPrefixCache:
    """Seed-API prefix cache in a few lines: chained SHA-256 block hashes and an LRU dict."""

    def __init__(self, block_size: int = 16, max_cached_blocks: int | None = None, enable_lru: bool = True) -> None:
        self.block_size = block_size
        self.capacity = max_cached_blocks
        self.blocks: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
        self.evictions = 0

    def compute_block_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        hashes, parent = [], b""
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            parent = hashlib.sha256(parent + repr(list(tokens[start : start + self.block_size])).encode()).digest()
            hashes.append(parent)
        return hashes

    def lookup(self, hashes: Sequence[bytes]) -> tuple[list[dict[str, Any]], int]:
        found = []
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            found.append(self.blocks[h])
        return found, len(found) * self.block_size

    def insert(self, hashes: Sequence[bytes], blocks: Sequence[dict[str, Any]]) -> None:
        assert len(hashes) == len(blocks)
        for h, block in zip(hashes, blocks, strict=True):
            self.blocks[h] = block
            self.blocks.move_to_end(h)
        while self.capacity is not None and len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
            self.evictions += 1

    def get_stats(self) -> dict[str, Any]:
        return {"num_blocks": len(self.blocks), "evict_count": self.evictions}


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("sagellm_kv_cache.prefix_cache")
    module.PrefixCache = StandInPrefixCache  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sagellm_kv_cache.prefix_cache", module)


def test_demo_workload_is_skewed_and_repeatable() -> None:
    runs = []
    for _ in range(2):
        collector = AccessStatsCollector()
        counts = cli.run_demo_workload(StandInPrefixCache(16, 160), collector, 2000, seed=3)
        assert counts["block_lookups"] == 2000
        runs.append((counts, collector.get_top_blocks(20)))
    assert runs[0] == runs[1]  # same seed, same workload
    counts, _ = runs[0]
    summary = collector.get_stats_summary()
    assert 0.2 < summary["hit_rate"] < 0.95  # shared prefixes hit, fresh user turns miss
    assert summary["unique_blocks"] < 2000
    counts_sorted = sorted((c for _, c in collector.get_top_blocks(10_000)), reverse=True)
    assert counts_sorted[0] >= 10 * counts_sorted[len(counts_sorted) // 2]  # Zipf skew


def test_block_labels_for_every_hash_form() -> None:
    np = pytest.importorskip("numpy")
    digest = bytes(range(32))
    assert cli._block_label(digest, 0) == "blk_000102030405"
    assert cli._block_label(np.frombuffer(digest, dtype=np.uint8), 0) == "blk_000102030405"
    assert cli._block_label(0xABC, 0) == "blk_000000000abc"
    assert cli._block_label(object(), 7) == "block_7"


def test_demo_command_in_process_with_stand_in(stand_in: None, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "-n", "300", "-o", str(out)]) == 0
    stats = load_stats(out)
    assert stats["total_accesses"] == 300
    assert "Statistics written to" in capsys.readouterr().out


def test_demo_command_accepts_a_namespace(stand_in: None, tmp_path: Path) -> None:
    args = argparse.Namespace(num_accesses=50, output=str(tmp_path / "ns.json"), seed=1)
    assert cli.demo_command(args) == 0
    assert load_stats(tmp_path / "ns.json")["total_accesses"] == 50


def test_demo_accesses_are_bounded(stand_in: None, tmp_path: Path, capsys: Any) -> None:
    """-n 10**12 recorded (and kept) accesses until memory ran out."""
    out = tmp_path / "demo.json"
    for n in (cli.MAX_DEMO_ACCESSES + 1, 10**12):
        assert cli.main(["demo", "-n", str(n), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"sage-kv-stats: error: argument --num-accesses/-n: at most {cli.MAX_DEMO_ACCESSES}, got {n}\n"
        args = argparse.Namespace(num_accesses=n, output=str(out), seed=0)
        assert cli.demo_command(args) == 2
        assert f"--num-accesses must be at most {cli.MAX_DEMO_ACCESSES}, got {n}" in capsys.readouterr().err
    assert not out.exists()


# --- the real thing, as subprocesses -----------------------------------------------------------


@needs_prefix_cache
def test_demo_runs_the_real_prefix_cache(tmp_path: Path) -> None:
    result = run(["demo", "--num-accesses", "800", "--output", "demo.json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "PrefixCache" in result.stdout
    stats = load_stats(tmp_path / "demo.json")
    assert stats["total_accesses"] == 800
    assert 0.0 < stats["hit_rate"] < 1.0
    assert stats["unique_blocks"] < 800


@needs_prefix_cache
def test_demo_defaults_and_example_wrapper(tmp_path: Path) -> None:
    result = run(["demo"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_stats(tmp_path / "demo_stats.json")["total_accesses"] == 500
    result = run(
        ["--num-accesses", "200", "--output", "stats.json"], tmp_path, REPO / "examples" / "kv_profiling_demo.py"
    )
    assert result.returncode == 0, result.stderr
    assert load_stats(tmp_path / "stats.json")["total_accesses"] == 200


@pytest.mark.parametrize("plot_type", ["heatmap", "frequency", "interval", "all"])
def test_visualize_each_type(stats_file: Path, tmp_path: Path, plot_type: str) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / f"{plot_type}.png"
    result = run(["visualize", "--input", str(stats_file), "--output", str(out), "--type", plot_type], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    width, height = png_size(out)
    assert 800 <= width <= 4000 and 400 <= height <= 4000


def test_visualize_default_output_alias_and_summary(stats_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run(["viz", "-i", str(stats_file), "-s"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "total accesses        400" in result.stdout
    assert "hit rate" in result.stdout
    png_size(stats_file.with_name("stats_heatmap.png"))


def test_visualize_summary_does_not_send_escape_sequences_from_the_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    collector = AccessStatsCollector()
    collector.record_access("\x1b[2J\x1b]0;pwned\x07", is_hit=False)
    path = tmp_path / "crafted.json"
    collector.export_stats(path)
    result = run(["visualize", "-i", str(path), "-o", str(tmp_path / "out.png"), "-s"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "1. \\x1b[2J\\x1b]0;pwned\\x07 " in result.stdout


def test_visualize_script_wrapper(stats_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    script = REPO / "scripts" / "visualize_access_pattern.py"
    result = run(["--input", str(stats_file), "--type", "all", "--summary"], tmp_path, script)
    assert result.returncode == 0, result.stderr
    assert "unique blocks" in result.stdout
    png_size(stats_file.with_name("stats_all.png"))


# --- bad input: one line on stderr, exit status 2, nothing written --------------------------------


def test_missing_input_file(tmp_path: Path) -> None:
    assert_one_line_error(run(["visualize", "-i", "nope.json", "-o", "x.png"], tmp_path), "nope.json", "not found")
    assert not (tmp_path / "x.png").exists()


def test_malformed_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"total_accesses": 3,\n  oops')
    assert_one_line_error(run(["visualize", "-i", str(bad)], tmp_path), "malformed JSON", "line 2")
    assert not (tmp_path / "bad_heatmap.png").exists()


def test_wrong_shape_json(tmp_path: Path) -> None:
    bad = tmp_path / "shape.json"
    bad.write_text(json.dumps({"total_accesses": 3}))
    assert_one_line_error(run(["visualize", "-i", str(bad)], tmp_path), "missing key")


def test_stats_files_that_validated_but_could_not_be_drawn(stats_file: Path, tmp_path: Path) -> None:
    """JSON nested past the recursion limit (a RecursionError traceback), NaN / Infinity summary numbers
    (printed as 'nan'), access times whose sum overflows (matplotlib's 'Axis limits cannot be NaN or Inf'
    traceback): each is a StatsFileError naming the file and the field."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(StatsFileError, match=r"deep\.json: JSON nested too deeply"):
        load_stats(deep)
    good = json.loads(stats_file.read_text())
    for key in ("hit_rate", "duration_seconds"):
        bad = tmp_path / f"{key}.json"
        bad.write_text(json.dumps({**good, key: float("nan")}))  # json writes NaN, and reads it back
        with pytest.raises(StatsFileError, match=f"'{key}' must be finite, got nan"):
            load_stats(bad)
    block, detail = next((b, d) for b, d in good["block_details"].items() if d["access_count"] > 2)
    detail["intervals"] = [1e308] * len(detail["intervals"])
    far = tmp_path / "far.json"
    far.write_text(json.dumps(good))
    with pytest.raises(StatsFileError, match=f"block_details\\['{block}'\\]: its access times overflow"):
        load_stats(far)
    assert_one_line_error(run(["visualize", "-i", str(deep)], tmp_path), "nested too deeply")


def test_block_ids_with_dollar_signs_are_drawn_as_text(tmp_path: Path) -> None:
    """matplotlib read '$...$' in a tick label as mathtext: an id that is not valid mathtext was a
    ParseSyntaxException traceback (exit 1) from every plot listing it."""
    pytest.importorskip("matplotlib")
    collector = AccessStatsCollector()
    for i in range(40):
        collector.record_access("req$\\frac{a$" if i % 2 else "blk_$x^2$", is_hit=i % 3 == 0)
    stats = tmp_path / "dollars.json"
    collector.export_stats(stats)
    for plot_type in ("heatmap", "frequency"):
        result = run(["visualize", "-i", str(stats), "-t", plot_type, "-o", f"{plot_type}.png"], tmp_path)
        assert result.returncode == 0, result.stderr
        assert png_size(tmp_path / f"{plot_type}.png")[0] > 100


def test_stats_file_with_a_byte_order_mark(stats_file: Path, tmp_path: Path) -> None:
    """A UTF-8 BOM (what Windows editors write) was 'malformed JSON at line 1 column 1: Unexpected UTF-8 BOM'."""
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + stats_file.read_bytes())
    assert load_stats(bom) == load_stats(stats_file)


def test_stats_file_with_negative_times_or_counts(stats_file: Path, tmp_path: Path) -> None:
    """The collector's clock is monotonic, so an exported file never holds a negative interval, count or
    duration, nor a hit rate past 1; one that does was drawn anyway (negative intervals came out as a
    histogram of '-1.5e+06 µs'). Each is a one-line error naming the file and the field now."""
    good = json.loads(stats_file.read_text())
    block = next(b for b, d in good["block_details"].items() if d["intervals"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "access_intervals": [-1.0, -2.0]}, "'access_intervals' must be a list of numbers >= 0"),
        ({**good, "total_accesses": -5}, "'total_accesses' must be >= 0, got -5"),
        ({**good, "duration_seconds": -0.5}, "'duration_seconds' must be >= 0, got -0.5"),
        ({**good, "hit_rate": 7.5}, "'hit_rate' must be in [0, 1], got 7.5"),
    ]
    negative_gap = json.loads(json.dumps(good))
    negative_gap["block_details"][block]["intervals"][0] = -1000.0
    cases.append((negative_gap, f"block_details['{block}'].intervals must be a list of numbers >= 0"))
    for number, (stats, fragment) in enumerate(cases):
        bad = tmp_path / f"bad{number}.json"
        bad.write_text(json.dumps(stats))
        with pytest.raises(StatsFileError) as caught:
            load_stats(bad)
        assert str(caught.value) == f"{bad}: {fragment}"
    assert_one_line_error(run(["visualize", "-i", str(tmp_path / "bad0.json"), "-t", "interval"], tmp_path),
                          "bad0.json", "'access_intervals' must be a list of numbers >= 0")
    assert not list(tmp_path.glob("*.png"))


def test_stats_file_with_integers_beyond_float_or_int_parsing(stats_file: Path, tmp_path: Path) -> None:
    """JSON integers are Python ints: one past the float range (an OverflowError traceback from
    math.isfinite) or past int()'s 4300 digits (a ValueError traceback from json) is a one-line error."""
    text = stats_file.read_text()
    detail = '"first_access": '
    assert detail in text
    for digits, fragment in ((400, "first_access must be a number"), (5000, "4300 digits")):
        bad = tmp_path / f"big{digits}.json"
        bad.write_text(re.sub(r'"first_access": [^,]+', f'"first_access": 1{"0" * digits}', text, count=1))
        assert_one_line_error(run(["visualize", "-i", str(bad)], tmp_path), bad.name, fragment)


def test_unknown_plot_type(stats_file: Path, tmp_path: Path) -> None:
    assert_one_line_error(run(["visualize", "-i", str(stats_file), "-t", "pie"], tmp_path), "pie")


def test_input_is_a_directory(tmp_path: Path) -> None:
    assert_one_line_error(run(["visualize", "-i", str(tmp_path)], tmp_path), "directory")
    # No file name to derive the default output from: a ValueError traceback from Path.with_name.
    for nameless in (".", "/"):
        assert_one_line_error(run(["visualize", "-i", nameless], tmp_path), f"input {nameless} is a directory")


def test_empty_input_or_output(stats_file: Path, tmp_path: Path) -> None:
    """-i '' was a traceback (Path('') is '.', which has no name); -o '' silently wrote the default output."""
    assert_one_line_error(run(["visualize", "-i", ""], tmp_path), "--input is empty")
    assert_one_line_error(run(["visualize", "-i", str(stats_file), "-o", ""], tmp_path), "--output is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == [stats_file.name]


def test_output_directory_missing(stats_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run(["visualize", "-i", str(stats_file), "-o", str(tmp_path / "no" / "x.png")], tmp_path)
    assert_one_line_error(result, "cannot write")


def test_output_format_is_the_suffix_and_an_unknown_one_is_refused_first(stats_file: Path, tmp_path: Path,
                                                                          capsys: Any) -> None:
    """-o x.txt wrote PNG bytes into x.txt (and -o x.pdf a PNG too); sagellm-kv replay --plot refuses it."""
    pytest.importorskip("matplotlib")
    # refused before the input is read: the error is the format, not the missing file
    assert cli.main(["visualize", "-i", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown image format 'txt'" in err and "png" in err and "missing" not in err
    assert not (tmp_path / "x.txt").exists()
    for name, magic in (("x.pdf", b"%PDF"), ("x.SVG", b"<?xml"), ("x.png", b"\x89PNG"), ("noext", b"\x89PNG")):
        assert cli.main(["visualize", "-i", str(stats_file), "-o", str(tmp_path / name), "-t", "frequency"]) == 0
        assert (tmp_path / name).read_bytes().startswith(magic), name


def test_plot_functions_refuse_an_unknown_format_before_drawing(stats_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from sagellm_kv_cache.profiling.visualize import image_format, plot_interval, visualize

    stats = load_stats(stats_file)
    with pytest.raises(ValueError, match="unknown image format 'gz'"):
        visualize(stats, tmp_path / "x.tar.gz", "all")
    assert list(tmp_path.glob("x.*")) == []
    assert image_format("a/b") == "png" and image_format("c.JPEG") == "jpeg"
    assert plot_interval(stats, tmp_path / "i.svg").read_bytes().startswith(b"<?xml")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["visualize"],
        ["frobnicate"],
        ["demo", "-n", "0"],
        ["demo", "-n", "many"],
        ["demo", "--output"],
    ],
)
def test_usage_errors(args: list[str], tmp_path: Path) -> None:
    assert_one_line_error(run(args, tmp_path))


def test_demo_output_directory_missing(tmp_path: Path) -> None:
    assert_one_line_error(run(["demo", "-o", str(tmp_path / "missing" / "d.json")], tmp_path), "does not exist")


def test_help_exits_zero(capsys: Any) -> None:
    assert cli.main(["--help"]) == 0
    assert "visualize" in capsys.readouterr().out


def test_version_exits_zero(capsys: Any) -> None:
    from sagellm_kv_cache import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"sage-kv-stats {__version__}\n"


def test_visualize_command_rejects_unknown_type_programmatically(stats_file: Path, capsys: Any) -> None:
    args = argparse.Namespace(input=str(stats_file), output=None, type="pie", summary=False)
    assert cli.visualize_command(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(sys.platform == "win32", reason="named pipes and SIGINT are POSIX")
def test_ctrl_c_exits_130_with_one_line(tmp_path: Path) -> None:
    from test_replay import interrupted_while_reading

    proc = interrupted_while_reading([sys.executable, "-m", "sagellm_kv_cache.cli", "visualize", "-i", "input.fifo"],
                                     tmp_path)
    assert proc.returncode == 130 and proc.stderr == "sage-kv-stats: interrupted\n" and proc.stdout == "", proc
