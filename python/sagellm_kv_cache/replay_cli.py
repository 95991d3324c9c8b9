"""``sagellm-kv``: command-line entry point; ``sagellm-kv replay`` is the main job.

    sagellm-kv replay                                   # the sample trace shipped in the package
    sagellm-kv replay trace.jsonl --capacity-blocks 1000,10000,inf --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm_kv_cache.errors import KVCacheError

if TYPE_CHECKING:
    from sagellm_kv_cache.replay import ReplayResult

POLICIES = ("lru", "fifo", "priority", "ttl")


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
        if value <= 0:
            raise argparse.ArgumentTypeError(f"capacity must be > 0, got {value}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no capacity given")
    return out


def _print_table(rows: Sequence[dict[str, object]]) -> None:
    header = (f"{'trace':<32} {'capacity':>9} {'policy':>8} {'requests':>9} {'blocks':>9} {'hits':>9} "
              f"{'hit ratio':>9} {'evictions':>9} {'req/s':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cap = "inf" if r["capacity_blocks"] is None else str(r["capacity_blocks"])
        print(f"{r['trace']!s:<32} {cap:>9} {r['policy']!s:>8} {r['requests']:>9} {r['blocks']:>9} {r['hits']:>9} "
              f"{r['hit_ratio']:>9.3f} {r['evictions']:>9} {r['requests_per_s']:>9.0f}")


def _plot(results: Sequence[ReplayResult], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'isagellm-kv-cache[visualization]'") from None
    bounded = sorted({r.capacity_blocks for r in results if r.capacity_blocks is not None})
    # "unbounded" is drawn one step beyond the largest capacity on the log axis.
    inf_x = bounded[-1] * 4 if bounded else 1

    def x_of(r: ReplayResult) -> int:
        return inf_x if r.capacity_blocks is None else r.capacity_blocks

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trace in dict.fromkeys(r.trace for r in results):
        mine = sorted((r for r in results if r.trace == trace), key=x_of)
        ax.plot([x_of(r) for r in mine], [r.hit_ratio for r in mine], marker="o", label=trace)
    ax.set_xscale("log")
    ticks = [*bounded, inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["unbounded" if t == inf_x else f"{t:,}" for t in ticks], rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("prefix-cache capacity (512-token blocks)")
    ax.set_ylabel("hit ratio (blocks hit / blocks requested)")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Prefix-cache hit ratio vs capacity ({results[0].policy if results else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _replay_command(args: argparse.Namespace) -> int:
    from sagellm_kv_cache.replay import TraceError, load_trace, replay_many, sample_trace_path

    paths = [Path(p) for p in args.traces] or [sample_trace_path()]
    try:
        traces = [(p.name, load_trace(p)) for p in paths]
        results = replay_many(traces, args.capacity_blocks, args.policy)
    except TraceError as exc:
        print(f"sagellm-kv: {exc}", file=sys.stderr)
        return 2
    except (KVCacheError, ValueError) as exc:
        print(f"sagellm-kv: {exc}", file=sys.stderr)
        return 2
    rows = [r.to_dict() for r in results]
    _print_table(rows)
    try:
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        if args.plot:
            _plot(results, args.plot)
    except (OSError, RuntimeError) as exc:
        print(f"sagellm-kv: cannot write output: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagellm-kv", description="sagellm-kv-cache tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="replay Mooncake-format traces through the prefix cache and pool")
    rp.add_argument("traces", nargs="*", metavar="TRACE", help="JSONL trace files (default: the bundled sample)")
    rp.add_argument("--capacity-blocks", type=_capacities, default=_capacities("1000,10000,inf"),
                    help="comma-separated capacities in 512-token blocks; 'inf' for unbounded (default 1000,10000,inf)")
    rp.add_argument("--policy", choices=POLICIES, default="lru", help="eviction policy (default lru)")
    rp.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    rp.add_argument("--plot", metavar="PATH", help="also draw hit ratio against capacity into a PNG")
    rp.set_defaults(func=_replay_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
