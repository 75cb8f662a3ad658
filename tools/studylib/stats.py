"""The study's statistics: t intervals over seeds, paired bootstrap intervals, equal compute.

With a handful of seeds the intervals are wide; they are reported as computed, never tightened.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

BOOTSTRAP_RESAMPLES = 10_000


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds (nan bounds for one seed)."""
    x = np.asarray(values, np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    half = float(sps.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - half, m + half


def bootstrap_ci(
    diffs, level: float = 0.95, *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float, float]:
    """(mean, low, high) of paired differences: percentile bootstrap over seeds. With n seeds
    there are only n^n distinct resamples, so for n = 3 the interval is coarse."""
    d = np.asarray(diffs, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def equal_compute_step(
    steps: list[int], other_steps: list[int], ratio: float, tol: float = 0.05
) -> tuple[int, int] | None:
    """The latest (s, t) with s in `steps`, t in `other_steps` and t / s within `tol` of
    `ratio` (a joint step costs `ratio` ict steps): the pair trained with equal compute."""
    best = None
    for s in steps:
        for t in other_steps:
            if s > 0 and abs(t / s - ratio) <= tol * ratio and (best is None or s > best[0]):
                best = (s, t)
    return best
