"""Latency summaries for benchmarks, load tests and tests: one percentile rule everywhere.

    percentile([3.0, 1.0, 2.0], 0.5)   # 2.0; None for no samples
"""
from __future__ import annotations

import statistics
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The sample at quantile `q` (0..1) of the sorted values, nearest rank on (n - 1): q = 0.5
    of an odd count is its median, q = 1 its maximum. None when there are no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def median(values: Iterable[float]) -> float | None:
    """The median (the mean of the middle two for an even count); None for no values."""
    xs = list(values)
    return statistics.median(xs) if xs else None
