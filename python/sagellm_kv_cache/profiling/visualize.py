"""Plots of an exported access-statistics file (:meth:`AccessStatsCollector.export_stats`).

Four plot types:

* ``heatmap``: the hottest blocks (rows, hottest on top) against time buckets (columns), colour =
  accesses per bucket; shows whether reuse is steady or comes in bursts and phases;
* ``frequency``: horizontal bars of the hottest blocks' access counts, sorted; shows the skew;
* ``interval``: histogram of the times between consecutive accesses of the same block, on a log
  axis when they span more than two decades; tells how long a block must survive to be reused;
* ``all``: one figure with the three above (heatmap on top, the other two below) and the summary
  numbers in its title, written to a single image.

Each plot is written in the image format its path's suffix names (``.png``, ``.pdf``, ``.svg``, ...:
:func:`image_format`), PNG for a path without one; a suffix matplotlib cannot write is a ``ValueError``
raised before anything is drawn.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state), so plotting works headless and from threads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm_kv_cache._numbers import is_finite_number

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_TYPES",
    "StatsFileError",
    "format_summary",
    "image_format",
    "literal_label",
    "load_stats",
    "plot_all",
    "plot_frequency",
    "plot_heatmap",
    "plot_interval",
    "terminal_text",
    "validate_stats",
    "visualize",
]

PLOT_TYPES: tuple[str, ...] = ("heatmap", "frequency", "interval", "all")

_SUMMARY_KEYS: dict[str, tuple[type, ...]] = {
    "total_accesses": (int,),
    "unique_blocks": (int,),
    "hit_rate": (int, float),
    "cache_hits": (int,),
    "cache_misses": (int,),
    "average_access_interval": (int, float),
    "duration_seconds": (int, float),
    "top_10_blocks": (list,),
    "access_intervals": (list,),
    "block_details": (dict,),
}

_DPI = 120


class StatsFileError(ValueError):
    """An access-statistics file that is not valid JSON or not in the exported shape."""


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "plotting access statistics needs matplotlib: pip install isagellm-kv-cache[visualization]"
        ) from err


def image_format(output_path: str | Path) -> str:
    """The format a plot written to ``output_path`` gets: its suffix, lower-cased (``"png"`` without one).

    ``ValueError`` naming the suffix when matplotlib cannot write it (``.txt``, ``.gz``, ...);
    ``ImportError`` without matplotlib.
    """
    _require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(output_path).suffix[1:].lower()
    if not suffix:
        return "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"{output_path}: unknown image format {suffix!r} (one of {', '.join(sorted(formats))})")
    return suffix


# --- loading -----------------------------------------------------------------------------------


def validate_stats(stats: object, source: str = "stats") -> dict[str, Any]:
    """Checks the exported shape; returns the dict or raises :class:`StatsFileError` naming the field."""
    if not isinstance(stats, dict):
        raise StatsFileError(f"{source}: top level must be a JSON object, got {type(stats).__name__}")
    for key, types in _SUMMARY_KEYS.items():
        if key not in stats:
            raise StatsFileError(f"{source}: missing key {key!r}")
        value = stats[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise StatsFileError(f"{source}: {key!r} has type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity
            raise StatsFileError(f"{source}: {key!r} must be finite, got {value}")
        # Counts and times (from a monotonic clock) are never negative; a rate is a fraction.
        if isinstance(value, int | float) and not 0 <= value <= (1 if key == "hit_rate" else math.inf):
            bounds = "in [0, 1]" if key == "hit_rate" else ">= 0"
            raise StatsFileError(f"{source}: {key!r} must be {bounds}, got {value}")
    for block_id, detail in stats["block_details"].items():
        where = f"{source}: block_details[{block_id!r}]"
        if not isinstance(detail, dict):
            raise StatsFileError(f"{where} must be an object")
        count = detail.get("access_count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise StatsFileError(f"{where}.access_count must be an int >= 1, got {count!r}")
        for key in ("first_access", "last_access"):
            if not is_finite_number(detail.get(key)):
                raise StatsFileError(f"{where}.{key} must be a number, got {detail.get(key)!r}")
        intervals = detail.get("intervals")
        if not isinstance(intervals, list) or not all(_is_gap(gap) for gap in intervals):
            raise StatsFileError(f"{where}.intervals must be a list of numbers >= 0")
        # fewer when the collector kept only a block's most recent access times (max_times_per_block)
        if len(intervals) > count - 1:
            raise StatsFileError(f"{where} has {len(intervals)} intervals for {count} accesses")
        if not all(math.isfinite(t) for t in _recorded_times(detail)):
            raise StatsFileError(f"{where}: its access times overflow (last_access less its intervals)")
    if not all(_is_gap(gap) for gap in stats["access_intervals"]):
        raise StatsFileError(f"{source}: 'access_intervals' must be a list of numbers >= 0")
    return stats


def _is_gap(value: object) -> bool:
    """A time between two accesses: a finite number >= 0 (the collector's clock is monotonic)."""
    return is_finite_number(value) and value >= 0  # type: ignore[operator]


def load_stats(path: str | Path) -> dict[str, Any]:
    """Reads and validates an exported file (``FileNotFoundError`` / :class:`StatsFileError`)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")  # a leading byte-order mark (Windows editors) is not JSON
    except UnicodeDecodeError as err:
        raise StatsFileError(f"{file}: not a UTF-8 text file") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise StatsFileError(f"{file}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except RecursionError:
        raise StatsFileError(f"{file}: JSON nested too deeply") from None
    except ValueError as err:  # an integer of more digits than int() reads (4300)
        raise StatsFileError(f"{file}: {err}") from None
    return validate_stats(data, str(file))


# --- derived data ------------------------------------------------------------------------------


def _ranked_blocks(stats: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    details: dict[str, dict[str, Any]] = stats["block_details"]
    return sorted(details.items(), key=lambda item: (-item[1]["access_count"], item[1]["first_access"], item[0]))


def _recorded_times(detail: Mapping[str, Any]) -> list[float]:
    """The block's recorded access times, oldest first: back from ``last_access`` by its intervals. A
    bounded collector keeps only the most recent times, so the oldest may come after ``first_access``."""
    times = [float(detail["last_access"])]
    for gap in reversed(detail["intervals"]):
        times.append(times[-1] - float(gap))
    times.reverse()
    return times


def _access_times(detail: Mapping[str, Any]) -> list[float]:
    first = float(detail["first_access"])
    return [max(t, first) for t in _recorded_times(detail)]  # never before the first access by rounding


def _time_unit(span: float) -> tuple[str, float]:
    """A unit that keeps tick labels short for a span in seconds."""
    if span >= 1.0:
        return "s", 1.0
    if span >= 1e-3:
        return "ms", 1e3
    return "µs", 1e6


def literal_label(text: str) -> str:
    """``text`` as matplotlib should draw it: each ``$`` escaped, so a block id or file name holding a pair
    is not typeset as mathtext (``blk_$x^2$``) or, when that is not valid mathtext, fails the whole plot."""
    return text.replace("$", r"\$")


def _short(block_id: str, width: int = 18) -> str:
    return literal_label(block_id if len(block_id) <= width else block_id[: width - 1] + "…")


def _format_seconds(seconds: float) -> str:
    unit, scale = _time_unit(seconds)
    return f"{seconds * scale:.3g} {unit}"


def terminal_text(text: str) -> str:
    """``text`` safe to print to a terminal: each non-printable character (escape and other control
    characters, bidirectional overrides, line separators) as ``repr`` writes it (``\\x1b``,
    ``\\u202e``); printable text is unchanged."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def format_summary(stats: Mapping[str, Any], top: int = 10) -> str:
    """A few aligned lines of the headline numbers, for a terminal. Block ids come from a stats file
    that anyone may have written: they are printed through :func:`terminal_text`, so an escape
    sequence in one is shown, not sent to the terminal."""
    total = stats["total_accesses"]
    lines = [
        f"  total accesses        {total}",
        f"  unique blocks         {stats['unique_blocks']}",
        f"  hit rate              {stats['hit_rate']:.2%} ({stats['cache_hits']} hits, {stats['cache_misses']} misses)",
        f"  avg re-access gap     {_format_seconds(stats['average_access_interval'])}",
        f"  recorded over         {_format_seconds(stats['duration_seconds'])}",
    ]
    ranked = [(terminal_text(block_id), detail) for block_id, detail in _ranked_blocks(stats)[:top]]
    if ranked:
        lines.append(f"  hottest blocks (of {len(stats['block_details'])}):")
        width = max(len(label) for label, _ in ranked)
        for rank, (label, detail) in enumerate(ranked, start=1):
            share = detail["access_count"] / total if total else 0.0
            lines.append(f"    {rank:>2}. {label:<{width}}  {detail['access_count']:>6}  ({share:.1%})")
    return "\n".join(lines)


# --- drawing -----------------------------------------------------------------------------------


def _empty(ax: Axes, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_heatmap(fig: Figure, ax: Axes, stats: Mapping[str, Any], top_n: int, num_buckets: int) -> None:
    import numpy as np

    ranked = _ranked_blocks(stats)[:top_n]
    title = f"Block access heatmap (top {len(ranked)} of {len(stats['block_details'])} blocks)"
    if not ranked:
        _empty(ax, title, "no accesses recorded")
        return
    rows = [_access_times(detail) for _, detail in ranked]
    # From the first access of any block, not from the collector's start: whatever ran before the first
    # access (the demo's prompt generation, a server's idle start) drew an empty band, most of the plot
    # when the machine was busy.
    t_start = min(float(detail["first_access"]) for detail in stats["block_details"].values())
    t_end = max(max(times) for times in rows)
    span = t_end - t_start if t_end > t_start else 1e-6
    unit, scale = _time_unit(span)
    edges = np.linspace(t_start, t_start + span, num_buckets + 1)
    counts = np.vstack([np.histogram(np.asarray(times), bins=edges)[0] for times in rows])
    import matplotlib

    # Empty buckets white, so the eye goes to where accesses are.
    cmap = matplotlib.colormaps["magma_r"].with_extremes(under="white")
    image = ax.imshow(
        counts,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        extent=(0.0, span * scale, len(rows), 0.0),
        vmin=0.5,  # counts are integers: each one gets a band centred on its tick
        vmax=float(counts.max()) + 0.5,
    )
    ax.set_yticks(np.arange(len(rows)) + 0.5)
    ax.set_yticklabels([_short(block_id) for block_id, _ in ranked], fontsize=7 if len(rows) > 20 else 9)
    ax.set_xlabel(f"time since the first access ({unit}), {num_buckets} buckets of "
                  f"{_format_seconds(span / num_buckets)}")
    ax.set_ylabel("block (hottest on top)")
    ax.set_title(title)
    colorbar = fig.colorbar(image, ax=ax, pad=0.01, extend="min")
    colorbar.set_label("accesses per bucket (white: none)")
    from matplotlib.ticker import MaxNLocator

    colorbar.locator = MaxNLocator(integer=True, min_n_ticks=1)
    colorbar.update_ticks()


def _draw_frequency(ax: Axes, stats: Mapping[str, Any], top_n: int) -> None:
    ranked = _ranked_blocks(stats)[:top_n]
    total = stats["total_accesses"]
    title = f"Access frequency (top {len(ranked)} of {len(stats['block_details'])} blocks)"
    if not ranked:
        _empty(ax, title, "no accesses recorded")
        return
    counts = [detail["access_count"] for _, detail in ranked]
    positions = list(range(len(ranked)))
    bars = ax.barh(positions, counts, color="tab:blue", height=0.75)
    ax.invert_yaxis()  # hottest on top
    ax.set_yticks(positions)
    ax.set_yticklabels([_short(block_id) for block_id, _ in ranked], fontsize=7 if len(ranked) > 20 else 9)
    ax.bar_label(bars, labels=[str(count) for count in counts], padding=2, fontsize=7)
    ax.set_xlim(0, max(counts) * 1.12)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("accesses")
    ax.set_ylabel("block")
    shown = sum(counts)
    share = shown / total if total else 0.0
    ax.set_title(f"{title}\nthese blocks take {share:.1%} of {total} accesses", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _draw_interval(ax: Axes, stats: Mapping[str, Any], bins: int) -> None:
    import numpy as np

    gaps = np.asarray([float(gap) for gap in stats["access_intervals"]], dtype=float)
    title = "Re-access intervals (same block)"
    if gaps.size == 0:
        _empty(ax, title, "no block was accessed twice")
        return
    unit, scale = _time_unit(float(gaps.max()) if gaps.max() > 0 else 1e-6)
    scaled = gaps * scale
    positive = scaled[scaled > 0]
    wide = positive.size > 0 and positive.max() / positive.min() > 100.0
    if wide:
        edges = np.logspace(np.log10(positive.min()), np.log10(positive.max()), bins + 1)
        ax.hist(positive, bins=edges.tolist(), color="tab:green", edgecolor="white", linewidth=0.4)
        ax.set_xscale("log")
    else:
        ax.hist(scaled, bins=bins, color="tab:green", edgecolor="white", linewidth=0.4)
    median, mean = float(np.median(scaled)), float(scaled.mean())
    ax.axvline(max(median, positive.min() if wide else median), color="tab:red", linestyle="--",
               label=f"median {median:.3g} {unit}")  # fmt: skip
    ax.axvline(mean, color="black", linestyle=":", label=f"mean {mean:.3g} {unit}")
    ax.legend(fontsize=8)
    ax.set_xlabel(f"interval ({unit}{', log scale' if wide else ''})")
    ax.set_ylabel("number of re-accesses")
    ax.set_title(f"{title}: {gaps.size} intervals")
    ax.grid(alpha=0.3)


def _summary_line(stats: Mapping[str, Any]) -> str:
    return (
        f"{stats['total_accesses']} accesses to {stats['unique_blocks']} blocks, "
        f"hit rate {stats['hit_rate']:.1%}, recorded over {_format_seconds(stats['duration_seconds'])}"
    )


def _save(fig: Figure, output_path: str | Path, image: str) -> Path:
    path = Path(output_path)
    fig.savefig(path, dpi=_DPI, format=image)
    return path


def _new_figure(width: float, height: float) -> Figure:
    _require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_heatmap(stats: Mapping[str, Any], output_path: str | Path, top_n: int = 30, num_buckets: int = 60) -> Path:
    """Writes the heatmap image (:func:`image_format`) and returns its path."""
    image = image_format(output_path)
    fig = _new_figure(12, max(4.5, 0.22 * min(top_n, len(stats["block_details"])) + 2))
    _draw_heatmap(fig, fig.add_subplot(), stats, top_n, num_buckets)
    fig.suptitle(_summary_line(stats), fontsize=9, color="0.3")
    return _save(fig, output_path, image)


def plot_frequency(stats: Mapping[str, Any], output_path: str | Path, top_n: int = 30) -> Path:
    """Writes the access-frequency bar chart image (:func:`image_format`) and returns its path."""
    image = image_format(output_path)
    fig = _new_figure(10, max(4.5, 0.25 * min(top_n, len(stats["block_details"])) + 2))
    _draw_frequency(fig.add_subplot(), stats, top_n)
    return _save(fig, output_path, image)


def plot_interval(stats: Mapping[str, Any], output_path: str | Path, bins: int = 50) -> Path:
    """Writes the interval histogram image (:func:`image_format`) and returns its path."""
    image = image_format(output_path)
    fig = _new_figure(10, 6)
    _draw_interval(fig.add_subplot(), stats, bins)
    return _save(fig, output_path, image)


def plot_all(stats: Mapping[str, Any], output_path: str | Path, top_n: int = 30) -> Path:
    """Writes one image (:func:`image_format`) with the heatmap on top and the frequency and interval plots
    below, and returns its path."""
    image = image_format(output_path)
    fig = _new_figure(16, 13)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.15, 1.0])
    _draw_heatmap(fig, fig.add_subplot(grid[0, :]), stats, top_n, 60)
    _draw_frequency(fig.add_subplot(grid[1, 0]), stats, min(top_n, 20))
    _draw_interval(fig.add_subplot(grid[1, 1]), stats, 50)
    fig.suptitle(f"KV cache access pattern: {_summary_line(stats)}", fontsize=13)
    return _save(fig, output_path, image)


def visualize(stats: Mapping[str, Any], output_path: str | Path, plot_type: str = "heatmap") -> Path:
    """Dispatches on ``plot_type`` (one of :data:`PLOT_TYPES`); an unknown type is a ``ValueError``."""
    if plot_type == "heatmap":
        return plot_heatmap(stats, output_path)
    if plot_type == "frequency":
        return plot_frequency(stats, output_path)
    if plot_type == "interval":
        return plot_interval(stats, output_path)
    if plot_type == "all":
        return plot_all(stats, output_path)
    raise ValueError(f"unknown plot type {plot_type!r}; choose one of {', '.join(PLOT_TYPES)}")
