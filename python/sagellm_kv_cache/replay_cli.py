"""``sagellm-kv``: command-line entry point; ``sagellm-kv replay`` is the main job.

    sagellm-kv replay                                   # the sample trace shipped in the package
    sagellm-kv replay trace.jsonl --capacity-blocks 1000,10000,inf --json out.json --plot out.png
    sagellm-kv replay trace.jsonl --capacity-blocks 1000 --host-blocks 10000 --disk-blocks 100000 --plot tiers.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sagellm_kv_cache.errors import KVCacheError, KVMetadataMismatchError
from sagellm_kv_cache.profiling.visualize import image_format, literal_label

if TYPE_CHECKING:
    from sagellm_kv_cache.replay import ReplayResult

POLICIES = ("lru", "fifo", "priority", "ttl")
MAX_COUNT = 2**31 - 1  # block counts are int32 in the native pool, trie and tiers


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _capacities(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("inf", "none", "unbounded"):
            out.append(None)
            continue
        try:
            value = int(part.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"capacity {part!r} is not an integer or 'inf'") from None
        if not 0 < value <= MAX_COUNT:
            raise argparse.ArgumentTypeError(f"capacity must be in [1, {MAX_COUNT}], got {value}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no capacity given")
    return out


def _count(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_COUNT}], got {value}")
    return value


def _trace_width(rows: Sequence[dict[str, object]], least: int) -> int:
    """The trace column's width: ``least``, or the longest trace name so that no row shifts its figures."""
    return max([least, *(len(str(r["trace"])) for r in rows)])


def _print_table(rows: Sequence[dict[str, object]]) -> None:
    width = _trace_width(rows, 32)
    header = (f"{'trace':<{width}} {'capacity':>9} {'policy':>8} {'requests':>9} {'blocks':>9} {'hits':>9} "
              f"{'hit ratio':>9} {'evictions':>9} {'req/s':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cap = "inf" if r["capacity_blocks"] is None else str(r["capacity_blocks"])
        print(f"{r['trace']!s:<{width}} {cap:>9} {r['policy']!s:>8} {r['requests']:>9} {r['blocks']:>9} {r['hits']:>9} "
              f"{r['hit_ratio']:>9.3f} {r['evictions']:>9} {r['requests_per_s']:>9.0f}")


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; RuntimeError naming the extra when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'isagellm-kv-cache[visualization]'") from None
    return plt


def _plot(results: Sequence[ReplayResult], path: str) -> None:
    plt = _pyplot()
    bounded = sorted({r.capacity_blocks for r in results if r.capacity_blocks is not None})
    # "unbounded" is drawn one step beyond the largest capacity on the log axis.
    inf_x = bounded[-1] * 4 if bounded else 1

    def x_of(r: ReplayResult) -> int:
        return inf_x if r.capacity_blocks is None else r.capacity_blocks

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trace in dict.fromkeys(r.trace for r in results):
        mine = sorted((r for r in results if r.trace == trace), key=x_of)
        ax.plot([x_of(r) for r in mine], [r.hit_ratio for r in mine], marker="o", label=literal_label(trace))
    ax.set_xscale("log")
    ticks = [*bounded, inf_x]
    ax.set_xticks(ticks)
    # Thousands as "30k": neighbouring capacities on the log axis (30,000 and 50,000) stay apart.
    ax.set_xticklabels(["unbounded" if t == inf_x else f"{t // 1000:,}k" if t % 1000 == 0 else f"{t:,}"
                        for t in ticks], rotation=30, ha="right", rotation_mode="anchor")
    ax.minorticks_off()
    ax.set_xlabel("prefix-cache capacity (512-token blocks)")
    ax.set_ylabel("hit ratio (blocks hit / blocks requested)")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Prefix-cache hit ratio vs capacity ({results[0].policy if results else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=image_format(path))
    plt.close(fig)


def _mb(n: object) -> str:
    return f"{int(n) / 1e6:.1f}" if isinstance(n, int) else "-"


def _print_tiered_table(rows: Sequence[dict[str, object]]) -> None:
    width = _trace_width(rows, 28)
    header = (f"{'trace':<{width}} {'device':>7} {'host':>7} {'disk':>7} {'blocks':>8} {'hit ratio':>9} "
              f"{'dev hit':>7} {'host hit':>8} {'disk hit':>8} {'req/s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        by = r["hit_ratio_by_tier"]
        assert isinstance(by, dict)
        print(f"{r['trace']!s:<{width}} {r['capacity_blocks']!s:>7} {r['host_blocks']!s:>7} {r['disk_blocks']!s:>7} "
              f"{r['blocks']:>8} {r['hit_ratio']:>9.3f} {by['device']:>7.3f} {by['host']:>8.3f} {by['disk']:>8.3f} "
              f"{r['requests_per_s']:>7.0f}")
    for r in rows:
        moved, secs, bw, saved = (r["bytes_moved"], r["copy_seconds"], r["bandwidth_bytes_per_s"],
                                  r["tokens_saved_by_tier"])
        assert isinstance(moved, dict) and isinstance(secs, dict) and isinstance(bw, dict) and isinstance(saved, dict)
        print(f"\n{r['trace']} device={r['capacity_blocks']} host={r['host_blocks']} disk={r['disk_blocks']} "
              f"({r['block_bytes']} B blocks, disk direct I/O: {r['disk_direct_io']}, "
              f"blocks verified after promotion: {r['verified_blocks']})")
        print(f"  prefill tokens saved: device {saved['device']:,}  host {saved['host']:,}  disk {saved['disk']:,}")
        print(f"  {'path':<16} {'MB moved':>10} {'seconds':>9} {'MB/s':>9}")
        for path, nbytes in moved.items():
            rate = bw.get(path)
            print(f"  {path:<16} {_mb(nbytes):>10} {float(secs[path]):>9.3f} "
                  f"{(f'{rate / 1e6:.0f}' if isinstance(rate, float) else '-'):>9}")


def _short_stem(trace: str, width: int = 18) -> str:
    """A trace's name without its suffix, at most ``width`` characters: the middle gives way, so names that
    differ only at the end (..._part1, ..._part2) stay apart."""
    stem = trace.removesuffix(Path(trace).suffix)
    if len(stem) <= width:
        return stem
    head = (width - 1) // 2
    return f"{stem[:head]}…{stem[-(width - 1 - head):]}"


def _plot_tiered(results: Sequence[ReplayResult], path: str) -> None:
    plt = _pyplot()
    labels = [f"{literal_label(_short_stem(r.trace))}\n{r.capacity_blocks:,}/{r.host_blocks:,}/{r.disk_blocks:,}"
              for r in results]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(results) + 2), 4.5))
    # One position per result: bars placed by their labels stacked two results whose labels are equal
    # (traces whose names share the first 18 characters) on one spot.
    positions = list(range(len(results)))
    bottom = [0.0] * len(results)
    for tier, colour in (("device", "#1f77b4"), ("host", "#ff7f0e"), ("disk", "#2ca02c")):
        values = [(r.hit_ratio_by_tier or {}).get(tier, 0.0) for r in results]
        ax.bar(positions, values, bottom=bottom, label=f"{tier} tier", color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(positions, labels)
    top = min(1.0, max([*bottom, 0.1]) * 1.25)
    for x, total in enumerate(bottom):
        ax.text(x, total + 0.02 * top, f"{total:.3f}", ha="center")
    ax.set_ylabel("hit ratio (blocks hit / blocks requested)")
    ax.set_xlabel("trace, device/host/disk capacity (512-token blocks)")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, top)
    ax.set_title(f"Tiered prefix-cache hits by tier ({results[0].policy if results else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=image_format(path))
    plt.close(fig)


def _trace_names(paths: Sequence[Path]) -> list[str]:
    """Each trace's name in the rows and plots: its file name, or the path as given when another trace
    has the same file name (a/trace.jsonl, b/trace.jsonl), so no two traces share a row label or a curve."""
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


def _output_problem(value: str | None) -> str | None:
    """Why an output path cannot be written (empty, a directory, in a missing directory), or None."""
    if value is None:
        return None
    path = Path(value)
    if not value:
        return "empty path"
    if path.is_dir():
        return "is a directory"
    if not path.parent.is_dir():
        return f"directory {str(path.parent)!r} does not exist"
    return None


def _replay_command(args: argparse.Namespace) -> int:
    from sagellm_kv_cache.replay import TraceError, load_trace, replay_many, replay_tiered, sample_trace_path

    paths = [Path(p) for p in args.traces] or [sample_trace_path()]
    tiered = bool(args.host_blocks or args.disk_blocks)
    for option, value in (("--json", args.json), ("--plot", args.plot)):
        problem = _output_problem(value)
        if problem:  # now, not after a replay that may take minutes
            print(f"sagellm-kv: {option} {value!r}: {problem}", file=sys.stderr)
            return 2
    if args.plot is not None:
        try:
            _pyplot()  # before the replay: a missing matplotlib is reported now, not after the whole run
        except RuntimeError as exc:
            print(f"sagellm-kv: {exc}", file=sys.stderr)
            return 2
        try:
            image_format(args.plot)  # the suffix names the format; none: a PNG
        except ValueError as exc:
            print(f"sagellm-kv: --plot {exc}", file=sys.stderr)
            return 2
    try:
        traces = [(name, load_trace(p)) for name, p in zip(_trace_names(paths), paths, strict=True)]
        if tiered:
            if any(c is None for c in args.capacity_blocks):
                raise ValueError("a tiered replay needs bounded device capacities (--capacity-blocks N[,M...])")
            results = [replay_tiered(reqs, int(cap or 0), args.host_blocks, args.disk_blocks, policy=args.policy,
                                     block_bytes=args.block_bytes, disk_dir=args.disk_dir,
                                     direct_io=not args.buffered_io, trace_name=name)
                       for name, reqs in traces for cap in args.capacity_blocks]
        else:
            results = replay_many(traces, args.capacity_blocks, args.policy)
    except TraceError as exc:
        print(f"sagellm-kv: {exc}", file=sys.stderr)
        return 2
    except KVMetadataMismatchError as exc:
        directory = exc.context.get("directory") if isinstance(exc.context, dict) else None
        where = f"--disk-dir {directory!r} holds a disk tier written with other settings: " if directory else ""
        print(f"sagellm-kv: {where}{exc}", file=sys.stderr)
        return 2
    except (KVCacheError, ValueError) as exc:
        print(f"sagellm-kv: {exc}", file=sys.stderr)
        return 2
    rows = [r.to_dict() for r in results]
    if tiered:
        _print_tiered_table(rows)
    else:
        _print_table(rows)
    try:
        if args.json is not None:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        if args.plot is not None:
            (_plot_tiered if tiered else _plot)(results, args.plot)
    except (OSError, RuntimeError) as exc:
        print(f"sagellm-kv: cannot write output: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sagellm_kv_cache._version import __version__

    parser = _OneLineParser(prog="sagellm-kv", description="sagellm-kv-cache tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Named in the usage error without a command ("required: command" did not say which there are).
    sub = parser.add_subparsers(dest="command", required=True, metavar="{replay}")
    rp = sub.add_parser("replay", help="replay Mooncake-format traces through the prefix cache and pool")
    rp.add_argument("traces", nargs="*", metavar="TRACE", help="JSONL trace files (default: the bundled sample)")
    rp.add_argument("--capacity-blocks", type=_capacities, default=_capacities("1000,10000,inf"),
                    help="comma-separated capacities in 512-token blocks; 'inf' for unbounded (default 1000,10000,inf)")
    rp.add_argument("--policy", choices=POLICIES, default="lru", help="eviction policy (default lru)")
    rp.add_argument("--host-blocks", type=_count, default=0,
                    help="host tier capacity in blocks: enables the tiered replay (--capacity-blocks is then "
                         "the device tier)")
    rp.add_argument("--disk-blocks", type=_count, default=0, help="disk tier capacity in blocks (tiered replay)")
    rp.add_argument("--disk-dir", metavar="DIR",
                    help="disk tier directory (default: a temporary one, removed); a tier an earlier run left "
                         "there is reopened, so its blocks are hits from the first request")
    rp.add_argument("--block-bytes", type=_count, default=4096,
                    help="real bytes per block moved between tiers, a multiple of 1024 (default 4096)")
    rp.add_argument("--buffered-io", action="store_true", help="disk tier without O_DIRECT")
    rp.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    rp.add_argument("--plot", metavar="PATH",
                    help="also draw hit ratio against capacity into an image, its format named by its suffix (PNG "
                         "without one)")
    rp.set_defaults(func=_replay_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (130, with one line on stderr, on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("sagellm-kv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
