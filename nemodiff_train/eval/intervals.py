"""95 % confidence intervals of per-sample accuracy means (``eval.json``'s ``<metric>_ci95``).

A 0/1 metric (exact match, AST validity) gets the Wilson score interval of a binomial proportion: it
stays inside [0, 1] and is honest at 0 and 1, where the normal approximation collapses to a point. A
graded metric (token accuracy, in [0, 1]) gets the normal interval of a mean, clipped to [0, 1].
Half-width on 100 rows near 0.7: about ±0.09 (docs/embedded_tasks.md uses this to decide between
recipes: only differences larger than the intervals count).
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["Z95", "wilson_interval", "mean_interval", "metric_intervals"]

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``successes`` out of ``n`` trials."""
    if n <= 0:
        raise ValueError("an interval needs at least one sample")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """95 % interval of the mean of ``values`` (each in [0, 1]): Wilson when every value is 0 or 1, else the
    normal interval with the sample standard deviation, clipped to [0, 1]."""
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one sample")
    if all(v in (0, 1) for v in values):
        return wilson_interval(sum(values), n, z)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def metric_intervals(per_sample: list[dict[str, float]], names: Sequence[str]) -> dict[str, list[float]]:
    """``{"<name>_ci95": [low, high]}`` for every metric in ``names`` over the per-sample scores."""
    return {f"{k}_ci95": [round(x, 6) for x in mean_interval([m[k] for m in per_sample])] for k in names}
