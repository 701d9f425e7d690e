"""Shared helpers for benchmarks: datasets from ../shared/datasets, peak RSS, result files."""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = Path(os.environ.get("GEMTUNE_DATASETS", ROOT.parent / "shared" / "datasets"))
ROUTING_INSTRUCTION = ("Route this banking customer message to the support queue that should handle it. "
                       "Answer with the queue name only.")


def banking77_rows(split: str = "train") -> list[dict]:
    f = DATASETS / "banking77" / f"{split}.csv"
    if not f.is_file():
        raise SystemExit(f"banking77 not found at {f}; set GEMTUNE_DATASETS")
    with open(f, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def routing_records(rows: list[dict], n: int | None = None, seed: int = 0) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    rows = rows[:n] if n else rows
    return [{"id": f"b{i}", "task": "route", "label": r["category"],
             "messages": [{"role": "user", "content": f"{ROUTING_INSTRUCTION}\n\n{r['text']}"},
                          {"role": "assistant", "content": r["category"]}]} for i, r in enumerate(rows)]


def peak_rss_gib() -> float:
    """Peak resident memory of this process (VmHWM). Not ru_maxrss: Linux carries the forking parent's size
    across exec into it."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024 ** 2
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps({**data, "machine": machine()}, indent=2) + "\n")
    return p
