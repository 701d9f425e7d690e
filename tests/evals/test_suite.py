"""Suites: dataset eval.jsonl records and hand-written cases load the same way; every bad line names itself."""

import json

import pytest

from gemtune.errors import UserError
from gemtune.evals.config import EvalConfig, load_eval_config
from gemtune.evals.suite import load_suite


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_dataset_eval_jsonl_last_assistant_turn_is_expected(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "eval.jsonl", [
        {"id": "a", "task": "route", "label": "refund", "messages": [
            {"role": "system", "content": "Route tickets."}, {"role": "user", "content": "money back please"},
            {"role": "assistant", "content": "refund"}]},
        {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])
    suite = load_suite(d)  # a dataset directory is accepted
    a, b = suite.cases
    assert a.messages == [{"role": "system", "content": "Route tickets."}, {"role": "user", "content": "money back please"}]
    assert a.expected == "refund" and a.label == "refund" and [s.type for s in a.scorers] == ["label"]
    assert b.expected == "hello" and [s.type for s in b.scorers] == ["exact"]
    assert suite.labels is None  # one label case: no set to infer
    assert a.prompt_text() == "money back please"


def test_case_format_prompt_scorers_tags_and_inferred_label_set(tmp_path):
    p = write(tmp_path / "suite.jsonl", [
        {"id": "1", "prompt": "route: card late", "expected": "card_arrival", "scorers": ["label"], "tags": ["cards"]},
        {"id": "2", "prompt": "route: refund", "expected": "Refund", "scorers": ["label", "contains"]},
        {"id": "3", "prompt": "json please", "expected": "", "scorers": [{"type": "json_schema", "schema": {"type": "object"}}]},
    ])
    suite = load_suite(p)
    assert [c.id for c in suite.cases] == ["1", "2", "3"]
    assert suite.cases[0].messages == [{"role": "user", "content": "route: card late"}]
    assert suite.cases[0].tags == ["cards"]
    assert suite.labels == frozenset({"card_arrival", "refund"})
    assert load_suite(p).sha256 == suite.sha256
    # config-level defaults: known label set and default scorers
    suite = load_suite(p, EvalConfig(labels=["Card Arrival", "refund", "lost card"]))
    assert suite.labels == frozenset({"card_arrival", "refund", "lost_card"})
    assert len(load_suite(p, max_cases=2).cases) == 2


@pytest.mark.parametrize("line,field,msg", [
    ('{"id": "a", "prompt": "x"}', "expected", "missing"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}]}', "expected", "needs `expected`"),
    ('{"id": "a", "messages": [{"role": "bot", "content": "x"}], "expected": "y"}', "messages", "role"),
    ('{"id": "a", "expected": "y"}', "messages", "needs `messages` or `prompt`"),
    ('{"id": "a", "prompt": "x", "expected": "y", "scorers": ["bleu"]}', "scorers", "unknown scorer"),
    ('{"id": "a", "prompt": "x", "expected": "y", "tags": [1]}', "tags", "list of strings"),
    ('{"id": "c0", "prompt": "x", "expected": "y"}', "id", "duplicate id 'c0' (first on line 1)"),
    ('{"id": "a", "prompt": "x", "expected": {"k": 1}, "scorers": ["exact"]}', "expected", "must be a string"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, msg):
    p = write(tmp_path / "s.jsonl", [{"id": "c0", "prompt": "ok", "expected": "ok"}, line])
    with pytest.raises(UserError) as e:
        load_suite(p)
    assert str(e.value).startswith(f'{p}:2: field "{field}"'), str(e.value)
    assert msg in str(e.value)


def test_not_json_and_empty_and_missing(tmp_path):
    p = write(tmp_path / "s.jsonl", ["{nope"])
    with pytest.raises(UserError, match=r"s.jsonl:1: not valid JSON"):
        load_suite(p)
    with pytest.raises(UserError, match="suite has no cases"):
        load_suite(write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(UserError, match="suite file not found"):
        load_suite(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no eval.jsonl"):
        load_suite(tmp_path)


def test_eval_section_of_gemtune_yaml(tmp_path):
    y = tmp_path / "gemtune.yaml"
    y.write_text("train:\n  lr: 0.001\neval:\n  max_new_tokens: 8\n  gate: 0.05\n  labels: [a, b]\n")
    cfg = load_eval_config(y, batch_size=4, gate=None)
    assert (cfg.max_new_tokens, cfg.gate, cfg.labels, cfg.batch_size) == (8, 0.05, ["a", "b"], 4)
    y.write_text("eval:\n  gate: 2\n")
    with pytest.raises(UserError, match=r'gemtune.yaml:2: field "eval.gate"'):
        load_eval_config(y)
    y.write_text("eval:\n  scorers: [bleu]\n")
    with pytest.raises(UserError, match="unknown scorer"):
        load_eval_config(y)
    y.write_text("eval: [1\n")
    with pytest.raises(UserError, match=r"gemtune.yaml:\d+: invalid YAML"):
        load_eval_config(y)


SHIP_SCHEMA = {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}},
               "additionalProperties": False}


def test_structured_cases_carry_schema_and_tool_calls_and_pick_their_scorers(tmp_path):
    call = {"id": "call_0", "type": "function", "function": {"name": "track", "arguments": '{"id": "S1"}'}}
    p = write(tmp_path / "eval.jsonl", [
        {"id": "j", "task": "extract", "schema": SHIP_SCHEMA, "messages": [
            {"role": "user", "content": "ship S1"}, {"role": "assistant", "content": '{"id": "S1"}'}]},
        {"id": "js", "schema": json.dumps(SHIP_SCHEMA), "messages": [  # a JSON text of a schema (contract C3)
            {"role": "user", "content": "ship S2"}, {"role": "assistant", "content": '{"id": "S2"}'}]},
        {"id": "t", "messages": [{"role": "user", "content": "where is S1?"},
                                 {"role": "assistant", "content": "", "tool_calls": [call]}]},
        {"id": "prose", "schema": SHIP_SCHEMA, "messages": [  # a schema but a prose answer: no json scorer
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"id": "own", "prompt": "x", "expected": {"id": "S3"}, "scorers": [{"type": "json", "pass": "f1>=0.5"}]},
    ])
    j, js_, t, prose, own = load_suite(p).cases
    assert j.schema == SHIP_SCHEMA and js_.schema == SHIP_SCHEMA
    assert [sc.type for sc in j.scorers] == ["json"] and [sc.type for sc in js_.scorers] == ["json"]
    assert t.expected == [call] and [sc.type for sc in t.scorers] == ["tool_call"]
    assert t.messages == [{"role": "user", "content": "where is S1?"}]
    assert [sc.type for sc in prose.scorers] == ["exact"]
    assert own.scorers[0].params == {"pass": "f1>=0.5"} and own.expected == {"id": "S3"}
    # the config's scorers still win for cases without their own
    assert [sc.type for sc in load_suite(p, EvalConfig(scorers=["json"]), max_cases=1).cases[0].scorers] == ["json"]


def test_tool_turns_in_the_prompt_keep_their_fields(tmp_path):
    call = {"id": "call_0", "type": "function", "function": {"name": "track", "arguments": "{}"}}
    rec = {"id": "a", "messages": [{"role": "user", "content": "where?"},
                                   {"role": "assistant", "content": "", "tool_calls": [call]},
                                   {"role": "tool", "tool_call_id": "call_0", "name": "track", "content": "in transit"},
                                   {"role": "assistant", "content": "in transit"}]}
    case = load_suite(write(tmp_path / "s.jsonl", [rec])).cases[0]
    assert case.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert case.messages[2] == {"role": "tool", "content": "in transit", "tool_call_id": "call_0", "name": "track"}
    assert case.expected == "in transit" and [sc.type for sc in case.scorers] == ["exact"]


@pytest.mark.parametrize("rec,field,msg", [
    ({"id": "a", "prompt": "x", "expected": "{}", "schema": {"type": "nonsense"}}, "schema", "invalid JSON Schema"),
    ({"id": "a", "prompt": "x", "expected": "{}", "schema": "{nope"}, "schema", "not JSON"),
    ({"id": "a", "prompt": "x", "expected": "no json", "scorers": ["json"]}, "expected", "not one"),
    ({"id": "a", "prompt": "x", "expected": "[]", "tools": "get_weather"}, "tools", "tools must be a list"),
])
def test_bad_structured_lines(tmp_path, rec, field, msg):
    p = write(tmp_path / "s.jsonl", [rec])
    with pytest.raises(UserError) as e:
        load_suite(p)
    assert str(e.value).startswith(f'{p}:1: field "{field}"'), str(e.value)
    assert msg in str(e.value)
