"""Shared helpers of the benchmarks: timing, result rows, the table printer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    """One benchmark line: our figure, the reference's figure, and how they compare."""

    workload: str
    metric: str
    ours: float
    reference: float
    reference_name: str
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """How many times better ours is (>1 means faster/higher than the reference)."""
        if self.higher_is_better:
            return self.ours / self.reference if self.reference else float("inf")
        return self.reference / self.ours if self.ours else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """Smallest wall time of ``repeats`` runs: the least disturbed by a noisy machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def print_table(rows: list[Row]) -> None:
    """The rows as aligned columns: each text column as wide as its longest entry."""
    name_width = max([34, *(len(r.workload) for r in rows)])
    metric_width = max([16, *(len(r.metric) for r in rows)])
    header = (f"{'workload':<{name_width}} {'metric':<{metric_width}} {'ours':>12} {'reference':>12} {'ratio':>8}"
              "  reference is")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.workload:<{name_width}} {r.metric:<{metric_width}} {r.ours:>12.3f} {r.reference:>12.3f} "
              f"{r.ratio:>7.2f}x  {r.reference_name}")


def write_json(rows: list[Row], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([r.to_dict() for r in rows], f, indent=2)
