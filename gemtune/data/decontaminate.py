"""Keeping the frozen eval set out of train.

A row whose key duplicates an eval row exactly or nearly (the dedup definition: Jaccard ≥ 0.8 on 5-gram
shingles) must not train the model, or eval measures memory instead of skill. With an eval lock, eval rows are
registered first and every other row is checked against them before dedup; without one, dedup already keeps
near-duplicates apart, and this pass covers what dedup cannot see: rows of other tasks when dedup is scoped per
task, and the generic mix.
"""

from __future__ import annotations

from typing import Sequence

from gemtune.data.dedup import NearDup


def register_eval(nd: NearDup, eval_rows: Sequence[int]) -> None:
    if len(eval_rows):
        nd.add_eval(list(eval_rows))


def decontaminate(nd: NearDup, rows: Sequence[int]) -> dict[int, tuple[int, float]]:
    """{row: (eval row it duplicates, jaccard)} for the given rows; eval rows must be registered first."""
    return nd.match_eval_many(list(rows))
