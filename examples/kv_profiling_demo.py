"""Record a realistic KV-cache access pattern and export it as JSON.

Same as ``sage-kv-stats demo``: replays a Zipf-skewed workload over shared prompt prefixes through
the real :class:`sagellm_kv_cache.prefix_cache.PrefixCache`, records every block lookup as a hit or
miss, and writes the statistics file that ``scripts/visualize_access_pattern.py`` plots.

    python examples/kv_profiling_demo.py --num-accesses 500 --output stats.json
"""

from __future__ import annotations

import sys

from sagellm_kv_cache.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
