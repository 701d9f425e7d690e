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
