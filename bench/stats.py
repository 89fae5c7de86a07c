"""Percentiles and medians (no numpy needed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median_figures(runs: Sequence[dict[str, object]]) -> dict[str, object]:
    """Per key: the median of the numeric values over the runs (None if a run had none).

    A figure missing (None) in any run makes the median None only if it is missing in most runs;
    otherwise the median is over the runs that have it.
    """
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run if k not in keys)
    out: dict[str, object] = {}
    for key in keys:
        values = [run.get(key) for run in runs]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and len(numbers) * 2 > len(values):
            med = statistics.median(numbers)
            out[key] = round(med, 3) if isinstance(med, float) else med
        elif numbers:
            out[key] = None
        else:
            present = [v for v in values if v is not None]
            out[key] = present[0] if present else None
    return out
