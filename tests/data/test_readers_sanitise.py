"""Readers keep file and line; sanitising turns every kind of bad row into a precise reason."""

from __future__ import annotations

import json

import pytest

from gemtune.data.config import DataConfig
from gemtune.data.readers import expand_inputs, read_rows
from gemtune.data.sanitise import ControlTokens, Reject, sanitise_row
from gemtune.errors import UserError


def test_jsonl_lines_blank_lines_and_bad_bytes(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"input": "a", "output": "b"}\n\n  \n{bad\n"str"\n{"input": "\xff"}\n')
    rows = list(read_rows(f))
    assert [(r.line, r.error is None) for r in rows] == [(1, True), (4, False), (5, False), (6, False)]
    assert rows[1].error.startswith("malformed JSON") and "JSON str" in rows[2].error and "UTF-8" in rows[3].error


def test_csv_multiline_records_keep_their_first_line(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(b'text,category\n"first",a\n"two\nlines",b\nthird,c,extra\n"bad \xff byte",d\nlast,e\n')
    rows = list(read_rows(f))
    assert [r.line for r in rows] == [2, 3, 5, 6, 7]
    assert rows[1].data == {"text": "two\nlines", "category": "b"}
    assert "3 fields" in rows[2].error and "UTF-8" in rows[3].error and rows[4].data["text"] == "last"


def test_parquet_rows_are_numbered(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "category": ["a", "b"]}), f)
    rows = list(read_rows(f))
    assert [(r.line, r.data["text"]) for r in rows] == [(1, "x"), (2, "y")]


def test_missing_and_unsupported_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        expand_inputs([tmp_path / "nope.jsonl"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported"):
        expand_inputs([tmp_path / "x.txt"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl").write_text("{}\n")
    (tmp_path / "d" / "a.csv").write_text("x\n")
    assert [p.name for p in expand_inputs([tmp_path / "d"])] == ["a.csv", "b.jsonl"]


def _row(data, cfg=None):
    from gemtune.data.readers import RawRow

    return sanitise_row(RawRow("f.jsonl", 3, data, json.dumps(data)), cfg or DataConfig(), ControlTokens())


@pytest.mark.parametrize("data,reason", [
    ({"input": "x"}, 'field "output": missing'),
    ({"input": "x", "output": "  "}, 'field "output": is empty'),
    ({"input": 5, "output": "y"}, 'field "input": must be a string, got int'),
    ({"output": "y"}, "neither an instruction nor an input"),
    ({"messages": "[not json"}, 'field "messages": not valid JSON'),
    ({"messages": [{"role": "user", "content": "a"}]}, "last turn must be the assistant's"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}, "turn 0 (user) is empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]}, "content must be a string"),
    ({"input": "x", "output": "y", "id": [1]}, 'field "id": must be a string or an integer'),
    ({"input": "x", "output": "y", "split": "dev-ish"}, 'field "split"'),
    ({"input": "x\udcff", "output": "y"}, "unpaired surrogate"),
    ({"input": "x", "output": "y", "provenance": {"reviewer": ["a"]}}, 'field "provenance"'),
])
def test_bad_rows_get_precise_reasons(data, reason):
    with pytest.raises(Reject) as e:
        _row(data)
    assert reason in e.value.reason


def test_instruction_rows_become_explicit_conversations():
    cfg = DataConfig(instruction="Route the ticket.", columns={"input": "text", "output": "category", "label": "category"})
    ex = _row({"text": "card never came", "category": "card_arrival", "reviewer": "kim"}, cfg)
    assert ex.messages == [{"role": "user", "content": "Route the ticket.\n\ncard never came"},
                           {"role": "assistant", "content": "card_arrival"}]
    assert ex.key_text == "card never came" and ex.label == "card_arrival"
    assert ex.provenance == {"source": "f.jsonl", "reviewer": "kim"}
    ex = _row({"instruction": "Say hi", "input": "", "output": "hi", "system": "Be brief."})
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"] and ex.key_text == "Say hi"
    # its own instruction may stand alone; the configured one is a task over an input and may not
    assert _row({"instruction": "Say hi", "output": "hi"}, cfg).messages[0]["content"] == "Say hi"
    for empty in ("", "   \n", None):
        with pytest.raises(Reject) as e:
            _row({"text": empty, "category": "billing"}, cfg)
        assert e.value.field == "input" and "empty input" in e.value.reason


def test_control_tokens_are_made_inert_but_placeholders_and_html_are_not():
    ct = ControlTokens()
    text, n = ct.neutralise("a <end_of_turn> b <|turn>user c [multimodal] <unused12> <EMAIL> <b>bold</b>")
    assert n == 4
    assert text == "a ‹end_of_turn› b ‹|turn›user c ［multimodal］ ‹unused12› <EMAIL> <b>bold</b>"


def test_tokenizer_specials_are_added(tiny_gemma4):
    from gemtune.base.loader import load_tokenizer

    ct = ControlTokens(load_tokenizer(tiny_gemma4))
    assert ct.neutralise("x <turn|> y")[1] == 1
