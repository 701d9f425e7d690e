"""Scorers on hand-written outputs: each check passes what it should and names why it fails."""

import pytest

from gemtune.errors import UserError
from gemtune.evals.scorers import ScoreContext, normalize_label, parse_scorer, predict_label, score_one

CTX = ScoreContext()


def s(spec, output, expected="", ctx=CTX, **kw):
    return score_one(parse_scorer(spec, expected=expected), output, expected, ctx, **kw)


def test_exact_strips_whitespace_only():
    assert s("exact", "  refund\n", "refund").passed is True
    assert s("exact", "Refund", "refund").passed is False
    assert s({"type": "exact", "ignore_case": True}, "Refund", "refund").passed is True


def test_label_normalises_and_uses_the_first_line():
    assert normalize_label("  Card Arrival.\n") == "card_arrival"
    assert normalize_label("card-arrival") == "card_arrival"
    assert s("label", "Card arrival\nBecause the card is late.", "card_arrival").passed is True
    r = s("label", "lost card", "card_arrival")
    assert r.passed is False and "predicted 'lost_card'" in r.detail and r.format_ok is None


def test_label_with_known_set_reports_format_and_takes_longest_prefix():
    labels = frozenset({"card", "card_arrival", "refund"})
    ctx = ScoreContext(labels=labels)
    assert predict_label("card arrival please", labels) == ("card_arrival", False)
    ok = s("label", "card_arrival", "card_arrival", ctx)
    assert ok.passed and ok.format_ok is True
    chatty = s("label", "Card arrival, I think", "card_arrival", ctx)
    assert chatty.passed is True and chatty.format_ok is False  # right answer, wrong shape
    assert s("label", "balance", "refund", ctx).format_ok is False


def test_contains_and_regex():
    assert s("contains", "the refund queue", "refund").passed
    assert not s({"type": "contains", "value": ["refund", "today"]}, "refund later").passed
    assert s({"type": "contains", "value": "REFUND", "ignore_case": True}, "refund").passed
    r = s({"type": "regex", "pattern": r"^\d{3}$", "fullmatch": True}, " 123 ")
    assert r.passed and r.format_ok
    r = s({"type": "regex", "pattern": r"\d+"}, "no digits")
    assert not r.passed and r.format_ok is False and "no match" in r.detail
    assert s("regex", "order 42", r"order \d+").passed  # the pattern may come from `expected`


SCHEMA = {"type": "object", "required": ["queue", "priority"],
          "properties": {"queue": {"enum": ["billing", "refund"]}, "priority": {"type": "integer", "minimum": 1}}}


def test_json_schema_catches_invalid_json_and_schema_violations():
    spec = {"type": "json_schema", "schema": SCHEMA}
    good = s(spec, '{"queue": "refund", "priority": 2}')
    assert good.passed and good.format_ok
    fenced = s(spec, '```json\n{"queue": "billing", "priority": 1}\n```')
    assert fenced.passed
    bad_json = s(spec, '{"queue": "refund", "priority": 2')
    assert bad_json.passed is False and bad_json.format_ok is False and bad_json.detail.startswith("invalid JSON")
    trailing = s(spec, '{"queue": "refund", "priority": 2} thanks!')
    assert trailing.passed is False and "invalid JSON" in trailing.detail
    wrong_enum = s(spec, '{"queue": "shipping", "priority": 2}')
    assert wrong_enum.passed is False and "$.queue" in wrong_enum.detail
    missing = s(spec, '{"queue": "refund"}')
    assert missing.passed is False and "'priority' is a required property" in missing.detail
    wrong_type = s(spec, '{"queue": "refund", "priority": "high"}')
    assert wrong_type.passed is False and "$.priority" in wrong_type.detail
    # no schema: valid JSON is enough; the case's own `schema` is used when the spec has none
    assert s("json_schema", "[1, 2]").passed
    assert s("json_schema", '{"queue": "x"}', case_schema=SCHEMA).passed is False


def test_latency_applies_only_when_measured():
    assert s({"type": "latency", "max_ms": 100}, "x").passed is None
    assert s({"type": "latency", "max_ms": 100}, "x", latency_ms=80.0).passed is True
    r = s({"type": "latency", "max_ms": 100}, "x", latency_ms=180.0)
    assert r.passed is False and "180 ms > 100 ms" in r.detail


@pytest.mark.parametrize("spec,msg", [
    ("bleu", "unknown scorer 'bleu'"),
    ({"type": "regex", "pattern": "(unclosed"}, "invalid regex"),
    ({"type": "json_schema", "schema": {"type": "nonsense"}}, "invalid JSON Schema"),
    ({"type": "contains", "needle": "x"}, "unknown option"),
    (42, "must be a name or an object"),
])
def test_bad_scorer_specs_are_user_errors_with_location(spec, msg):
    with pytest.raises(UserError) as e:
        parse_scorer(spec, expected="x", file="suite.jsonl", line=7)
    assert msg in str(e.value) and str(e.value).startswith("suite.jsonl:7: field \"scorers\"")


# ---------------------------------------------------------------- json and tool_call (issue #15)

from gemtune.evals.scorers import field_regressions, field_summary  # noqa: E402

SHIP = {"type": "object", "additionalProperties": False, "required": ["shipment_id", "origin", "hazardous"],
        "properties": {"shipment_id": {"type": "string"}, "origin": {"type": "string"},
                       "hazardous": {"type": "boolean"}, "priority": {"enum": ["low", "high"]},
                       "weight": {"type": "object"}, "tags": {"type": "array"}, "note": {"type": "string"}}}
EXPECTED = {"shipment_id": "A1", "origin": "Rotterdam", "weight": {"value": 1200, "unit": "kg"}, "hazardous": False,
            "tags": ["x", "y"]}


def js(output, expected=EXPECTED, spec="json", **kw):
    return s(spec, output, expected, **kw)


def test_json_per_field_precision_recall_f1_on_a_hand_made_pair():
    # right: shipment_id, weight.value (1200.0 == 1200), weight.unit, hazardous, tags x and y (any order)
    # wrong: origin (fp + fn); extra: tags "z", note
    out = ('{"tags": ["y", "x", "z"], "hazardous": false, "weight": {"unit": "kg", "value": 1200.0}, '
           '"origin": "Rotterdam, NL", "shipment_id": "A1", "note": "fragile"}')
    r = js(out)
    m = r.metrics
    assert (m["tp"], m["fp"], m["fn"]) == (6, 3, 1)
    assert m["per_key"] == {"shipment_id": [1, 0, 0], "origin": [0, 1, 1], "weight.value": [1, 0, 0],
                            "weight.unit": [1, 0, 0], "hazardous": [1, 0, 0], "tags": [2, 1, 0], "note": [0, 1, 0]}
    assert m["f1"] == 0.75 and m["exact"] is False and m["valid"] is True and m["schema_valid"] is None
    assert r.passed is False and r.format_ok is True
    assert 'origin: expected "Rotterdam", got "Rotterdam, NL"' in r.detail and 'note: expected absent' in r.detail
    summ = field_summary([{"scores": {"json": r.to_json()}}])["json"]
    assert summ["micro"] == {"precision": 0.666667, "recall": 0.857143, "f1": 0.75, "tp": 6, "fp": 3, "fn": 1}
    assert summ["per_key"]["tags"] == {"precision": 0.666667, "recall": 1.0, "f1": 0.8, "tp": 2, "fp": 1, "fn": 0,
                                       "support": 2}
    assert summ["per_key"]["origin"]["f1"] == 0.0 and summ["per_key"]["note"]["support"] == 0


def test_json_key_order_spacing_fence_and_number_form_never_matter_but_types_do():
    out = '```json\n{ "hazardous":false,"tags":["x","y"],\n "weight":{"unit":"kg","value":1.2e3},"origin":"Rotterdam","shipment_id":"A1"}\n```'
    r = js(out)
    assert r.passed is True and r.metrics["exact"] and r.metrics["f1"] == 1.0 and r.detail == ""
    assert js(out, expected=json_text(EXPECTED)).passed is True  # expected may be the dataset's JSON text
    wrong_type = js('{"shipment_id": "A1", "origin": "Rotterdam", "weight": {"value": 1200, "unit": "kg"}, '
                    '"hazardous": 0, "tags": ["x", "y"]}')
    assert wrong_type.passed is False and wrong_type.metrics["per_key"]["hazardous"] == [0, 1, 1]  # 0 is not false
    # anything but one fence and whitespace around the object is invalid JSON
    chatty = js("Here you go: " + json_text(EXPECTED))
    assert chatty.metrics["valid"] is False and chatty.passed is False


def json_text(v):
    import json

    return json.dumps(v)


def test_invalid_json_is_valid_0_and_every_field_missed():
    r = js('{"shipment_id": "A1", "origin": ', case_schema=SHIP)
    m = r.metrics
    assert m["valid"] is False and m["schema_valid"] is False and r.format_ok is False and r.passed is False
    assert (m["tp"], m["fp"], m["fn"], m["f1"]) == (0, 0, 7, 0.0)
    assert r.detail.startswith("invalid JSON")
    summ = field_summary([{"scores": {"json": r.to_json()}}, {"scores": {"json": js(json_text(EXPECTED), case_schema=SHIP).to_json()}}])
    assert summ["json"]["valid"] == 0.5 and summ["json"]["schema_valid"] == 0.5 and summ["json"]["exact_match"] == 0.5


def test_schema_violation_is_detected_and_f1_pass_rule():
    exp = {"shipment_id": "A1", "origin": "Oslo", "hazardous": True, "priority": "high"}
    bad_enum = '{"shipment_id": "A1", "origin": "Oslo", "hazardous": true, "priority": "urgent"}'
    r = js(bad_enum, exp, case_schema=SHIP)
    assert r.metrics["schema_valid"] is False and r.format_ok is False and "$.priority" in r.detail
    assert r.metrics["f1"] == 0.75
    rule = {"type": "json", "pass": "f1>=0.7"}
    assert js(bad_enum, exp, spec=rule).passed is True  # no schema: F1 0.75 >= 0.7 passes
    assert js(bad_enum, exp, spec=rule, case_schema=SHIP).passed is False  # schema-invalid never passes
    extra_key = js('{"shipment_id": "A1", "origin": "Oslo", "hazardous": true, "priority": "high", "x": 1}', exp,
                   case_schema=SHIP)
    assert extra_key.metrics["schema_valid"] is False and "Additional properties" in extra_key.detail
    # the spec's own schema wins over the case's
    assert js(bad_enum, exp, spec={"type": "json", "schema": {"type": "object"}}, case_schema=SHIP).metrics["schema_valid"]


def test_json_nulls_are_absent_fields():
    exp = {"a": "x", "b": None}
    assert js('{"a": "x", "b": null}', exp).metrics["per_key"] == {"a": [1, 0, 0]}
    assert js('{"a": "x", "b": "y"}', exp).metrics["per_key"]["b"] == [0, 1, 0]  # a value where none was expected
    assert js('{"a": null, "b": null}', exp).metrics["per_key"]["a"] == [0, 0, 1]  # a miss


@pytest.mark.parametrize("spec,expected,msg", [
    ({"type": "json", "pass": "fuzzy"}, "{}", 'must be "exact" or "f1>=X"'),
    ({"type": "json", "pass": "f1>=1.5"}, "{}", 'must be "exact" or "f1>=X"'),
    ("json", "not json", "`expected` is not one"),
    ("tool_call", "no calls", "`expected` is not JSON"),
    ("tool_call", [{"arguments": {}}], 'needs a "name"'),
])
def test_bad_structured_specs(spec, expected, msg):
    with pytest.raises(UserError) as e:
        parse_scorer(spec, expected=expected, file="s.jsonl", line=3)
    assert msg in str(e.value) and str(e.value).startswith("s.jsonl:3:")


CALL = [{"id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]


def tc(name, args):
    return f"<tool_call>\n{json_text({'name': name, 'arguments': args})}\n</tool_call>"


def test_tool_call_name_mismatch_vs_argument_mismatch():
    ok = s("tool_call", tc("get_weather", {"unit": "c", "city": "Paris"}), CALL)
    assert ok.passed is True and ok.metrics["names"] == [1, 0, 0] and ok.metrics["f1"] == 1.0
    args = s("tool_call", tc("get_weather", {"city": "Lyon", "unit": "c"}), CALL)
    assert args.passed is False and args.metrics["names_ok"] is True
    assert args.metrics["per_key"] == {"get_weather.city": [0, 1, 1], "get_weather.unit": [1, 0, 0]}
    assert 'get_weather.city: expected "Paris", got "Lyon"' in args.detail and "not made" not in args.detail
    name = s("tool_call", tc("get_time", {"city": "Paris", "unit": "c"}), CALL)
    assert name.passed is False and name.metrics["names_ok"] is False and name.metrics["names"] == [0, 1, 1]
    assert "expected call(s) not made: ['get_weather']" in name.detail and "unexpected call(s): ['get_time']" in name.detail
    # plain {name, arguments} expected, two calls in any order, and "no call expected"
    two = [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]
    assert s("tool_call", tc("b", {}) + "\n" + tc("a", {"x": 1.0}), two).passed is True
    assert s("tool_call", tc("a", {"x": 1}), two).metrics["names"] == [1, 0, 1]
    none = s("tool_call", tc("a", {}), [])
    assert none.passed is False and "unexpected call(s): ['a']" in none.detail
    assert s("tool_call", "It is sunny.", []).passed is True
    broken = s("tool_call", '<tool_call>\n{"name": "get_weather", "arguments": {city}}\n</tool_call>', CALL)
    assert broken.format_ok is False and broken.metrics["valid"] is False and "unparseable tool call" in broken.detail
    g4 = ScoreContext(family="gemma4")  # the family's own syntax is parsed
    assert s("tool_call", '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>c<|"|>}<tool_call|>', CALL,
             ctx=g4).passed is True
    summ = field_summary([{"scores": {"tool_call": r.to_json()}} for r in (ok, args, name)])["tool_call"]
    assert summ["names_ok"] == 0.666667 and summ["names"]["f1"] == 0.666667 and summ["exact_match"] == 0.333333
    assert summ["per_key"]["get_weather.city"]["f1"] == 0.4  # tp 1, fp 1, fn 2 (the missed call counts too)


def test_field_regressions_sorted_by_drop():
    cand = {"per_key": {"a": {"f1": 0.5, "support": 4}, "b": {"f1": 0.9, "support": 2}, "c": {"f1": 0.1, "support": 1},
                        "d": {"f1": 1.0, "support": 1}}}
    base = {"per_key": {"a": {"f1": 0.6, "support": 4}, "b": {"f1": 0.9, "support": 2}, "c": {"f1": 0.8, "support": 1},
                        "d": {"f1": 0.5, "support": 1}}}
    assert [(d["key"], d["drop"]) for d in field_regressions(cand, base)] == [("c", 0.7), ("a", 0.1)]
