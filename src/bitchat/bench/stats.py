"""Small statistics of a run: percentiles of a sorted sample."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[int], q: float) -> int | None:
    """The ``q``-th percentile (0-100) of an ascending sample, nearest-rank."""
    n = len(sorted_values)
    if not n:
        return None
    rank = max(1, min(n, math.ceil(q * n / 100)))
    return sorted_values[rank - 1]


def percentiles_ms(sorted_us: Sequence[int]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean, in milliseconds, of microsecond latencies."""
    out: dict[str, float | None] = {}
    for name, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0)):
        v = percentile(sorted_us, q)
        out[name] = None if v is None else round(v / 1000, 3)
    out["max"] = round(sorted_us[-1] / 1000, 3) if sorted_us else None
    out["mean"] = round(sum(sorted_us) / len(sorted_us) / 1000, 3) if sorted_us else None
    return out
