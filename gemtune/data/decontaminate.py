"""Keeping the frozen eval set, and any public benchmark the user names, out of the dataset.

A row whose key duplicates an eval row exactly or nearly (the dedup definition: Jaccard ≥ 0.8 on 5-gram
shingles) must not train the model, or eval measures memory instead of skill. With an eval lock, eval rows are
registered first and every other row is checked against them before dedup; without one, dedup already keeps
near-duplicates apart, and this pass covers what dedup cannot see: rows of other tasks when dedup is scoped per
task, and the generic mix.

Benchmarks (`data build --decontaminate FILE[:COLUMN]`, `data.decontaminate`): every row of every benchmark file is
read through the same readers (JSONL, CSV, Parquet); its text is the named column, else the first of
`DEFAULT_COLUMNS` the row has (for `messages`, the user turns). A domain, eval or generic row whose key (its input,
or its user turns) is an exact or near duplicate of any benchmark text, by the same definition and threshold as
dedup, is quarantined with the benchmark file and line: it would leak the benchmark into training or into the
frozen eval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gemtune.data.dedup import NearDup, normalise_key
from gemtune.data.readers import SUFFIXES, read_rows
from gemtune.errors import UserError
from gemtune.utils import sha256_file

DEFAULT_COLUMNS = ("prompt", "question", "text", "input", "instruction", "messages")


def register_eval(nd: NearDup, eval_rows: Sequence[int]) -> None:
    if len(eval_rows):
        nd.add_eval(list(eval_rows))


def decontaminate(nd: NearDup, rows: Sequence[int]) -> dict[int, tuple[int, float]]:
    """{row: (eval row it duplicates, jaccard)} for the given rows; eval rows must be registered first."""
    return nd.match_eval_many(list(rows))


# ------------------------------------------------------------------------------------------------ benchmarks
@dataclass
class Benchmark:
    """The texts of one benchmark file, each with its line, and what could not be read."""

    path: str
    column: Optional[str]
    texts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    rows: int = 0
    skipped: int = 0  # malformed lines, rows without the column or with an empty text
    sha256: str = ""

    def summary(self) -> dict:
        return {"file": self.path, "column": self.column or "auto", "rows": self.rows, "texts": len(self.texts),
                "skipped": self.skipped, "sha256": self.sha256}


def _user_turns(v: Any) -> Optional[str]:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError):
            return v
    if not isinstance(v, list):
        return None
    turns = [m.get("content") for m in v if isinstance(m, dict) and m.get("role") == "user"]
    return "\n".join(t for t in turns if isinstance(t, str)) or None


def benchmark_text(data: dict, column: Optional[str]) -> Optional[str]:
    """The text a benchmark row contributes: `column`, else the first default column present (None: none)."""
    for c in ((column,) if column else DEFAULT_COLUMNS):
        v = data.get(c)
        if v is None:
            continue
        text = _user_turns(v) if c == "messages" or isinstance(v, list) else v
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        if isinstance(text, str) and text.strip():
            return text
    return None


def read_benchmark(path: str, column: Optional[str], *, field_name: str = "--decontaminate") -> Benchmark:
    """Every usable text of a benchmark file; a missing or unreadable file, or one with no text at all, is a
    UserError naming it (exit 2)."""
    p = Path(path)
    if not p.is_file():
        raise UserError("benchmark file not found" if not p.exists() else "benchmark is not a regular file",
                        file=path, field=field_name)
    if p.suffix.lower() not in SUFFIXES:
        raise UserError(f"unsupported benchmark file type {p.suffix or '(none)'}; expected .jsonl, .csv or .parquet",
                        file=path, field=field_name)
    b = Benchmark(path, column, sha256=sha256_file(p))
    for row in read_rows(p):
        b.rows += 1
        text = benchmark_text(row.data, column) if row.data is not None else None
        if text is None or not normalise_key(text):
            b.skipped += 1
            continue
        b.texts.append(text)
        b.lines.append(row.line)
    if not b.texts:
        what = f"column {column!r}" if column else f"any of the columns {', '.join(DEFAULT_COLUMNS)}"
        raise UserError(f"no usable benchmark text: none of its {b.rows} row(s) has {what} "
                        "(name one with FILE:COLUMN or --decontaminate-column)", file=path, field=field_name)
    return b


@dataclass
class BenchmarkHit:
    benchmark: int  # index into the benchmarks
    line: int  # line of the benchmark row
    jaccard: float

    def reason(self, benchmarks: Sequence[Benchmark]) -> str:
        b = benchmarks[self.benchmark]
        kind = "copy" if self.jaccard >= 1.0 else f"near-duplicate (Jaccard {self.jaccard:.2f})"
        return f"benchmark contamination: {kind} of {b.path}:{self.line}"


def match_benchmarks(keys: Sequence[str], benchmarks: Sequence[Benchmark], threshold: float) -> dict[int, BenchmarkHit]:
    """{index into keys: the benchmark row it duplicates} by the dedup definition (exact, else MinHash LSH
    candidates confirmed by exact Jaccard ≥ threshold). Benchmark rows are registered as the frozen eval set of
    one NearDup index, so this is the very check that keeps train clear of the project's own eval."""
    owner: list[tuple[int, int]] = []
    bench_keys: list[str] = []
    for bi, b in enumerate(benchmarks):
        for text, line in zip(b.texts, b.lines):
            bench_keys.append(normalise_key(text))
            owner.append((bi, line))
    rows = [i for i, k in enumerate(keys) if normalise_key(k)]
    if not bench_keys or not rows:
        return {}
    nb = len(bench_keys)
    nd = NearDup(bench_keys + [normalise_key(keys[i]) for i in rows], threshold=threshold)
    nd.add_eval(list(range(nb)))
    hits = nd.match_eval_many(list(range(nb, nb + len(rows))))
    out = {}
    for k, (j, s) in hits.items():
        bi, line = owner[j]
        out[rows[k - nb]] = BenchmarkHit(bi, line, s)
    return out
