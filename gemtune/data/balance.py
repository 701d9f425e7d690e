"""Capping over-represented task variants and labels in train.

One queue with ten times the examples of the others teaches the model to answer that queue. Each task/label group
is capped at `multiple × median group size`; the rows kept are chosen by content hash (deterministic, unbiased
with respect to input order). Eval is never balanced: it must reflect the real distribution the lock froze.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Optional, Sequence

from gemtune.data.split import group_of, rank_key


def balance(rows: Sequence[tuple[str, Optional[str], str]], multiple: Optional[float], seed: int = 0) -> tuple[set[int], dict]:
    """(indices removed, report) for rows given as (task, label, sha256).

    The report holds the median, the cap and the per-group counts before and after.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (task, label, sha) in enumerate(rows):
        groups[group_of(task, label)].append(i)
    before = {g: len(v) for g, v in sorted(groups.items())}
    report: dict = {"multiple": multiple, "groups": len(groups), "before": before}
    if not groups or multiple is None:
        report.update(median=None, cap=None, after=dict(before), capped={})
        return set(), report
    median = statistics.median(before.values())
    cap = max(1, math.ceil(multiple * median))
    removed: set[int] = set()
    capped = {}
    for g, idx in groups.items():
        if len(idx) > cap:
            ordered = sorted(idx, key=lambda i: rank_key(rows[i][2], seed))
            removed.update(ordered[cap:])
            capped[g] = len(idx) - cap
    after = {g: min(n, cap) for g, n in before.items()}
    report.update(median=median, cap=cap, after=after, capped=dict(sorted(capped.items())))
    return removed, report
