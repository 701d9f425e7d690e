"""Fuzzing `gemtune data build` over JSONL, CSV and Parquet with hostile rows beside good ones (issue #12).

Hypothesis draws files that mix good rows with random bytes, deep nesting, integers over Python's 4,300-digit
limit, wrong types, NUL bytes, lone surrogates, stray byte-order marks, latin-1 lines and whole files in UTF-16 or
UTF-8 with a BOM. For every file: the CLI exits 0, the report's input_rows is the number of rows in the file,
every row is accounted for (input = train + eval + quarantined + duplicates + decontaminated + balanced out),
every hostile row is in quarantine.jsonl with its own line and a reason, and no good row is.

Deterministic (derandomize=True) and bounded (max_examples per format), on the tiny Gemma 3 tokenizer.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
WORDS = ("card", "refund", "parcel", "login", "invoice", "transfer", "app", "fee", "pin", "address", "loan", "branch",
         "limit", "statement", "delivery", "password", "account", "charge", "email", "phone")


@st.composite
def good_row(draw, i: int) -> dict:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=3, max_size=8))
    return {"input": f"ticket {i}: " + " ".join(words), "output": draw(st.sampled_from(["billing", "cards", "tech"]))}


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# Hostile JSON texts: each is one line, none of them a usable row.
hostile_json_text = st.one_of(
    st.integers(1_000, 60_000).map(_deep),
    st.integers(1_000, 60_000).map(lambda n: '{"input": "x", "output": ' + _deep(n) + "}"),
    st.integers(4_301, 6_000).map(lambda n: '{"input": "x", "output": "y", "id": ' + "7" * n + "}"),
    st.integers(4_301, 6_000).map(lambda n: '{"input": ' + "1" * n + ', "output": "y"}'),
    st.sampled_from(['{"input": 5, "output": "y"}', '{"input": ["a"], "output": "y"}', '{"input": "a", "output": null}',
                     '{"input": "a", "output": {"k": 1}}', '{"input": "a", "output": true}', '{"input": "a"}',
                     '{"messages": 7}', '{"messages": [{"role": "user", "content": 3}]}', '{"messages": "[1,"}',
                     '{"input": "a\\ud800b", "output": "y"}', '{"input": "a", "output": "y", "split": "later"}',
                     '{"input": "a", "output": "y", "provenance": {"\\udc80": "k"}}', "[1, 2]", '"text"', "null",
                     "12", "{", '{"input": "a", "output": "y",}', '{"input": "a", "output": "y"} trailing',
                     '{"input": "x", "output": "y", "provenance": [1]}', "NaN", '{"input": NaN, "output": "y"}']),
)


@st.composite
def hostile_bytes(draw) -> bytes:
    """One physical line of bytes (no newline) that is not a usable row."""
    kind = draw(st.sampled_from(["text", "random", "latin1", "nul", "bom", "utf16"]))
    if kind == "text":
        return draw(hostile_json_text).encode("utf-8")
    if kind == "random":
        b = draw(st.binary(min_size=1, max_size=200)).replace(b"\n", b"")
        return b if b.strip() else b"\xff"
    row = json.dumps({"input": "caf\u00e9 cr\u00e8me " + draw(st.sampled_from(WORDS)), "output": "cards"},
                     ensure_ascii=False)
    if kind == "latin1":
        return row.encode("latin-1")
    if kind == "nul":
        return row.encode("utf-8").replace(b'"cards"', b'"ca\x00rds"')
    if kind == "bom":  # a byte-order mark in the middle of a file is not whitespace
        return b"\xef\xbb\xbf" + row.encode("utf-8")
    return row.encode("utf-16-le").replace(b"\n", b" ")


def _check(cli, raw: Path, out: Path, base: Path, n_rows: int, bad_lines: set[int], good_lines: set[int]) -> None:
    code = cli("data", "build", str(raw), "--out", str(out), "--base", str(base), "--instruction", "Route it.",
                "--quiet")
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    c = report["counts"]
    assert c["input_rows"] == n_rows
    assert c["input_rows"] == (c["train"] - c["generic_added"] + c["eval"] + c["quarantined"] + c["exact_duplicates"]
                               + c["near_duplicates"] + c["decontaminated"] + c["balanced_out"])
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(q) == c["quarantined"]
    lines = {r["line"] for r in q}
    assert all(r["file"] == str(raw) and r["reason"] for r in q)
    assert bad_lines <= lines, sorted(bad_lines - lines)
    assert not (lines & good_lines), sorted(lines & good_lines)


@SETTINGS
@given(data=st.data(), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]))
def test_fuzz_jsonl_build(cli, tiny_gemma3, data, encoding):
    n_good = data.draw(st.integers(1, 6), label="good rows")
    goods = [data.draw(good_row(i)) for i in range(n_good)]
    if encoding == "utf-16":  # the whole file in UTF-16: hostile rows are texts, the file is transcoded
        bads = data.draw(st.lists(hostile_json_text, min_size=1, max_size=6), label="hostile")
    else:
        bads = data.draw(st.lists(hostile_bytes(), min_size=1, max_size=6), label="hostile")
    items = [("good", g) for g in goods] + [("bad", b) for b in bads]
    order = data.draw(st.permutations(range(len(items))), label="order")
    blank_every = data.draw(st.integers(0, 3), label="blank lines")
    lines, bad_lines, good_lines, n = [], set(), set(), 0
    for k in order:
        kind, item = items[k]
        if blank_every and k % (blank_every + 1) == 0:
            lines.append(b"   " if encoding != "utf-16" else "   ")
        if kind == "good":
            text = json.dumps(item, ensure_ascii=False)
            lines.append(text.encode("utf-8") if encoding != "utf-16" else text)
            good_lines.add(len(lines))
        else:
            lines.append(item)
            if encoding == "utf-8" and len(lines) == 1 and item.startswith(b"\xef\xbb\xbf"):
                good_lines.add(1)  # a byte-order mark that opens the file is the file's own: a good row
            else:
                bad_lines.add(len(lines))
        n += 1
    if encoding == "utf-16":
        body = ("\n".join(lines) + "\n").encode("utf-16")  # with its BOM
    else:
        body = (b"\xef\xbb\xbf" if encoding == "utf-8-sig" else b"") + b"\n".join(lines) + b"\n"
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "fuzz.jsonl"
        raw.write_bytes(body)
        _check(cli, raw, Path(d) / "out", tiny_gemma3, n, bad_lines, good_lines)


hostile_cell = st.one_of(
    st.integers(1_000, 60_000).map(_deep),
    st.integers(4_301, 6_000).map(lambda n: '[{"role": "user", "content": ' + "3" * n + "}]"),
    st.sampled_from(['[{"role": "user", "content": "q"}]', '[{"role": "user", "content": "q"}, '
                     '{"role": "assistant", "content": 1}]', "{}", "[]", "null", "[1,", "\x00",
                     '[{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]']),
)


@SETTINGS
@given(data=st.data())
def test_fuzz_csv_build(cli, tiny_gemma3, data):
    """Hostile `messages` and `provenance` cells, random bytes and latin-1 lines among good rows."""
    n_good = data.draw(st.integers(1, 6), label="good rows")
    goods = [data.draw(good_row(i)) for i in range(n_good)]
    n_bad = data.draw(st.integers(1, 6), label="hostile rows")
    lines: list[bytes] = []
    buf = io.StringIO()
    csv.writer(buf).writerow(["input", "output", "messages", "provenance"])
    lines.append(buf.getvalue().rstrip("\r\n").encode())
    rows = [("good", g) for g in goods] + [("bad", None)] * n_bad
    order = data.draw(st.permutations(range(len(rows))), label="order")
    bad_lines, good_lines = set(), set()
    for k in order:
        kind, g = rows[k]
        buf = io.StringIO()
        w = csv.writer(buf)
        if kind == "good":
            w.writerow([g["input"], g["output"], "", ""])
            lines.append(buf.getvalue().rstrip("\r\n").encode("utf-8"))
            good_lines.add(len(lines))
            continue
        how = data.draw(st.sampled_from(["messages", "provenance", "random", "latin1", "fields"]), label="how")
        if how == "messages":
            w.writerow(["", "", data.draw(hostile_cell), ""])
        elif how == "provenance":
            w.writerow(["some input", "cards", "", data.draw(st.sampled_from(
                ["[" * 5000, '{"a": ' + "9" * 5000 + "}", "[1, 2]", '{"k": [1]}', "{"]))])
        elif how == "fields":
            w.writerow(["only", "three", "fields", "here", "five"])
        if how in ("messages", "provenance", "fields"):
            line = buf.getvalue().rstrip("\r\n").encode("utf-8")
        elif how == "latin1":
            line = "caf\u00e9 cr\u00e8me,cards,,".encode("latin-1")
        else:  # random bytes: no quotes or line breaks (one physical line = one record), never all blank
            line = b"\xff" + data.draw(st.binary(max_size=120)).translate(None, b"\r\n\"")
        assert b"\n" not in line and b"\r" not in line
        lines.append(line)
        bad_lines.add(len(lines))
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "fuzz.csv"
        raw.write_bytes(b"\r\n".join(lines) + b"\r\n")
        _check(cli, raw, Path(d) / "out", tiny_gemma3, len(lines) - 1, bad_lines, good_lines)


@SETTINGS
@given(data=st.data())
def test_fuzz_parquet_build(cli, tiny_gemma3, data):
    """Wrong types and hostile JSON inside string columns, nulls, out-of-range timestamps, big binary cells."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_good = data.draw(st.integers(1, 6), label="good rows")
    goods = [data.draw(good_row(i)) for i in range(n_good)]
    n_bad = data.draw(st.integers(1, 6), label="hostile rows")
    cols: dict[str, list] = {"input": [], "output": [], "messages": [], "when": [], "blob": []}
    kinds = ["good"] * n_good + ["bad"] * n_bad
    order = data.draw(st.permutations(range(len(kinds))), label="order")
    bad_lines, good_lines = set(), set()
    for row_no, k in enumerate(order, 1):
        blob = data.draw(st.binary(max_size=64))
        if kinds[k] == "good":
            g = goods[k]
            vals = [g["input"], g["output"], None, 0, blob]
            good_lines.add(row_no)
        else:
            how = data.draw(st.sampled_from(["nulls", "messages", "when", "empty"]), label="how")
            vals = {"nulls": [None, None, None, 0, blob],
                    "messages": [None, None, data.draw(hostile_cell), 0, blob],
                    "when": ["some input", "cards", None, 2**62, blob],  # past year 9999: Python cannot hold it
                    "empty": ["   ", "cards", None, 0, blob]}[how]
            bad_lines.add(row_no)
        for name, v in zip(cols, vals):
            cols[name].append(v)
    table = pa.table({"input": pa.array(cols["input"], pa.string()), "output": pa.array(cols["output"], pa.string()),
                      "messages": pa.array(cols["messages"], pa.string()),
                      "when": pa.array(cols["when"], pa.timestamp("ms")), "blob": pa.array(cols["blob"], pa.binary())})
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "fuzz.parquet"
        pq.write_table(table, raw, row_group_size=data.draw(st.integers(1, 5), label="row group size"))
        _check(cli, raw, Path(d) / "out", tiny_gemma3, len(kinds), bad_lines, good_lines)
