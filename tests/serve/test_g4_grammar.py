"""Gemma 4's forced tool calls: the grammar `g4_grammar.call_grammar` writes admits exactly the calls
`templates.format_tool_calls` writes for arguments that satisfy the tools' schemas, and a real server on a tiny
Gemma 4 base answers `tool_choice` "required" / named with calls whose arguments validate."""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import pytest

from gemtune.base.templates import format_tool_calls, parse_tool_calls
from gemtune.errors import UserError
from gemtune.serve.g4_grammar import call_grammar

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                  "note": {"type": "string", "description": "free text"},
                                  "tags": {"type": "array", "items": {"type": "string"}},
                                  "metric": {"type": "boolean"},
                                  "ratio": {"type": ["number", "null"]}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def _call(name: str, args: dict) -> str:
    return format_tool_calls([{"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}],
                             "gemma4")


@pytest.fixture(scope="module")
def accepts():
    import xgrammar as xgr

    g = xgr.Grammar.from_ebnf(call_grammar([WEATHER, TIME]))
    return lambda s: xgr.testing._is_grammar_accept_string(g, s)


@pytest.mark.parametrize("name, args, ok", [
    ("get_weather", {"city": "Oslo", "days": 3}, True),
    ("get_weather", {"city": "Lima", "days": 7, "note": "wind > 5 m/s, rain?", "tags": ["a", "b c"],
                     "metric": False, "ratio": -0.25}, True),
    ("get_weather", {"city": "Paris", "days": 1, "ratio": None, "tags": []}, True),
    ("get_time", {"zone": "CET"}, True),
    ("get_weather", {"city": "Rome", "days": 3}, False),  # not in the enum
    ("get_weather", {"days": 3}, False),  # a required key missing
    ("get_weather", {"city": "Oslo", "days": 8}, False),  # above maximum
    ("get_weather", {"city": "Oslo", "days": 3, "wind": 1}, False),  # a key the schema does not have
    ("get_weather", {"city": "Oslo", "days": "3"}, False),  # a string where an integer goes
    ("get_time", {}, False),
    ("get_date", {"zone": "UTC"}, False),  # not a tool
])
def test_the_grammar_admits_exactly_the_calls_that_satisfy_the_schema(accepts, name, args, ok):
    assert accepts(_call(name, args)) is ok


def test_keys_in_another_order_or_spaces_are_not_the_notation(accepts):
    good = _call("get_weather", {"city": "Oslo", "days": 3})
    assert accepts(good)
    assert not accepts(good.replace("city:<|\"|>Oslo<|\"|>,days:3", "days:3,city:<|\"|>Oslo<|\"|>"))
    assert not accepts(good.replace(",days", ", days"))


def test_random_valid_arguments_are_admitted_and_parse_back(accepts):
    rng = random.Random(3)
    words = ["a", "Oslo fjord", "x=1; y=2", "émoji 🚚", "100%", "tab\there", "<b>bold</b>", "quote \" ok"]
    for _ in range(60):
        args = {"city": rng.choice(["Paris", "Oslo", "Lima"]), "days": rng.randint(1, 7)}
        if rng.random() < 0.5:
            args["note"] = rng.choice(words)
        if rng.random() < 0.5:
            args["tags"] = rng.sample(words, rng.randint(0, 3))
        if rng.random() < 0.5:
            args["ratio"] = rng.choice([None, 0, 1.5, -2e-3, 12])
        text = _call("get_weather", args)
        assert accepts(text), text
        _, calls = parse_tool_calls(text, "gemma4")
        assert json.loads(calls[0]["function"]["arguments"]) == args


@pytest.mark.parametrize("keyword, value", [("pattern", "^[a-z]+$"), ("format", "date"), ("maxLength", 4)])
def test_keywords_the_notation_cannot_enforce_are_refused_naming_tools(keyword, value):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", keyword: value}}, "required": ["s"]}}}
    with pytest.raises(UserError, match=keyword) as e:
        call_grammar([tool])
    assert e.value.field == "tools"
    for bad in ({"minimum": 1}, {"items": {"type": "string"}}, {"enum": []}):  # nothing to enforce them with
        tool = {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": bad}, "required": ["x"]}}}
        with pytest.raises(UserError) as e:
            call_grammar([tool])
        assert e.value.field == "tools" and "properties.x" in str(e.value), bad
    wide = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 10**6}}}}}
    with pytest.raises(UserError, match="at most"):
        call_grammar([wide])


@pytest.fixture(scope="module")
def g4_server(tiny_fused_gemma4, tmp_path_factory):
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    d = tmp_path_factory.mktemp("g4-registry")
    gw = build_gateway(str(d / "registry"), base=str(tiny_fused_gemma4), max_model_len=1024, max_batch=8, max_queue=32)
    srv = ServerThread(create_app(gw)).start()
    client = httpx.Client(base_url=srv.url, timeout=120)
    yield client
    client.close()
    srv.stop()


def _chat(c, **kw):
    body = {"model": "base", "messages": [{"role": "user", "content": "what is the weather"}], "max_tokens": 160,
            "temperature": 0, **kw}
    return c.post("/v1/chat/completions", json=body)


def test_gemma4_tool_choice_required_and_named_return_calls_that_validate(g4_server):
    tools = [WEATHER, TIME]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
                         ({"type": "function", "function": {"name": "get_weather"}}, "get_weather")):
        r = _chat(g4_server, tools=tools, tool_choice=choice)
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] == "tool_calls", ch
        (call,) = ch["message"]["tool_calls"]
        if name:
            assert call["function"]["name"] == name
        jsonschema.validate(json.loads(call["function"]["arguments"]), params[call["function"]["name"]])


def test_gemma4_tool_choice_with_an_unenforceable_keyword_is_400_naming_tools(g4_server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^a+$"}}, "required": ["s"]}}}
    r = _chat(g4_server, tools=[tool], tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert "pattern" in r.json()["error"]["message"]
