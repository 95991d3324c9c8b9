"""Plot an exported access-statistics file (same as ``sage-kv-stats visualize``).

python scripts/visualize_access_pattern.py --input stats.json --type all --summary
python scripts/visualize_access_pattern.py -i stats.json -t heatmap -o heatmap.png
"""

from __future__ import annotations

import sys

from sagellm_kv_cache.cli import main

if __name__ == "__main__":
    sys.exit(main(["visualize", *sys.argv[1:]]))
