"""Is a difference between two models on the same cases real? Paired tests on per-case pass/fail.

- Exact McNemar: under "no difference", each discordant case (one passes, the other fails) is a fair coin, so the
  count of regressions among the discordant cases is Binomial(b + c, 1/2); the two-sided p-value is
  min(1, 2 · P(X ≤ min(b, c))). Exact, because eval suites are small and the chi-square approximation is poor there.
- Bootstrap CI of the accuracy delta: resample cases (pairs stay together), percentile interval, seeded so the
  same results give the same interval.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` regressions and `c` improvements."""
    n = b + c
    if n == 0:
        return 1.0
    # Exact integer arithmetic: sum of C(n, k) for k <= min(b, c), over 2^n; no float underflow at large n.
    term, tail = 1, 1
    for k in range(min(b, c)):
        term = term * (n - k) // (k + 1)
        tail += term
    return min(1.0, float(Fraction(2 * tail, 2 ** n)))


def bootstrap_delta_ci(baseline: Sequence[bool], candidate: Sequence[bool], *, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of accuracy(candidate) − accuracy(baseline) over case resamples."""
    base = np.asarray(baseline, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if base.shape != cand.shape or base.ndim != 1:
        raise ValueError("baseline and candidate must be paired 1-D sequences")
    if len(base) == 0:
        return (0.0, 0.0)
    # Per-case differences are -1, 0 or +1, so a resample's mean depends only on how many of each it drew:
    # drawing those counts from a multinomial is the same bootstrap in O(n_boot) memory, whatever the suite size.
    n = len(base)
    diff = cand - base
    probs = [(diff > 0).sum() / n, (diff < 0).sum() / n]
    probs.append(max(0.0, 1.0 - probs[0] - probs[1]))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, probs, size=n_boot)
    deltas = (counts[:, 0] - counts[:, 1]) / n
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(deltas, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))
