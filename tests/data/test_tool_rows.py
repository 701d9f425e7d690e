"""Data rows with tool use and a per-row answer schema: accepted, cleaned inside the JSON, or quarantined with the
reason naming the field."""

from __future__ import annotations

import json

import pytest

from gemtune.data.config import DataConfig
from gemtune.data.readers import RawRow
from gemtune.data.sanitise import ControlTokens, Reject, sanitise_row

CALL = {"id": "c1", "type": "function",
        "function": {"name": "lookup_order", "arguments": '{"email": "jane.doe@example.com", "note": "<end_of_turn>x"}'}}
TOOL_RESULT = '{"status": "shipped", "contact": "call 415-555-0132 or jane.doe@example.com", "n": 3}'
MESSAGES = [
    {"role": "user", "content": "Where is my order? I am jane.doe@example.com"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "name": "lookup_order", "content": TOOL_RESULT},
    {"role": "assistant", "content": "It has shipped."},
]
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order <start_of_turn>",
                                           "parameters": {"type": "object", "properties": {"email": {"type": "string"}}}}}]
SCHEMA = {"type": "object", "properties": {"queue": {"type": "string"}}, "required": ["queue"]}


def _redact(text: str) -> str:
    from gemtune.data.pii import redact

    return redact(text)[0]


def _row(data: dict, **kw):
    return sanitise_row(RawRow("f.jsonl", 7, data, json.dumps(data)), DataConfig(), ControlTokens(), **kw)


def test_tool_conversation_is_kept_with_its_fields():
    e = _row({"messages": MESSAGES, "tools": TOOLS})
    assert [m["role"] for m in e.messages] == ["user", "assistant", "tool", "assistant"]
    call = e.messages[1]["tool_calls"][0]
    assert call["id"] == "c1" and call["type"] == "function" and call["function"]["name"] == "lookup_order"
    assert isinstance(call["function"]["arguments"], str)  # OpenAI shape: a JSON string
    assert e.messages[1]["content"] == ""
    assert e.messages[2]["tool_call_id"] == "c1" and e.messages[2]["name"] == "lookup_order"
    assert e.tools[0]["function"]["name"] == "lookup_order"


def test_pii_and_control_tokens_are_cleaned_inside_arguments_and_results_and_json_stays_valid():
    e = _row({"messages": MESSAGES, "tools": TOOLS}, redact=_redact)
    args = json.loads(e.messages[1]["tool_calls"][0]["function"]["arguments"])
    assert "jane.doe@example.com" not in json.dumps(args) and "<EMAIL>" in args["email"]
    assert "<end_of_turn>" not in args["note"] and "‹end_of_turn›" in args["note"]
    result = json.loads(e.messages[2]["content"])  # still JSON
    assert result["n"] == 3 and result["status"] == "shipped"
    assert "415-555-0132" not in result["contact"] and "jane.doe@example.com" not in result["contact"]
    assert "<start_of_turn>" not in json.dumps(e.tools) and "‹start_of_turn›" in e.tools[0]["function"]["description"]
    assert e.control_tokens == 2
    # a plain-text tool result is redacted as text
    msgs = json.loads(json.dumps(MESSAGES))
    msgs[2]["content"] = "mail jane.doe@example.com"
    e = _row({"messages": msgs}, redact=_redact)
    assert e.messages[2]["content"] == "mail <EMAIL>"


def test_messages_as_a_json_string_with_tool_calls():
    e = _row({"messages": json.dumps(MESSAGES)})
    assert e.messages[1]["tool_calls"][0]["function"]["name"] == "lookup_order"


def _bad(messages):
    return {"messages": messages}


@pytest.mark.parametrize("data,reason", [
    (_bad([MESSAGES[0], MESSAGES[2], MESSAGES[3]]), 'field "messages[1].role"'),
    (_bad([MESSAGES[0], MESSAGES[1], {**MESSAGES[2], "tool_call_id": "zz"}, MESSAGES[3]]), 'field "messages[2].tool_call_id"'),
    (_bad([MESSAGES[0], MESSAGES[1], MESSAGES[3]]), 'field "messages[2].role"'),
    (_bad([MESSAGES[0], {**MESSAGES[1], "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{x"}}]},
           MESSAGES[2], MESSAGES[3]]), 'field "messages[1].tool_calls[0].function.arguments"'),
    (_bad([MESSAGES[0], MESSAGES[1], {**MESSAGES[2], "name": "other"}, MESSAGES[3]]), 'field "messages[2].name"'),
    (_bad(MESSAGES[:3]), "last turn must be the assistant's"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
     'field "tools[0].function.name"'),
    ({"messages": MESSAGES, "tools": "[not json"}, 'field "tools": not valid JSON'),
])
def test_bad_tool_rows_are_quarantined_with_the_field(data, reason):
    with pytest.raises(Reject) as e:
        _row(data)
    assert reason in e.value.reason


@pytest.mark.parametrize("given", [SCHEMA, json.dumps(SCHEMA)])
def test_schema_object_or_json_string_is_parsed(given):
    e = _row({"input": "x", "output": '{"queue": "a"}', "schema": given})
    assert e.schema == SCHEMA


@pytest.mark.parametrize("given", [None, "", "  "])
def test_no_schema_is_none(given):
    assert _row({"input": "x", "output": "y", "schema": given}).schema is None


@pytest.mark.parametrize("given,reason", [
    ({"type": "objekt"}, 'field "schema": is not a valid JSON Schema (Draft 2020-12) at type'),
    ({"properties": {"a": {"minLength": -1}}}, 'field "schema": is not a valid JSON Schema'),
    ("{oops", 'field "schema": not valid JSON'),
    ("[1, 2]", 'field "schema": must be a JSON Schema object, got list'),
    (3, 'field "schema": must be a JSON Schema object, got int'),
])
def test_invalid_schema_rejects_the_row(given, reason):
    with pytest.raises(Reject) as e:
        _row({"input": "x", "output": "y", "schema": given})
    assert e.value.reason.startswith(reason), e.value.reason
