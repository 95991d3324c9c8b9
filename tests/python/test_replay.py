"""Mooncake trace replay: reference hit ratios and the ``sagellm-kv replay`` command line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import sagellm_kv_cache
from sagellm_kv_cache.replay import TraceError, load_trace, replay, sample_trace_path
from sagellm_kv_cache.replay_cli import POLICIES, main

SYNTHETIC = Path("/work/shared/data/synthetic_trace.jsonl")
JSON_KEYS = ["blocks", "capacity_blocks", "evictions", "hit_ratio", "hits", "policy", "requests", "requests_per_s",
             "trace"]

# Block-level LRU, longest-prefix match, capacity in 512-token blocks (the data README's reference table).
REFERENCE = [(1000, 0.083), (10000, 0.424), (30000, 0.624), (50000, 0.640), (None, 0.640)]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sagellm_kv_cache.replay_cli", "replay", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def synthetic() -> list:
    if not SYNTHETIC.exists():
        pytest.skip(f"{SYNTHETIC} is not available")
    return load_trace(SYNTHETIC)


@pytest.mark.parametrize(("capacity", "expected"), REFERENCE, ids=[str(c) for c, _ in REFERENCE])
def test_synthetic_trace_reproduces_reference_hit_ratios(synthetic: list, capacity: int | None,
                                                         expected: float) -> None:
    result = replay(synthetic, capacity, "lru", trace_name=SYNTHETIC.name)
    assert result.requests == 3993 and result.blocks == 121877
    assert result.hit_ratio == pytest.approx(expected, abs=0.005)
    assert (result.evictions == 0) == (capacity is None or capacity >= 50000)


def test_cli_default_sample(tmp_path: Path) -> None:
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["trace", "capacity", "policy"]
    rows = [line.split() for line in lines[2:]]
    assert [r[1] for r in rows] == ["1000", "10000", "inf"]
    assert all(r[0] == "mooncake_synthetic_sample.jsonl" and r[2] == "lru" for r in rows)
    assert all(0.0 <= float(r[6]) <= 1.0 for r in rows)


def _bootstrap_has_nothing_to_install() -> bool:
    """scripts/bootstrap.sh installs nothing here (it would run apt-get or pip otherwise)."""
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    headers = all(Path(h).exists() for h in ("/usr/include/openssl/evp.h", "/usr/include/xxhash.h", python_h))
    return (headers and shutil.which("g++") is not None and shutil.which("bash") is not None
            and all(importlib.util.find_spec(m) is not None for m in ("cmake", "ninja")))


def test_run_script_takes_relative_paths_from_the_callers_directory(tmp_path: Path) -> None:
    # scripts/run.sh installs from the repository root, but a user running it from elsewhere names the
    # trace and the outputs relative to where they are.
    if not _bootstrap_has_nothing_to_install():
        pytest.skip("scripts/bootstrap.sh would install packages on this machine")
    script = Path(__file__).resolve().parents[2] / "scripts" / "run.sh"
    (tmp_path / "trace.jsonl").write_bytes(sample_trace_path().read_bytes())
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": str(Path(sagellm_kv_cache.__file__).resolve().parents[1])}
    proc = subprocess.run(["bash", str(script), "trace.jsonl", "--capacity-blocks", "1000", "--json", "rows.json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["trace"], r["capacity_blocks"]) for r in rows] == [("trace.jsonl", 1000)]
    assert not (script.parents[1] / "rows.json").exists()


def test_run_script_takes_a_relative_python_from_the_callers_directory(tmp_path: Path) -> None:
    if not _bootstrap_has_nothing_to_install():
        pytest.skip("scripts/bootstrap.sh would install packages on this machine")
    script = Path(__file__).resolve().parents[2] / "scripts" / "run.sh"
    wrapper = tmp_path / "py"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHON": "./py",
           "PYTHONPATH": str(Path(sagellm_kv_cache.__file__).resolve().parents[1])}
    proc = subprocess.run(["bash", str(script), "--capacity-blocks", "1000"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2].split()[:2] == ["mooncake_synthetic_sample.jsonl", "1000"]


def test_cli_json_keys_exactly(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = run_cli("--capacity-blocks", "50,inf", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    for row in rows:
        assert sorted(row) == JSON_KEYS
        assert isinstance(row["requests"], int) and isinstance(row["hit_ratio"], float)
        assert row["hits"] <= row["blocks"] and row["policy"] == "lru"
    assert rows[0]["capacity_blocks"] == 50 and rows[1]["capacity_blocks"] is None
    assert rows[0]["evictions"] > 0 and rows[1]["evictions"] == 0
    assert rows[0]["hit_ratio"] <= rows[1]["hit_ratio"]


def test_cli_plot_without_matplotlib_fails_before_replaying(tmp_path: Path) -> None:
    # matplotlib is an extra; blocking its import is the only way to provoke this path where it is installed.
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from sagellm_kv_cache.replay_cli import main\n"
            "sys.exit(main(['replay', '--plot', 'out.png']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""  # nothing was replayed
    assert "--plot needs matplotlib" in proc.stderr and "[visualization]" in proc.stderr
    assert not (tmp_path / "out.png").exists()


def test_cli_plot_writes_a_valid_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curve.png"
    proc = run_cli("--capacity-blocks", "100,1000,inf", "--plot", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # Walk the chunks: lengths and CRCs must check out up to IEND.
    offset, kinds = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc
        kinds.append(kind)
        offset += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_cli_tiered_plot_draws_one_bar_per_trace(tmp_path: Path) -> None:
    """Bars were placed by their labels, the first 18 characters of the trace's name: two traces whose
    names share them were drawn as one overlapping bar (the second total floated beside the axes)."""
    mpl_image = pytest.importorskip("matplotlib.image")
    lines = sample_trace_path().read_text().splitlines()
    for part, chunk in (("1", lines[:300]), ("2", lines[:250])):  # both with device hits
        (tmp_path / f"conversation_trace_part{part}.jsonl").write_text("\n".join(chunk) + "\n")
    png = tmp_path / "tiers.png"
    assert main(["replay", str(tmp_path / "conversation_trace_part1.jsonl"),
                 str(tmp_path / "conversation_trace_part2.jsonl"), "--capacity-blocks", "100", "--host-blocks",
                 "1000", "--plot", str(png)]) == 0
    pixels = (mpl_image.imread(png)[:, :, :3] * 255).round()
    device = np.all(np.abs(pixels - (0x1F, 0x77, 0xB4)) <= 2, axis=2)  # the device tier's colour
    row = device[np.flatnonzero(device.any(axis=1))[-1]]  # the lowest row of it: the bars' feet, not the legend
    runs = np.count_nonzero(np.diff(row.astype(np.int8)) == 1) + int(row[0])
    assert runs == 2


@pytest.mark.parametrize("tiers", [[], ["--host-blocks", "100"]], ids=["single", "tiered"])
def test_cli_table_columns_stay_aligned_under_a_long_trace_name(tmp_path: Path, tiers: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled sample's name (31 characters) overflowed the tiered table's trace column, a longer name
    the plain table's, pushing that row's figures out from under their headers."""
    trace = tmp_path / ("a_trace_with_a_rather_long_file_name_" + "x" * 8 + ".jsonl")
    trace.write_text("\n".join(sample_trace_path().read_text().splitlines()[:100]) + "\n")
    assert main(["replay", str(trace), "--capacity-blocks", "100", *tiers]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[0], lines[2]
    assert row.startswith(trace.name + " ")
    # Every column after the name is right-aligned under its header: the row ends where the header does.
    assert len(row) == len(header) == len(lines[1]), (header, row)


@pytest.mark.parametrize("tiers", [[], ["--host-blocks", "100"]], ids=["single", "tiered"])
def test_cli_plot_of_a_trace_named_with_dollar_signs(tmp_path: Path, tiers: list[str]) -> None:
    """The trace's name went into the legend / tick labels as mathtext: 'x$\\frac{a$.jsonl' was a
    ParseSyntaxException traceback after the whole replay."""
    pytest.importorskip("matplotlib")
    trace = tmp_path / "x$\\frac{a$.jsonl"
    trace.write_text("\n".join(sample_trace_path().read_text().splitlines()[:100]) + "\n")
    png = tmp_path / "plot.png"
    assert main(["replay", str(trace), "--capacity-blocks", "100", "--plot", str(png), *tiers]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_format_is_checked_before_replaying(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An extension matplotlib cannot write was a ValueError traceback after the whole replay."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "rows.json"
    assert main(["replay", "--capacity-blocks", "100", "--json", str(out), "--plot", str(tmp_path / "p.txt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()  # nothing was replayed
    assert captured.err.count("\n") == 1 and "unknown image format 'txt'" in captured.err and "png" in captured.err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_cli_unwritable_output_is_refused_before_replaying(tmp_path: Path, option: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An output that is a directory or lies in a missing one failed only after the whole replay (minutes on a
    large trace); an empty one was silently skipped (no file, exit status 0)."""
    missing = tmp_path / "no"
    for value, problem in ((str(tmp_path), "is a directory"),
                           (str(missing / "x.png"), f"directory {str(missing)!r} does not exist"),
                           ("", "empty path")):
        assert main(["replay", "--capacity-blocks", "100", option, value]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing was replayed
        assert captured.err.count("\n") == 1 and f"{option} {value!r}: {problem}" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_cli_traces_with_the_same_file_name_keep_apart(tmp_path: Path) -> None:
    """a/trace.jsonl and b/trace.jsonl were both rows 'trace.jsonl', and --plot drew them as one zigzag curve."""
    lines = sample_trace_path().read_text().splitlines()
    for folder, part in (("a", lines[:200]), ("b", lines[-200:])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "trace.jsonl").write_text("\n".join(part) + "\n")
    out = tmp_path / "rows.json"
    proc = run_cli("a/trace.jsonl", "b/trace.jsonl", "--capacity-blocks", "100,inf", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["trace"] for r in rows] == ["a/trace.jsonl"] * 2 + ["b/trace.jsonl"] * 2
    assert rows[1]["hits"] != rows[3]["hits"]  # two traces, told apart
    assert [line.split()[0] for line in proc.stdout.splitlines()[2:]] == [r["trace"] for r in rows]


def test_cli_names_a_disk_dir_left_by_a_run_with_other_block_bytes(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(sample_trace_path().read_text().splitlines()[:50]) + "\n")
    disk = tmp_path / "disk"
    common = ["replay", str(trace), "--capacity-blocks", "50", "--host-blocks", "100", "--disk-blocks", "500",
              "--disk-dir", str(disk), "--buffered-io"]
    assert main([*common, "--block-bytes", "8192"]) == 0
    capsys.readouterr()
    assert main([*common, "--block-bytes", "4096"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and f"--disk-dir {str(disk)!r} holds a disk tier written with other settings" in err
    assert "'block_nbytes': expected 4096, got 8192" in err


def test_cli_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    proc = run_cli(str(missing), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in proc.stderr


def test_cli_malformed_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hash_ids": [1, 2, 3]}\n{"hash_ids": [1, 2}\n')
    proc = run_cli(str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:2" in lines[0] and "Traceback" not in proc.stderr

    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"hash_ids": [1, 2, 3]}\n\n{"hash_ids": "1,2"}\n')
    proc = run_cli(str(wrong), cwd=tmp_path)
    assert proc.returncode == 2 and f"{wrong}:3" in proc.stderr and "Traceback" not in proc.stderr


def test_load_trace_reads_a_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    """A UTF-8 BOM (what Windows editors write) made line 1 'not valid JSON (Unexpected UTF-8 BOM)'."""
    trace = tmp_path / "bom.jsonl"
    trace.write_bytes(b'\xef\xbb\xbf{"hash_ids": [1, 2, 3]}\r\n{"hash_ids": [1, 2, 4]}\r\n')
    assert [r.tolist() for r in load_trace(trace)] == [[1, 2, 3], [1, 2, 4]]
    assert replay(load_trace(trace), 10).hits == 2


def test_load_trace_names_a_binary_or_too_deeply_nested_file(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 (an unnamed UnicodeDecodeError) and a line nested past the recursion
    limit (a RecursionError traceback from the CLI) are TraceErrors naming the file (and line)."""
    binary = tmp_path / "trace.bin"
    binary.write_bytes(b'{"hash_ids": [1]}\n\xff\xfe\x00\n')
    with pytest.raises(TraceError, match=f"{re.escape(str(binary))}: not UTF-8"):
        load_trace(binary)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"hash_ids": [1]}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(TraceError, match=f"{re.escape(str(deep))}:2: JSON nested too deeply"):
        load_trace(deep)
    huge = tmp_path / "huge.jsonl"  # past int()'s 4300 digits: json's ValueError named neither file nor line
    huge.write_text('{"hash_ids": [1]}\n{"hash_ids": [1' + "0" * 5000 + "]}\n")
    with pytest.raises(TraceError, match=f"{re.escape(str(huge))}:2: .*4300 digits"):
        load_trace(huge)


def test_cli_replays_any_capacity_it_accepts_and_names_one_it_does_not(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The pool was sized capacity + longest request: a capacity near 2^31 failed as 'num_blocks must be
    in [1, 2147483647], got 2147483649', one past 2^63 (and such a --host-blocks) with a pybind
    traceback, and a trace of empty requests replayed unbounded as 'num_blocks ... got 0'."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"hash_ids": [1, 2]}\n{"hash_ids": [1, 3]}\n')
    out = tmp_path / "rows.json"
    assert main(["replay", str(trace), "--capacity-blocks", f"2,{2**31 - 1},inf", "--json", str(out)]) == 0
    assert [(r["capacity_blocks"], r["hits"]) for r in json.loads(out.read_text())] == [
        (2, 1), (2**31 - 1, 1), (None, 1)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"hash_ids": []}\n')
    assert main(["replay", str(empty), "--capacity-blocks", "4,inf", "--json", str(out)]) == 0
    assert [r["blocks"] for r in json.loads(out.read_text())] == [0, 0]
    capsys.readouterr()
    for args in (["--capacity-blocks", str(2**31)], ["--capacity-blocks", "4", "--host-blocks", str(10**20)],
                 ["--capacity-blocks", "4", "--disk-blocks", str(10**20)]):
        with pytest.raises(SystemExit) as exc:
            main(["replay", str(trace), *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "[0, 2147483647]" in err or "[1, 2147483647]" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("policy", POLICIES)
def test_cli_every_policy_runs(tmp_path: Path, policy: str) -> None:
    out = tmp_path / "rows.json"
    proc = run_cli("--policy", policy, "--capacity-blocks", "200", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["policy"] == policy and 0.0 < row["hit_ratio"] < 1.0 and row["evictions"] > 0


def test_cli_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad argument printed argparse's usage block (four lines) before the error."""
    for argv in (["replay", "--policy", "mru"], ["replay", "--capacity-blocks", "1e3"], ["bogus"], [],
                 ["replay", "--host-blocks", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("sagellm-kv"), (argv, err)
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--policy", "mru"])
    assert "replay: error: argument --policy: invalid choice: 'mru'" in capsys.readouterr().err


def test_cli_without_a_command_names_the_commands_and_has_a_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "sagellm-kv: error: the following arguments are required: {replay}\n"
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"sagellm-kv {sagellm_kv_cache.__version__}\n"


def test_cli_rejects_unknown_policy(tmp_path: Path) -> None:
    proc = run_cli("--policy", "mru", cwd=tmp_path)
    assert proc.returncode == 2 and "mru" in proc.stderr and "Traceback" not in proc.stderr


def interrupted_while_reading(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs ``command``, whose input is ``cwd/input.fifo`` (a named pipe), and sends it SIGINT while it
    reads the input: the pipe opens for writing only once the child has opened it for reading."""
    import errno
    import os
    import signal
    import time

    fifo = cwd / "input.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p)}
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # non-blocking, so a child that dies before opening the pipe cannot hang the test
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as err:
                if err.errno != errno.ENXIO or child.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the child never opened {fifo}: {child.communicate()}") from err
                time.sleep(0.01)
        os.write(fd, b'{"hash_ids": [1, 2]}\n')
        child.send_signal(signal.SIGINT)
        # The kernel may hand the signal to another of the child's threads, which leaves the main thread
        # blocked in read(): the end of the input wakes it, and the pending signal is raised next.
        os.close(fd)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return subprocess.CompletedProcess(command, child.returncode, out, err)


@pytest.mark.skipif(sys.platform == "win32", reason="named pipes and SIGINT are POSIX")
def test_cli_ctrl_c_exits_130_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C during a replay printed a KeyboardInterrupt traceback (and the status of a signal death)."""
    proc = interrupted_while_reading([sys.executable, "-m", "sagellm_kv_cache.replay_cli", "replay", "input.fifo"],
                                     tmp_path)
    assert proc.returncode == 130 and proc.stderr == "sagellm-kv: interrupted\n" and proc.stdout == "", proc
