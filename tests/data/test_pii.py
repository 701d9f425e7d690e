"""PII detection against a labelled set built from the formats' own rules (tests/data/fixtures/pii_labelled.jsonl)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gemtune.data.pii import PII_TYPES, find_pii, iban_ok, luhn_ok, redact

FIXTURE = Path(__file__).parent / "fixtures" / "pii_labelled.jsonl"


@pytest.fixture(scope="module")
def labelled() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def test_fixture_has_enough_values_and_hard_negatives(labelled):
    per_type = Counter(p["type"] for r in labelled for p in r["pii"])
    assert all(per_type[t] >= 50 for t in PII_TYPES), per_type
    assert sum(1 for r in labelled if r["kind"] == "negative") >= 80


def test_recall_per_structured_type_is_at_least_098(labelled):
    hit, total = Counter(), Counter()
    for r in labelled:
        found = {(t, v) for t, s, e, v in find_pii(r["text"])}
        for p in r["pii"]:
            total[p["type"]] += 1
            hit[p["type"]] += (p["type"], p["value"]) in found
    for t in PII_TYPES:
        assert hit[t] / total[t] >= 0.98, (t, hit[t], total[t])


def test_no_false_positives_on_hard_negatives_or_beside_real_values(labelled):
    false = []
    for r in labelled:
        wanted = {(p["type"], p["value"]) for p in r["pii"]}
        false += [(r["text"], f) for f in find_pii(r["text"]) if (f[0], f[3]) not in wanted]
    assert false == []


def test_spans_point_at_the_values():
    text = "Mail bob.smith@example.org or call +1 415-555-2671; card 4111 1111 1111 1111."
    for t, s, e, v in find_pii(text):
        assert text[s:e] == v
    assert [f[0] for f in find_pii(text)] == ["EMAIL", "PHONE", "CREDIT_CARD"]


def test_redact_replaces_with_typed_placeholders_and_counts():
    text, counts = redact("SSN 078-05-1120, IBAN GB82 WEST 1234 5698 7654 32, from 10.0.0.7 and fe80::1ff:fe23:4567:890a")
    assert text == "SSN <SSN>, IBAN <IBAN>, from <IP_ADDRESS> and <IP_ADDRESS>"
    assert counts == {"SSN": 1, "IBAN": 1, "IP_ADDRESS": 2}
    assert redact("order #A12345678 shipped 2024-03-15 for $1,299.99") == ("order #A12345678 shipped 2024-03-15 for $1,299.99", {})


@pytest.mark.parametrize("digits,ok", [("4111111111111111", True), ("4111111111111112", False), ("79927398713", True)])
def test_luhn(digits, ok):
    assert luhn_ok(digits) is ok


def test_iban_checks_country_length_and_mod97():
    assert iban_ok("DE89370400440532013000") and iban_ok("GB82WEST12345698765432")
    assert not iban_ok("DE89370400440532013001")  # check digits wrong
    assert not iban_ok("DE8937040044053201300")  # length wrong for DE


def test_invalid_numbers_of_the_right_shape_are_not_pii():
    assert find_pii("card 4111 1111 1111 1112 and SSN 000-12-3456 and 666-12-3456 and IP 256.1.1.1") == []
