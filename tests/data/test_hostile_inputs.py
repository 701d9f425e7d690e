"""Issue #12, data side: `--out` never deletes what gemtune did not write, and no bad line stops a build.

Builds use the tiny Gemma 3 (character tokenizer), so each takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemtune.data.config import DataConfig
from gemtune.data.pipeline import build
from gemtune.errors import UserError
from gemtune.utils import OUTPUT_MARKER


def _cfg(base: Path, **kw) -> DataConfig:
    return DataConfig(base=str(base), instruction="Route the ticket.", **kw)


def _good_rows(n: int, start: int = 0) -> list[dict]:
    return [{"input": f"ticket number {i}: my card {i} was declined at shop {i * 7}", "output": ["billing", "cards"][i % 2]}
            for i in range(start, start + n)]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------ --out
def test_build_out_refuses_a_directory_it_did_not_write_and_deletes_nothing(cli, tiny_gemma3, tmp_path, capsys):
    home = tmp_path / "project"
    home.mkdir()
    raw = _jsonl(home / "raw.jsonl", _good_rows(20))
    (home / "notes.md").write_text("my notes")
    code = cli("data", "build", str(raw), "--out", str(home), "--base", str(tiny_gemma3), "--instruction", "Route.", "-q")
    err = capsys.readouterr().err
    assert code == 2
    assert f"{home}: field \"--out\": input {raw} lies inside the output directory" in err
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.md").write_text("my notes")
    code = cli("data", "build", str(raw), "--out", str(other), "--base", str(tiny_gemma3), "--instruction", "Route.", "-q")
    err = capsys.readouterr().err
    assert code == 2 and f"{other}: field \"--out\": is not empty and was not written by gemtune" in err
    assert sorted(p.name for p in home.iterdir()) == ["notes.md", "raw.jsonl"]
    assert (other / "notes.md").read_text() == "my notes" and [p.name for p in tmp_path.iterdir()] != []
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing half-built left behind


def test_build_replaces_its_own_output_and_overwrite_replaces_a_foreign_one(tiny_gemma3, tmp_path):
    raw = _jsonl(tmp_path / "raw.jsonl", _good_rows(30))
    out = tmp_path / "ds"
    build([raw], out, _cfg(tiny_gemma3))
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["writer"] == "gemtune data build"
    (out / "train.jsonl").write_text("stale")
    report = build([raw], out, _cfg(tiny_gemma3))  # its own output: replaced whole, eval lock kept
    assert report["split"]["locked"] is True and (out / "train.jsonl").read_text() != "stale"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not written by gemtune"):
        build([raw], foreign, _cfg(tiny_gemma3))
    assert (foreign / "keep.txt").is_file()
    build([raw], foreign, _cfg(tiny_gemma3), overwrite=True)
    assert not (foreign / "keep.txt").exists() and (foreign / OUTPUT_MARKER).is_file()


def test_a_dataset_built_before_the_marker_is_still_replaced(tiny_gemma3, tmp_path):
    raw = _jsonl(tmp_path / "raw.jsonl", _good_rows(30))
    out = tmp_path / "ds"
    build([raw], out, _cfg(tiny_gemma3))
    (out / OUTPUT_MARKER).unlink()  # as an older gemtune left it: only build files
    build([raw], out, _cfg(tiny_gemma3))
    assert (out / OUTPUT_MARKER).is_file()


# ------------------------------------------------------------------ one bad line never stops a build
HOSTILE_JSONL = [
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"input": "deep", "output": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    (b'{"input": "big", "output": "x", "id": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
    (b'{"input": "nul \x00 raw", "output": "x"}', "malformed JSON"),
    (b'{"input": "latin-1 caf\xe9", "output": "x"}', "invalid UTF-8"),
    (b'{"input": 5, "output": "x"}', 'field "input": must be a string'),
    (b'{"input": "x", "output": "y", "provenance": {"\\ud800": "k"}}', "not valid UTF-8"),
    (b'"just a string"', "expected an object"),
]


def test_hostile_jsonl_lines_are_quarantined_with_file_line_and_reason(cli, tiny_gemma3, tmp_path):
    good = [json.dumps(r).encode() for r in _good_rows(12)]
    lines = good[:6] + [h for h, _ in HOSTILE_JSONL] + good[6:]
    raw = tmp_path / "hostile.jsonl"
    raw.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "ds"
    assert cli("data", "build", str(raw), "--out", str(out), "--base", str(tiny_gemma3),
                "--instruction", "Route the ticket.", "-q") == 0
    q = {r["line"]: r for r in _quarantine(out)}
    for k, (_, needle) in enumerate(HOSTILE_JSONL):
        line = 7 + k
        assert line in q, (line, needle)
        assert q[line]["file"] == str(raw) and needle in q[line]["reason"], (line, q[line]["reason"])
    report = json.loads((out / "report.json").read_text())
    c = report["counts"]
    assert c["input_rows"] == len(lines) and c["quarantined"] == len(HOSTILE_JSONL)
    assert c["train"] + c["eval"] == len(good)


def test_hostile_csv_messages_and_provenance_cells_are_quarantined(tiny_gemma3, tmp_path):
    import csv
    import io

    good = [json.dumps([{"role": "user", "content": f"question {i} about my card"},
                        {"role": "assistant", "content": f"answer {i}"}]) for i in range(10)]
    bad = {
        "deep": ("[" * 50_000 + "]" * 50_000, "", "nested too deeply"),
        "bigint": ('[{"role": "user", "content": ' + "1" * 5000 + "}]", "", "more than 4300 digits"),
        "prov_deep": (good[0].replace("question 0", "question p"), "{" + '"a":' * 0 + "[" * 50_000 + "]" * 50_000 + "}",
                      'field "provenance"'),
        "prov_int": (good[0].replace("question 0", "question q"), '{"a": ' + "2" * 5000 + "}", 'field "provenance"'),
        "nul": (good[0].replace("question 0", "quest\x00ion"), "", "Invalid control character"),  # raw NUL in JSON
    }
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["messages", "provenance"])
    rows = [(m, "") for m in good[:5]] + [(m, p) for m, p, _ in bad.values()] + [(m, "") for m in good[5:]]
    for r in rows:
        w.writerow(r)
    raw = tmp_path / "hostile.csv"
    raw.write_text(buf.getvalue(), encoding="utf-8")
    out = tmp_path / "ds"
    report = build([raw], out, _cfg(tiny_gemma3))
    q = {r["line"]: r for r in _quarantine(out)}
    for k, (_, _, needle) in enumerate(bad.values()):
        line = 2 + 5 + k  # header is line 1
        assert needle in q[line]["reason"] and q[line]["file"] == str(raw), (line, q.get(line))
    c = report["counts"]
    assert c["input_rows"] == len(rows) and c["quarantined"] == len(bad)


def test_utf16_file_with_a_bom_is_read_and_its_bad_unit_quarantined(tiny_gemma3, tmp_path):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _good_rows(8))
    body = text.encode("utf-16-le")
    lone = '{"input": "X", "output": "y"}\n'.encode("utf-16-le").replace("X".encode("utf-16-le"), b"\x00\xd8")
    raw = tmp_path / "u16.jsonl"
    raw.write_bytes(b"\xff\xfe" + body + lone)
    report = build([raw], tmp_path / "ds", _cfg(tiny_gemma3))
    q = _quarantine(tmp_path / "ds")
    assert [(r["line"], r["reason"].split(" at ")[0]) for r in q] == [(9, "invalid UTF-8")]
    assert report["counts"]["input_rows"] == 9 and report["counts"]["train"] + report["counts"]["eval"] == 8


def test_parquet_value_python_cannot_hold_is_quarantined_not_fatal(tiny_gemma3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _good_rows(10)
    # a timestamp far past year 9999: Python datetime cannot hold it
    ts = pa.array([0] * 4 + [2**62] + [0] * 5, type=pa.timestamp("ms"))
    table = pa.table({"input": [r["input"] for r in rows], "output": [r["output"] for r in rows], "when": ts})
    raw = tmp_path / "t.parquet"
    pq.write_table(table, raw)
    report = build([raw], tmp_path / "ds", _cfg(tiny_gemma3))
    q = _quarantine(tmp_path / "ds")
    assert [r["line"] for r in q] == [5] and "unreadable Parquet row" in q[0]["reason"]
    assert report["counts"]["input_rows"] == 10


def test_corrupt_parquet_row_group_quarantines_its_rows_only(tiny_gemma3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _good_rows(12)
    table = pa.table({"input": [r["input"] for r in rows], "output": [r["output"] for r in rows]})
    raw = tmp_path / "t.parquet"
    pq.write_table(table, raw, row_group_size=4, compression="none")
    data = bytearray(raw.read_bytes())
    meta = pq.ParquetFile(raw).metadata.row_group(1).column(0)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data[start:start + meta.total_compressed_size] = b"\xff" * meta.total_compressed_size  # smash group 1's pages
    raw.write_bytes(bytes(data))
    report = build([raw], tmp_path / "ds", _cfg(tiny_gemma3))
    q = _quarantine(tmp_path / "ds")
    assert [r["line"] for r in q] == [5, 6, 7, 8], [(r["line"], r["reason"]) for r in q]
    assert all("row group 1" in r["reason"] for r in q)
    assert report["counts"]["input_rows"] == 12 and report["counts"]["train"] + report["counts"]["eval"] == 8
