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


def cpu_info() -> dict:
    """The CPU the numbers came from: model name, torch's kernel capability, native bf16, and any caps set on the
    kernel libraries (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_/FBGEMM_ENABLE_INSTRUCTIONS)."""
    from gemtune.base import device

    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                       "FBGEMM_ENABLE_INSTRUCTIONS") if os.environ.get(k)}
    flags = device.cpu_flags()
    return {"name": device.cpu_name(), "cores": os.cpu_count(), "capability": device.cpu_capability(),
            "native_bf16": device.cpu_has_native_bf16(), "kernel_caps": caps,
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps({**data, "machine": machine()}, indent=2) + "\n")
    return p
