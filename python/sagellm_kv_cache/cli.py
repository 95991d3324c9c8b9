"""``sage-kv-stats``: record a demo access pattern from the real prefix cache, and plot access stats.

::

    sage-kv-stats demo [--num-accesses/-n N] [--output/-o FILE] [--seed S]
    sage-kv-stats visualize|viz --input/-i FILE [--output/-o IMAGE]
                                [--type/-t heatmap|frequency|interval|all] [--summary/-s]

``demo`` replays a synthetic serving workload through :class:`sagellm_kv_cache.prefix_cache.PrefixCache`
and records every block lookup as a hit or a miss: requests pick one of a set of shared system
prompts with Zipf-skewed popularity (which prompts are popular drifts between three phases), add a
fresh user turn, and sometimes continue an earlier conversation. The cache is smaller than the
working set, so cold prompts get evicted. The pattern is therefore what a prefix cache really sees,
not random numbers; the seed makes it repeatable (wall-clock timings aside). ``--num-accesses`` is at
most ``MAX_DEMO_ACCESSES``: the demo keeps every access to export it, and a million lookups took a
minute, 400 MB of memory and a 150 MB stats file on a laptop-class machine.

``visualize`` draws the plots of :mod:`sagellm_kv_cache.profiling.visualize`; without ``--output`` it
writes ``<input stem>_<type>.png`` next to the input (``all`` is one image with the three plots). The
output's suffix names the image format (``.png``, ``.pdf``, ``.svg``, ...; PNG without one); one that
matplotlib cannot write is refused before the input is read.

Bad input (a missing or malformed file, an unknown plot type, a bad number) prints one line on stderr
and exits with status 2; a missing optional dependency or compiled core exits with status 1; Ctrl-C
prints one line and exits with status 130.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from sagellm_kv_cache._numbers import shown

__all__ = ["MAX_DEMO_ACCESSES", "build_parser", "demo_command", "main", "run_demo_workload", "visualize_command"]

PROG = "sage-kv-stats"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
MAX_DEMO_ACCESSES = 1_000_000


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


def _fail(message: str, status: int = EXIT_USAGE) -> int:
    # Newlines inside messages (e.g. from OSError) would break the one-line contract.
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _demo_accesses(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_DEMO_ACCESSES:
        raise argparse.ArgumentTypeError(f"at most {MAX_DEMO_ACCESSES}, got {value}")
    return value


# --- demo workload -----------------------------------------------------------------------------


def _block_label(block_hash: Any, index: int) -> str:
    """A short, stable block id for the stats file: the hash's hex prefix."""
    if isinstance(block_hash, (bytes, bytearray, memoryview)):
        return "blk_" + bytes(block_hash).hex()[:12]
    if isinstance(block_hash, int):
        return f"blk_{block_hash & (2**48 - 1):012x}"
    to_bytes = getattr(block_hash, "tobytes", None)  # a row of a numpy digest array
    if callable(to_bytes):
        return "blk_" + bytes(to_bytes()).hex()[:12]
    hex_method = getattr(block_hash, "hex", None)
    if callable(hex_method):
        return "blk_" + str(hex_method())[:12]
    return f"block_{index}"


class _ZipfSampler:
    """Draws ranks 0..n-1 with probability proportional to 1 / (rank + 1) ** s."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        weights = [1.0 / (rank + 1) ** s for rank in range(n)]
        self._cumulative = list(itertools.accumulate(weights))
        self._rng = rng

    def draw(self) -> int:
        point = self._rng.random() * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, point), len(self._cumulative) - 1)


def run_demo_workload(
    cache: Any,
    collector: Any,
    num_accesses: int,
    *,
    seed: int = 0,
    block_size: int = 16,
    num_prompts: int = 48,
    zipf_s: float = 1.1,
    vocab_size: int = 32_000,
) -> dict[str, int]:
    """Feeds requests through ``cache`` (a seed-API prefix cache) until ``num_accesses`` block
    lookups are recorded in ``collector``; returns request and block counts.

    A request's block at position i is a hit when the cache's longest cached prefix covers it.
    After the lookup the request's blocks are inserted (hits keep their block dicts, new blocks get
    fresh ids), as an engine does once prefill has computed them.
    """
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(block_size * rng.randint(2, 6))] for _ in range(num_prompts)]
    sampler = _ZipfSampler(num_prompts, zipf_s, rng)
    # Popularity drifts: each phase ranks the prompts differently, as traffic mixes change over a day.
    phase_rankings = [list(range(num_prompts))]
    for _ in range(2):
        ranking = list(range(num_prompts))
        rng.shuffle(ranking)
        phase_rankings.append(ranking)
    conversations: list[list[int]] = []
    next_block_id = 0
    recorded = requests = hits = 0

    while recorded < num_accesses:
        phase = min(recorded * len(phase_rankings) // num_accesses, len(phase_rankings) - 1)
        if conversations and rng.random() < 0.2:
            # A follow-up turn: the whole earlier conversation is the prefix.
            base = conversations[rng.randrange(len(conversations))]
        else:
            base = prompts[phase_rankings[phase][sampler.draw()]]
        turn = [rng.randrange(vocab_size) for _ in range(block_size * rng.randint(1, 2))]
        tokens = base + turn
        if len(tokens) <= block_size * 12:
            conversations.append(tokens)
            if len(conversations) > 64:
                conversations.pop(0)

        hashes = list(cache.compute_block_hashes(tokens))
        cached_blocks, _ = cache.lookup(hashes)
        num_hit = len(cached_blocks)
        for index, block_hash in enumerate(hashes):
            if recorded >= num_accesses:
                break
            collector.record_access(_block_label(block_hash, index), is_hit=index < num_hit)
            recorded += 1
            hits += index < num_hit
        new_blocks = [{"block_id": next_block_id + i} for i in range(len(hashes) - num_hit)]
        next_block_id += len(new_blocks)
        cache.insert(hashes, list(cached_blocks) + new_blocks)
        requests += 1

    return {"requests": requests, "block_lookups": recorded, "block_hits": hits}


def demo_command(args: argparse.Namespace) -> int:
    """``sage-kv-stats demo``: runs the workload through the real prefix cache and exports the stats."""
    num_accesses = getattr(args, "num_accesses", 500)
    output = Path(getattr(args, "output", "demo_stats.json"))
    seed = getattr(args, "seed", 0)
    if isinstance(num_accesses, bool) or not isinstance(num_accesses, int) or num_accesses <= 0:
        return _fail(f"--num-accesses must be a positive integer, got {num_accesses!r}")
    if num_accesses > MAX_DEMO_ACCESSES:
        return _fail(f"--num-accesses must be at most {MAX_DEMO_ACCESSES}, got {shown(num_accesses)}")
    if output.is_dir():
        return _fail(f"output {output} is a directory")
    if not output.parent.is_dir():
        return _fail(f"output directory {output.parent} does not exist")

    try:
        from sagellm_kv_cache.prefix_cache import PrefixCache
    except ImportError as err:
        return _fail(f"the prefix cache is unavailable (is the compiled core built?): {err}", EXIT_FAILURE)
    from sagellm_kv_cache.profiling.access_stats import AccessStatsCollector
    from sagellm_kv_cache.profiling.visualize import format_summary

    block_size = 16
    cache = PrefixCache(block_size=block_size, max_cached_blocks=160, enable_lru=True)
    # A finite trace of --num-accesses: keep all of it (the bounds are for a server's collector).
    collector = AccessStatsCollector(max_blocks=None, max_times_per_block=None, max_lifetimes=None)
    counts = run_demo_workload(cache, collector, num_accesses, seed=seed, block_size=block_size)
    try:
        collector.export_stats(output)
    except OSError as err:
        return _fail(f"cannot write {output}: {err.strerror or err}")

    print(f"Replayed {counts['requests']} requests ({counts['block_lookups']} block lookups) through PrefixCache")
    cache_stats = cache.get_stats() if hasattr(cache, "get_stats") else {}
    if isinstance(cache_stats, dict) and "evict_count" in cache_stats:
        cached = cache_stats.get("num_blocks", "?")
        print(f"  prefix cache: {cached} blocks cached, {cache_stats['evict_count']} evicted")
    print(format_summary(collector.to_dict(), top=5))
    print(f"Statistics written to {output}")
    return EXIT_OK


# --- visualize ---------------------------------------------------------------------------------


def visualize_command(args: argparse.Namespace) -> int:
    """``sage-kv-stats visualize``: loads an exported stats file and writes the requested plot."""
    from sagellm_kv_cache.profiling.visualize import (
        PLOT_TYPES,
        StatsFileError,
        format_summary,
        image_format,
        load_stats,
        visualize,
    )

    plot_type = getattr(args, "type", "heatmap")
    if plot_type not in PLOT_TYPES:
        return _fail(f"unknown plot type {plot_type!r}; choose one of {', '.join(PLOT_TYPES)}")
    given_output = getattr(args, "output", None)
    for option, value in (("--input", args.input), ("--output", given_output)):
        if value is not None and not str(value):
            return _fail(f"{option} is empty")
    source = Path(args.input)
    if not source.name:  # "." or "/": no file name to read, nor to derive the default output from
        return _fail(f"input {source} is a directory")
    output = Path(given_output) if given_output is not None else source.with_name(f"{source.stem}_{plot_type}.png")
    try:
        image_format(output)  # before any work, as sagellm-kv replay --plot does
    except ValueError as err:
        return _fail(f"--output {err}")
    except ImportError:
        pass  # a missing matplotlib is reported when plotting, after the input is checked
    try:
        stats = load_stats(source)
    except FileNotFoundError:
        return _fail(f"input file {source} not found")
    except IsADirectoryError:
        return _fail(f"input {source} is a directory")
    except StatsFileError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"cannot read {source}: {err.strerror or err}")

    if getattr(args, "summary", False):
        print(f"Access summary of {source}:")
        print(format_summary(stats))
    try:
        written = visualize(stats, output, plot_type)
    except ImportError as err:
        return _fail(str(err), EXIT_FAILURE)
    except OSError as err:
        return _fail(f"cannot write {output}: {err.strerror or err}")
    print(f"Wrote {plot_type} plot to {written}")
    return EXIT_OK


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from sagellm_kv_cache._version import __version__

    parser = _OneLineParser(prog=PROG, description="Record and plot KV-cache block access patterns.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,visualize}")

    demo = commands.add_parser("demo", help="replay a skewed workload through the prefix cache and export stats")
    demo.add_argument("--num-accesses", "-n", type=_demo_accesses, default=500,
                      help=f"block lookups to record (at most {MAX_DEMO_ACCESSES})")
    demo.add_argument("--output", "-o", default="demo_stats.json", help="JSON file to write (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="workload seed (default %(default)s)")
    demo.set_defaults(handler=demo_command)

    viz = commands.add_parser("visualize", aliases=["viz"], help="plot an exported stats file")
    viz.add_argument("--input", "-i", required=True, help="stats JSON written by export_stats or demo")
    viz.add_argument("--output", "-o", default=None,
                     help="image to write, its format named by its suffix (default: <input stem>_<type>.png)")
    viz.add_argument(
        "--type", "-t", default="heatmap", choices=["heatmap", "frequency", "interval", "all"], help="plot type"
    )
    viz.add_argument("--summary", "-s", action="store_true", help="also print the summary numbers")
    viz.set_defaults(handler=visualize_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
