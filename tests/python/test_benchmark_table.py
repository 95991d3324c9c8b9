"""The benchmarks' command lines: the table ``python benchmarks/run.py`` prints (benchmarks/common.py),
``benchmarks/seed_vs_manager.py``'s arguments."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
common = importlib.import_module("common")
seed_vs_manager = importlib.import_module("seed_vs_manager")


def test_columns_stay_aligned_under_long_workload_and_metric_names(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [common.Row("W1 short", "ns/block", 20.0, 150.0, "reference a"),
            common.Row("W3 prefix, 8,192 blocks LRU (fast path)", "us/request", 16.0, 60.0, "reference b"),
            common.Row("W7 demote 128 blocks (cache, device->host)", "GB/s", 2.0, 4.0, "reference c", True)]
    common.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    header, table = lines[0], lines[2:]
    assert len(table) == len(rows)
    # Every value column ends where its header does, whatever the length of the names before it.
    for title in ("ours", "reference", "ratio"):
        end = header.index(title) + len(title)
        column = [line[:end].split()[-1] for line in table]
        assert all(line[end] == " " for line in table), (title, table)
        assert all(value.replace(".", "").rstrip("x").isdigit() for value in column), (title, column)
    assert [line.split("  ")[-1] for line in table] == ["reference a", "reference b", "reference c"]


def test_seed_vs_manager_help_and_bad_arguments_are_usage_messages(capsys: pytest.CaptureFixture[str]) -> None:
    # Its arguments were read with int(): --help was a ValueError traceback, 0 a ZeroDivisionError.
    with pytest.raises(SystemExit) as exit_:
        seed_vs_manager.main(["--help"])
    assert exit_.value.code == 0 and "num_requests" in capsys.readouterr().out
    for argv, message in ((["ten"], "'ten' is not an integer"), (["0"], "must be at least 1, got 0"),
                          (["100", "-3"], "must be at least 1, got -3")):
        with pytest.raises(SystemExit) as exit_:
            seed_vs_manager.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_seed_vs_manager_runs_a_small_trace(capsys: pytest.CaptureFixture[str]) -> None:
    assert seed_vs_manager.main(["200", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["W2 unbounded", "W3 8,192 LRU"]
    assert all("seed/manager" in line for line in lines)
