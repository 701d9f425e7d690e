"""Reviewed data (issue #16): `data.require_review` keeps only rows whose provenance `review_status` is listed; every
other row is quarantined with the reason and never reaches train.jsonl or eval.jsonl. The report counts provenance
as source × review_status × license (kept, quarantined, dropped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemtune.data.config import DataConfig, load_data_config
from gemtune.data.pipeline import build
from gemtune.errors import UserError
from jsonl_rows import read_jsonl, write_jsonl  # tests/data/fixtures (conftest puts it on the path)

STATUSES = ["approved", "pending", None, "Approved ", "rejected"]  # cycled over the rows
TOPICS = ("refund", "parcel", "login", "invoice", "transfer", "password", "statement", "delivery")


def _rows(n: int = 50) -> list[dict]:
    rows = []
    for i in range(n):
        r = {"id": f"r{i}", "task": "route", "label": ["a", "b"][i % 2], "output": ["a", "b"][i % 2],
             "input": f"ticket {i}: my {TOPICS[i % 8]} for account {1000 + 37 * i} went wrong on day {i % 28}",
             "provenance": {"source": "crm" if i < 30 else "forum", "license": ["cc-by-4.0", "internal"][i % 2]}}
        status = STATUSES[i % len(STATUSES)]
        if status is not None:
            r["provenance"]["review_status"] = status
        rows.append(r)
    return rows


def _approved(r: dict) -> bool:
    return (r["provenance"].get("review_status") or "").strip().lower() == "approved"


def test_unreviewed_rows_never_reach_train_or_eval_and_are_quarantined_with_the_reason(tiny_gemma3, tmp_path):
    rows = _rows()
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "ds"
    report = build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Route.", require_review=["approved"]))
    written = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    want_kept = {r["id"] for r in rows if _approved(r)}
    assert {r["id"] for r in written} == want_kept and len(want_kept) == 20
    assert read_jsonl(out / "eval.jsonl"), "the eval split must not be empty, or it proves nothing"
    assert all(_approved(r) for r in written)
    q = {r["line"]: r for r in read_jsonl(out / "quarantine.jsonl")}
    for line, r in enumerate(rows, 1):
        status = r["provenance"].get("review_status")
        if _approved(r):
            assert line not in q
        elif status is None:
            assert q[line]["reason"] == "no review_status; require_review [approved]" and q[line]["stage"] == "review"
        else:
            assert q[line]["reason"] == f"review_status {status!r} not in require_review [approved]"
    assert report["counts"]["quarantined"] == 30 and report["counts"]["train"] + report["counts"]["eval"] == 20
    stage = next(s for s in report["stages"] if s["stage"].startswith("review"))
    assert (stage["in"], stage["out"], stage["quarantined"]) == (50, 20, 30)


def test_report_provenance_table_counts_source_status_license(tiny_gemma3, tmp_path):
    rows = _rows()
    rows.append(dict(rows[0], id="dup"))  # an exact duplicate of an approved crm/cc-by-4.0 row: dropped
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "ds"
    report = build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Route.", require_review=["approved"]))
    table = {(r["source"], r["review_status"], r["license"]): (r["kept"], r["quarantined"], r["dropped"])
             for r in report["provenance"]["rows"]}
    # rows 0..29 crm, 30..49 forum; status cycles every 5, license every 2
    assert table == {
        ("crm", "approved", "cc-by-4.0"): (3, 0, 1), ("crm", "approved", "internal"): (3, 0, 0),
        ("crm", "Approved ", "internal"): (3, 0, 0), ("crm", "Approved ", "cc-by-4.0"): (3, 0, 0),
        ("crm", "pending", "internal"): (0, 3, 0), ("crm", "pending", "cc-by-4.0"): (0, 3, 0),
        ("crm", None, "cc-by-4.0"): (0, 3, 0), ("crm", None, "internal"): (0, 3, 0),
        ("crm", "rejected", "internal"): (0, 3, 0), ("crm", "rejected", "cc-by-4.0"): (0, 3, 0),
        ("forum", "approved", "cc-by-4.0"): (2, 0, 0), ("forum", "approved", "internal"): (2, 0, 0),
        ("forum", "Approved ", "internal"): (2, 0, 0), ("forum", "Approved ", "cc-by-4.0"): (2, 0, 0),
        ("forum", "pending", "internal"): (0, 2, 0), ("forum", "pending", "cc-by-4.0"): (0, 2, 0),
        ("forum", None, "cc-by-4.0"): (0, 2, 0), ("forum", None, "internal"): (0, 2, 0),
        ("forum", "rejected", "internal"): (0, 2, 0), ("forum", "rejected", "cc-by-4.0"): (0, 2, 0),
    }
    c = report["counts"]
    assert report["provenance"]["totals"] == {"kept": c["train"] + c["eval"], "quarantined": c["quarantined"],
                                              "dropped": c["exact_duplicates"]} == {"kept": 20, "quarantined": 30,
                                                                                    "dropped": 1}
    assert report["provenance"]["require_review"] == ["approved"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["provenance"] == report["provenance"]
    page = (out / "report.html").read_text()
    assert "<h2>Provenance</h2>" in page and "<td>forum</td><td>rejected</td><td>internal</td><td>0</td><td>2</td>" in page


def test_without_require_review_every_status_is_kept_and_still_counted(tiny_gemma3, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", _rows())
    report = build([raw], tmp_path / "ds", DataConfig(base=str(tiny_gemma3), instruction="Route."))
    assert report["counts"]["train"] + report["counts"]["eval"] == 50 and report["counts"]["quarantined"] == 0
    assert report["provenance"]["require_review"] is None
    assert report["provenance"]["totals"] == {"kept": 50, "quarantined": 0, "dropped": 0}


def test_rows_rejected_by_sanitising_still_count_their_provenance(tiny_gemma3, tmp_path):
    rows = _rows(20)
    rows[3] = {"input": "", "output": "a", "review_status": "approved", "source": "crm", "license": "mit"}  # empty
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    report = build([raw], tmp_path / "ds", DataConfig(base=str(tiny_gemma3), instruction="Route.",
                                                       require_review=["approved"]))
    row = next(r for r in report["provenance"]["rows"] if r["license"] == "mit")
    assert (row["source"], row["review_status"], row["quarantined"], row["kept"]) == ("crm", "approved", 1, 0)


def _generic(path: Path, statuses: list) -> Path:
    rows = []
    for i, st in enumerate(statuses):
        r = {"instruction": f"Name a colour number {i} that rhymes with word {i * 13}", "output": f"colour {i}"}
        if st:
            r["review_status"] = st
        rows.append(r)
    return write_jsonl(path, rows)


@pytest.mark.parametrize("review_generic", [False, True])
def test_generic_rows_without_a_status_are_exempt_unless_review_generic(tiny_gemma3, tmp_path, review_generic):
    raw = write_jsonl(tmp_path / "raw.jsonl", _rows())
    gen = _generic(tmp_path / "generic.jsonl", [None] * 20 + ["pending"] * 5)
    out = tmp_path / "ds"
    report = build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Route.", require_review=["approved"],
                                          generic=[str(gen)], generic_fraction=0.1, review_generic=review_generic))
    q = [r for r in read_jsonl(out / "quarantine.jsonl") if r.get("generic")]
    assert sum(r["reason"] == "review_status 'pending' not in require_review [approved]" for r in q) == 5
    if review_generic:
        assert len(q) == 25 and report["counts"]["generic_added"] == 0
        assert sum(r["reason"] == "no review_status; require_review [approved]" for r in q) == 20
    else:
        assert len(q) == 5 and report["counts"]["generic_added"] == 2
    train = read_jsonl(out / "train.jsonl")
    assert not any(r["provenance"].get("review_status") == "pending" for r in train)


def test_require_review_from_yaml_and_the_cli(tiny_gemma3, tmp_path, cli):
    y = tmp_path / "gemtune.yaml"
    y.write_text("data:\n  instruction: Route.\n  require_review: [approved, Rejected]\n")
    assert load_data_config(y).require_review == ["approved", "Rejected"]
    y.write_text("data:\n  instruction: Route.\n  require_review: approved\n")
    with pytest.raises(UserError) as e:
        load_data_config(y)
    assert str(e.value).startswith(f'{y}:3: field "data.require_review": ')
    raw = write_jsonl(tmp_path / "raw.jsonl", _rows())
    assert cli("data", "build", raw, "--out", tmp_path / "ds", "--base", tiny_gemma3, "--instruction", "Route.",
               "--require-review", "approved", "--require-review", "rejected", "-q") == 0
    kept = read_jsonl(tmp_path / "ds" / "train.jsonl") + read_jsonl(tmp_path / "ds" / "eval.jsonl")
    assert {(r["provenance"]["review_status"] or "").strip().lower() for r in kept} == {"approved", "rejected"}
    assert len(kept) == 30


def test_provenance_table_keeps_the_largest_rows_and_sums_the_rest():
    from collections import Counter

    from gemtune.data.report import PROVENANCE_ROWS, provenance_table

    kept = Counter({(f"s{i}", "approved", "mit"): 1000 - i for i in range(150)})
    quarantined = Counter({("s149", "pending", None): 7})
    t = provenance_table(kept, quarantined, Counter(), ["approved"])
    assert len(t["rows"]) == PROVENANCE_ROWS
    assert t["rows"][0] == {"source": "s0", "review_status": "approved", "license": "mit", "kept": 1000,
                            "quarantined": 0, "dropped": 0}
    assert t["rows"][-1]["source"] == "(52 more)"  # 151 keys: 99 shown, 52 summed
    assert t["totals"] == {"kept": sum(kept.values()), "quarantined": 7, "dropped": 0}
