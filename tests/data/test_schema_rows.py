"""Per-row and per-task answer schemas (issue #15, contract C3): `data.schemas: {task: schema or .json path}` applies
where a row has none; the final assistant answer must parse as JSON and satisfy its schema, else the row is
quarantined with the jsonschema message and path; kept rows carry `schema` into train.jsonl and eval.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemtune.data.config import DataConfig, load_data_config
from gemtune.data.pipeline import build
from gemtune.data.records import content_sha256
from gemtune.data.sanitise import Example
from gemtune.errors import UserError
from jsonl_rows import read_jsonl, write_jsonl  # tests/data/fixtures (conftest puts it on the path)

SCHEMA = {"type": "object", "properties": {"queue": {"enum": ["billing", "cards"]}, "priority": {"type": "integer"}},
          "required": ["queue", "priority"], "additionalProperties": False}
TOPICS = ("refund", "parcel", "login", "invoice", "transfer", "password", "statement", "delivery")
BAD = {  # row index -> (answer, the reason's tail)
    3: ('{"queue": "billing", "priority": "high"}', "at $.priority: 'high' is not of type 'integer'"),
    7: ('{"queue": "cats", "priority": 1}', "at $.queue: 'cats' is not one of ['billing', 'cards']"),
    11: ('{"queue": "cards"}', "at $: 'priority' is a required property"),
}
NOT_JSON = 15


def _rows(n: int = 40, task: str = "extract") -> list[dict]:
    rows = []
    for i in range(n):
        answer = json.dumps({"queue": ["billing", "cards"][i % 2], "priority": i % 3})
        if i in BAD:
            answer = BAD[i][0]
        if i == NOT_JSON:
            answer = "billing, priority 1"
        rows.append({"id": f"r{i}", "task": task, "output": answer,
                     "input": f"ticket {i}: my {TOPICS[i % 8]} for account {1000 + 37 * i} broke on day {i % 28}"})
    rows.append({"id": "other", "task": "chat", "output": "plain text, no schema", "input": "hello there, friend"})
    return rows


def _check_build(out: Path, report: dict) -> None:
    q = {r["line"]: r for r in read_jsonl(out / "quarantine.jsonl")}
    assert set(q) == {i + 1 for i in BAD} | {NOT_JSON + 1}
    for i, (_, tail) in BAD.items():
        assert q[i + 1]["reason"] == f'field "schema": the answer does not satisfy its schema {tail}'
        assert q[i + 1]["stage"] == "schema"
    assert q[NOT_JSON + 1]["reason"].startswith('field "schema": the answer is not JSON (')
    ev, tr = read_jsonl(out / "eval.jsonl"), read_jsonl(out / "train.jsonl")
    assert ev and len(ev) + len(tr) == 41 - 4
    for r in ev + tr:
        if r["task"] == "extract":
            assert r["schema"] == SCHEMA
            assert r["sha256"] == content_sha256(r["task"], r["messages"], r.get("label"), SCHEMA)
        else:
            assert "schema" not in r  # a task without a schema keeps none
    stage = next(s for s in report["stages"] if s["stage"] == "answer schema")
    assert (stage["in"], stage["out"], stage["quarantined"]) == (41, 37, 4)


def test_per_task_schema_from_the_config_quarantines_invalid_answers_and_reaches_eval(tiny_gemma3, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", _rows())
    y = tmp_path / "gemtune.yaml"
    y.write_text("data:\n  instruction: Extract.\n  schemas:\n    extract: " + json.dumps(SCHEMA) + "\n")
    cfg = load_data_config(y, {"base": str(tiny_gemma3)})
    out = tmp_path / "ds"
    report = build([raw], out, cfg)
    _check_build(out, report)


def test_per_task_schema_from_a_json_file(tiny_gemma3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "extract.json").write_text(json.dumps(SCHEMA))
    raw = write_jsonl(tmp_path / "raw.jsonl", _rows())
    y = tmp_path / "gemtune.yaml"
    y.write_text("data:\n  instruction: Extract.\n  schemas:\n    extract: schemas/extract.json\n")
    out = tmp_path / "ds"
    report = build([raw], out, load_data_config(y, {"base": str(tiny_gemma3)}))
    _check_build(out, report)
    assert json.loads((out / "dataset.json").read_text())["options"]["schemas"] == {"extract": SCHEMA}


def test_without_a_schema_the_same_rows_are_all_kept(tiny_gemma3, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", _rows())
    out = tmp_path / "ds"
    report = build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Extract."))
    assert report["counts"]["quarantined"] == 0
    assert not any("schema" in r for r in read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl"))


@pytest.mark.skipif("schema" not in getattr(Example, "__dataclass_fields__", {}),
                    reason="gemtune/data/sanitise.py does not parse a row's `schema` yet (helper tooluse)")
def test_a_rows_own_schema_wins_over_the_task_schema(tiny_gemma3, tmp_path):
    own = {"type": "object", "required": ["answer"]}
    rows = _rows()
    rows[3] = dict(rows[3], output='{"answer": 42}', schema=own)  # fails the task schema, satisfies its own
    rows[5] = dict(rows[5], output='{"queue": "billing", "priority": 1}', schema=json.dumps(own))  # fails its own
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "ds"
    build([raw], out, DataConfig(base=str(tiny_gemma3), instruction="Extract.", schemas={"extract": SCHEMA}))
    kept = {r["id"]: r for r in read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")}
    assert kept["r3"]["schema"] == own and "r5" not in kept
    q = {r["line"]: r for r in read_jsonl(out / "quarantine.jsonl")}
    assert q[6]["reason"] == "field \"schema\": the answer does not satisfy its schema at $: 'answer' is a required property"


@pytest.mark.parametrize("value, message", [
    ('{"type": "objekt"}', 'not a valid JSON Schema (Draft 2020-12) at type: '),
    ("[1, 2]", "expected a JSON Schema object or the path of a .json file, got list"),
    ("missing.json", "schema file not found: missing.json"),
])
def test_a_bad_schema_in_the_config_names_file_line_and_field(tmp_path, value, message):
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"data:\n  task: t\n  schemas:\n    t: {{\"type\": \"object\"}}\n    extract: {value}\n")
    with pytest.raises(UserError) as e:
        load_data_config(y)
    assert str(e.value).startswith(f'{y}:5: field "data.schemas.extract": {message}'), str(e.value)
