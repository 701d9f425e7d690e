"""Generic instruction data mixed into train to keep the adapter from forgetting how to follow instructions.

Accepted formats: gemtune's own row format (JSONL/CSV/Parquet, same readers) and the self-instruct format
(`instruction` + `instances: [{input, output}]`, one training row per instance). Generic rows are tagged
`task: generic`, carry provenance (file, origin id), go through the same sanitising, PII redaction, token limit,
dedup and decontamination as domain rows, and never enter eval. The amount is a fraction of the *final* train
set: g = round(f · D / (1 − f)) for D domain train rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from gemtune.data.readers import RawRow, read_rows
from gemtune.data.split import rank_key

GENERIC_TASK = "generic"


def generic_count(domain_train: int, fraction: float) -> int:
    return round(fraction * domain_train / (1.0 - fraction))


def read_generic(path: str | Path) -> Iterator[RawRow]:
    """Rows of a generic file; self-instruct rows fan out into one row per instance (same file line)."""
    for row in read_rows(path):
        d = row.data
        if d is None or "instances" not in d:
            if d is not None:
                d = {**d, "task": GENERIC_TASK}
            yield RawRow(row.file, row.line, d, row.raw, row.error)
            continue
        inst = d.get("instances")
        if not isinstance(inst, list) or not inst:
            yield RawRow(row.file, row.line, None, row.raw, 'field "instances": must be a non-empty list')
            continue
        origin = d.get("id")
        for k, item in enumerate(inst):
            if not isinstance(item, dict):
                yield RawRow(row.file, row.line, None, row.raw, f'field "instances": item {k} is not an object')
                continue
            data = {"instruction": d.get("instruction"), "input": item.get("input"), "output": item.get("output"),
                    "task": GENERIC_TASK, "provenance": {"origin_id": f"{origin}#{k}" if origin is not None else f"line{row.line}#{k}"}}
            yield RawRow(row.file, row.line, data, row.raw)


def choose_generic(shas: Sequence[str], count: int, seed: int) -> list[int]:
    """Deterministic sample of `count` rows (by content hash), returned in their original order."""
    order = sorted(range(len(shas)), key=lambda i: rank_key(shas[i], seed + 7919))
    return sorted(order[:count])
