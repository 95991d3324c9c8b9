"""Runs the benchmarks and prints a table of ratios against same-process Python references.

    python benchmarks/run.py                 # every workload that is available
    python benchmarks/run.py --only W1,W4 --json results.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# numpy's OpenBLAS starts spinning worker threads at import; on a 2-core machine they steal the core
# the measured code runs on. Nothing here uses BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, print_table, write_json

WORKLOADS = {
    "W1": "w1_alloc",
    "W2": "w2_prefix",
    "W3": "w3_prefix_lru",
    "W4": "w4_gather",
    "W5": "w5_transfer",
    "STEP": "w6_step",
    "W7": "w7_tiers",
    "W8": "w8_vllm_offload",  # needs vLLM (VLLM_TARGET_DEVICE=cpu on a machine without a GPU); skipped without it
    "W9": "w9_gpu_copies",  # host<->GPU copies of the vLLM tier's worker; skipped without CUDA
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W4")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    args = parser.parse_args(argv)
    wanted = [w.strip().upper() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    unknown = [w for w in wanted if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    rows: list[Row] = []
    for name in wanted:
        module_name = WORKLOADS[name]
        if not (Path(__file__).resolve().parent / f"{module_name}.py").exists():
            print(f"{name}: not available yet ({module_name}.py missing)", file=sys.stderr)
            continue
        rows.extend(importlib.import_module(module_name).run(quick=args.quick))
    print_table(rows)
    for r in rows:
        for key, value in r.extra.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"  {r.workload}: {key} = {shown}")
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
