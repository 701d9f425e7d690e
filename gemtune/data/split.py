"""The frozen eval split and its lock file.

The eval set is drawn once, stratified by task (and label when present) and deterministic by content hash: the
same rows always give the same eval set, independent of input order. `eval.lock.json` lists its ids and content
hashes; a later build given the lock (`--eval-lock`) takes exactly those rows as eval — from a larger, reordered
input too — and refuses to go on if any of them is missing or changed, unless the user asks to re-freeze.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from gemtune.errors import UserError

LOCK_VERSION = 1


def rank_key(sha: str, seed: int) -> str:
    """Deterministic pseudo-random order of rows: a hash of the content hash and the seed."""
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def group_of(task: str, label: Optional[str]) -> str:
    return task if label is None else f"{task}/{label}"


def stratified_split(rows: Sequence[tuple[str, Optional[str], str, Optional[str]]], fraction: float, seed: int = 0) -> set[int]:
    """Indices (into `rows`) of the eval set.

    `rows` are (task, label, sha256, pinned split or None). Quotas per task/label group follow the largest
    remainder method, so the overall eval share is round(fraction × n) exactly and every group gets its fair
    share; rows pinned to `eval` always go to eval, rows pinned to `train` never do.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    forced: set[int] = set()
    for i, (task, label, sha, pin) in enumerate(rows):
        if pin == "eval":
            forced.add(i)
        elif pin != "train":
            groups[group_of(task, label)].append(i)
    free_total = sum(len(v) for v in groups.values())
    want = max(0, round(fraction * len(rows)) - len(forced))
    want = min(want, free_total)
    if not want:
        return forced
    ideal = {g: want * len(v) / free_total for g, v in groups.items()}
    quota = {g: math.floor(x) for g, x in ideal.items()}
    left = want - sum(quota.values())
    # Largest remainders first; ties broken by group name so the result never depends on dict order.
    for g in sorted(ideal, key=lambda g: (-(ideal[g] - quota[g]), g))[:left]:
        quota[g] += 1
    chosen = set(forced)
    for g, idx in groups.items():
        ordered = sorted(idx, key=lambda i: rank_key(rows[i][2], seed))
        chosen.update(ordered[:quota[g]])
    return chosen


def make_lock(eval_records: list[dict], fraction: float, eval_bytes: bytes) -> dict:
    """The lock: every eval id with its content hash, plus the hash of eval.jsonl as written. No timestamps, so
    rebuilding with the lock writes a byte-identical lock."""
    return {
        "version": LOCK_VERSION,
        "fraction": fraction,
        "count": len(eval_records),
        "eval_sha256": hashlib.sha256(eval_bytes).hexdigest(),
        "rows": [{"id": r["id"], "sha256": r["sha256"]} for r in eval_records],
    }


def read_lock(path: str | Path) -> dict:
    p = Path(path)
    try:
        lock = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("eval lock not found", file=str(p), field="--eval-lock") from None
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable eval lock: {e}", file=str(p), field="--eval-lock") from None
    rows = lock.get("rows") if isinstance(lock, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("id"), str)
                                             and isinstance(r.get("sha256"), str) for r in rows):
        raise UserError("not an eval lock: expected {\"rows\": [{\"id\", \"sha256\"}, ...]}", file=str(p), field="rows")
    if lock.get("version", LOCK_VERSION) > LOCK_VERSION:
        raise UserError(f"eval lock version {lock['version']} is newer than this gemtune understands", file=str(p), field="version")
    return lock


def resolve_locked(lock: dict, lock_path: str, ids: Sequence[str], shas: Sequence[str]) -> list[int]:
    """Row indices of the locked eval rows, in lock order (the first row carrying each id).

    Any locked id missing from the input, or present with different content, stops the build: silently
    changing a frozen eval set is exactly what the lock exists to prevent.
    """
    first: dict[str, int] = {}
    for i, rid in enumerate(ids):
        first.setdefault(rid, i)
    missing, changed, out = [], [], []
    for r in lock["rows"]:
        i = first.get(r["id"])
        if i is None:
            missing.append(r["id"])
        elif shas[i] != r["sha256"]:
            changed.append(r["id"])
        else:
            out.append(i)
    if missing or changed:
        parts = []
        if missing:
            parts.append(f"{len(missing)} locked eval row(s) are not among the usable input rows (e.g. {', '.join(missing[:3])})")
        if changed:
            parts.append(f"{len(changed)} locked eval row(s) changed content (e.g. {', '.join(changed[:3])})")
        raise UserError("; ".join(parts) + ". Restore them, or pass --refreeze to draw a new eval set.",
                        file=lock_path, field="rows")
    return out
