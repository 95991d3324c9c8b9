"""Access-pattern profiling: record block accesses, export them, plot them.

``visualize`` imports matplotlib only when a plot is drawn, so this package imports without the
``visualization`` extra.
"""

from sagellm_kv_cache.profiling.access_stats import TIME_WINDOWS, AccessStatsCollector
from sagellm_kv_cache.profiling.visualize import PLOT_TYPES, StatsFileError, format_summary, load_stats, visualize

__all__ = [
    "PLOT_TYPES",
    "TIME_WINDOWS",
    "AccessStatsCollector",
    "StatsFileError",
    "format_summary",
    "load_stats",
    "visualize",
]
