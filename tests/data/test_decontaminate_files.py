"""`data build --decontaminate FILE[:COLUMN]` (issue #16): rows that copy or nearly copy a benchmark row (case,
punctuation, a reworded word) are quarantined with the benchmark's file and line and counted in the report;
unrelated rows are kept; a benchmark file that is missing or unreadable stops the build with exit 2 naming it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gemtune.data.config import DataConfig, load_data_config
from gemtune.data.pipeline import build
from gemtune.errors import UserError
from jsonl_rows import read_jsonl, write_jsonl  # tests/data/fixtures (conftest puts it on the path)

BENCH = [
    "What is the boiling point of water at sea level in degrees Celsius and why does altitude change it?",
    "Which planet in our solar system has the longest day, measured in Earth hours, and what causes it?",
    "Explain how a bank calculates compound interest on a savings account over three years.",
    "Name the author of the novel about a white whale and the captain who hunted it.",
]
# planted copies of the benchmark rows above, each a different kind of change
PLANTED = {
    "case": BENCH[0].upper(),
    "punctuation": BENCH[1].replace(",", "").replace("?", "!!").replace("in our", "in our,"),
    "reworded": BENCH[2].replace("calculates", "computes"),
    "messages": BENCH[3].lower().replace(".", ""),
}
TOPICS = ("refund", "parcel", "login", "invoice", "transfer", "password", "statement", "delivery")


def _domain(n: int = 40) -> list[dict]:
    rows = [{"id": f"r{i}", "input": f"ticket {i}: my {TOPICS[i % 8]} for account {1000 + 37 * i} broke on day {i % 28}",
             "output": ["a", "b"][i % 2], "label": ["a", "b"][i % 2]} for i in range(n)]
    for name, text in PLANTED.items():
        if name == "messages":
            rows.append({"id": f"p-{name}", "messages": [{"role": "user", "content": text},
                                                         {"role": "assistant", "content": "a"}]})
        else:
            rows.append({"id": f"p-{name}", "input": text, "output": "a", "label": "a"})
    return rows


def _bench_jsonl(path: Path) -> Path:
    # line 1 is a header-like row without a text column (skipped), benchmark rows start at line 2
    rows = [{"meta": "mmlu-mini"}] + [{"question": q, "answer": "x"} for q in BENCH]
    return write_jsonl(path, rows)


def _kept_ids(out: Path) -> set[str]:
    return {r["id"] for r in read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")}


def test_planted_near_duplicates_of_a_benchmark_are_quarantined_unrelated_rows_kept(tiny_gemma3, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", _domain())
    bench = _bench_jsonl(tmp_path / "bench.jsonl")
    out = tmp_path / "ds"
    report = build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Answer.",
                                          decontaminate=[{"path": str(bench)}]))
    kept = _kept_ids(out)
    assert kept == {f"r{i}" for i in range(40)}
    q = {r["line"]: r for r in read_jsonl(out / "quarantine.jsonl")}
    for k, name in enumerate(PLANTED):
        r = q[41 + k]
        assert r["stage"] == "benchmark", r
        assert r["reason"].startswith("benchmark contamination: ") and r["reason"].endswith(f"of {bench}:{k + 2}")
    assert "copy of" in q[41]["reason"] and "copy of" in q[42]["reason"]  # case, punctuation: same normal form
    assert "near-duplicate (Jaccard 0." in q[43]["reason"]  # one word reworded
    bm = report["decontamination"]["benchmarks"]
    assert bm["removed"] == 4 and bm["generic_removed"] == 0 and report["counts"]["quarantined"] == 4
    assert bm["files"] == [{"file": str(bench), "column": "auto", "rows": 5, "texts": 4, "skipped": 1,
                            "sha256": bm["files"][0]["sha256"]}]
    stage = next(s for s in report["stages"] if s["stage"] == "benchmark decontamination")
    assert (stage["in"], stage["out"], stage["quarantined"]) == (44, 40, 4)
    assert "<h2>Benchmark decontamination</h2>" in (out / "report.html").read_text()


def test_without_decontaminate_the_planted_rows_are_kept(tiny_gemma3, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", _domain())
    report = build([raw], tmp_path / "ds", DataConfig(base=str(tiny_gemma3), instruction="Answer."))
    assert {f"p-{n}" for n in PLANTED} <= _kept_ids(tmp_path / "ds")
    assert report["decontamination"]["benchmarks"] is None


def test_cli_csv_with_file_colon_column_and_parquet_from_the_config(tiny_gemma3, tmp_path, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = write_jsonl(tmp_path / "raw.jsonl", _domain())
    bench_csv = tmp_path / "bench.csv"
    with open(bench_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt_text"])
        w.writerows([[i, q] for i, q in enumerate(BENCH[:2])])
    out = tmp_path / "ds"
    assert cli("data", "build", raw, "--out", out, "--base", tiny_gemma3, "--instruction", "Answer.",
               "--decontaminate", f"{bench_csv}:prompt_text", "-q") == 0
    assert _kept_ids(out) == {f"r{i}" for i in range(40)} | {"p-reworded", "p-messages"}
    reasons = [r["reason"] for r in read_jsonl(out / "quarantine.jsonl")]
    assert sorted(reasons) == sorted([f"benchmark contamination: copy of {bench_csv}:2",
                                      f"benchmark contamination: copy of {bench_csv}:3"])

    bench_pq = tmp_path / "bench.parquet"
    pq.write_table(pa.table({"q": BENCH[2:], "n": [1, 2]}), bench_pq)
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"data:\n  instruction: Answer.\n  decontaminate:\n    - {{path: {bench_pq}, column: q}}\n")
    out2 = tmp_path / "ds2"
    assert cli("data", "build", raw, "--out", out2, "--base", tiny_gemma3, "--config", y, "-q") == 0
    assert _kept_ids(out2) == {f"r{i}" for i in range(40)} | {"p-case", "p-punctuation"}
    # --decontaminate-column is the column of every flag without its own
    out3 = tmp_path / "ds3"
    assert cli("data", "build", raw, "--out", out3, "--base", tiny_gemma3, "--instruction", "Answer.",
               "--decontaminate", bench_pq, "--decontaminate-column", "q", "-q") == 0
    assert _kept_ids(out3) == _kept_ids(out2)


def test_eval_rows_are_protected_too(tiny_gemma3, tmp_path):
    """A benchmark row pinned to the eval split must not become part of the frozen eval either."""
    rows = _domain()
    for r in rows[40:]:
        r["split"] = "eval"
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "ds"
    build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Answer.",
                                 decontaminate=[{"path": str(_bench_jsonl(tmp_path / "b.jsonl"))}]))
    assert not any(r["id"].startswith("p-") for r in read_jsonl(out / "eval.jsonl"))


def test_missing_or_unreadable_benchmark_exits_2_naming_it(tiny_gemma3, tmp_path, cli, capsys):
    raw = write_jsonl(tmp_path / "raw.jsonl", _domain())
    missing = tmp_path / "nope.jsonl"
    assert cli("data", "build", raw, "--out", tmp_path / "ds", "--base", tiny_gemma3, "--instruction", "Answer.",
               "--decontaminate", missing, "-q") == 2
    assert str(missing) in capsys.readouterr().err
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert cli("data", "build", raw, "--out", tmp_path / "ds", "--base", tiny_gemma3, "--instruction", "Answer.",
               "--decontaminate", broken, "-q") == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "unreadable Parquet" in err
    no_text = write_jsonl(tmp_path / "labels.jsonl", [{"label": "x"}])
    assert cli("data", "build", raw, "--out", tmp_path / "ds", "--base", tiny_gemma3, "--instruction", "Answer.",
               "--decontaminate", no_text, "-q") == 2
    assert "no usable benchmark text" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_config_names_file_line_and_field_for_a_missing_benchmark(tmp_path):
    y = tmp_path / "gemtune.yaml"
    y.write_text("data:\n  decontaminate:\n    - gone.jsonl:question\n")
    with pytest.raises(UserError) as e:
        load_data_config(y)
    assert str(e.value).startswith(f'{y}:3: field "data.decontaminate.0.path": benchmark file not found: gone.jsonl')


def test_generic_rows_copying_a_benchmark_are_quarantined_and_never_mixed_in(tiny_gemma3, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", _domain())
    gen = write_jsonl(tmp_path / "generic.jsonl",
                 [{"instruction": BENCH[1].lower(), "output": "Venus"}]
                 + [{"instruction": f"Write a haiku about the number {i} and the colour {i * 11}", "output": "ok"}
                    for i in range(10)])
    out = tmp_path / "ds"
    report = build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Answer.", generic=[str(gen)],
                                          generic_fraction=0.1, decontaminate=[{"path": str(_bench_jsonl(tmp_path / "b.jsonl"))}]))
    bm = report["decontamination"]["benchmarks"]
    assert (bm["removed"], bm["generic_removed"]) == (4, 1)
    q = [r for r in read_jsonl(out / "quarantine.jsonl") if r.get("generic")]
    assert [(r["line"], r["stage"]) for r in q] == [(1, "benchmark")]
    assert report["counts"]["generic_added"] > 0
    assert not any("Venus" in json.dumps(r) for r in read_jsonl(out / "train.jsonl"))
