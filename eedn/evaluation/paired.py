"""Paired differences with confidence intervals: two policies measured on the same seeds (same backbone, same
splits, same head seed), compared seed by seed, so that what the seeds share cancels out.

A difference is reported as its mean over the pairs, the standard error and a Student-t interval with n − 1
degrees of freedom (docs/results.md uses 95 %). With three head seeds the interval is wide (t = 4.30): a
difference whose interval excludes 0 there is a clear one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """``a − b`` pair by pair: ``mean``, ``se``, ``ci`` ([low, high], None for a single pair), ``n`` and
    ``excludes_zero`` (the interval lies strictly on one side of 0)."""
    from scipy.stats import t as student_t

    if len(a) != len(b):
        raise ValueError(f"paired values must come in pairs, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    if n == 0:
        return {"mean": None, "se": None, "ci": None, "n": 0, "excludes_zero": False}
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "se": None, "ci": None, "n": 1, "excludes_zero": False}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(student_t.ppf((1 + confidence) / 2, n - 1)) * se
    low, high = mean - half, mean + half
    return {"mean": mean, "se": se, "ci": [low, high], "n": n, "excludes_zero": low > 0 or high < 0}


def mean_and_se(values: Sequence[float]) -> dict:
    """``mean`` and standard error ``se`` (None for fewer than two values) of one policy over seeds."""
    n = len(values)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "se": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "se": sd / math.sqrt(n), "n": n}
