"""Tool use in the templates: the C2 call syntax both ways, hand-checked renderings, masks token by token (only the
assistant's calls and answers), the tokenizer-template path, and validation errors that name the field."""

import json

import pytest

from gemtune.base.families import GEMMA3_TEXT, GEMMA4_TEXT
from gemtune.base.templates import (ToolCallSyntax, format_tool_calls, parse_tool_calls, render, render_prompt,
                                    stop_token_ids, tool_call_syntax, validate_messages)
from gemtune.base.tiny import tiny_tokenizer
from gemtune.errors import UserError

CALLS = [
    {"id": "c1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2, "opts": {"unit": "C", "x": [1, true, null]}}'}},
    {"id": "c2", "type": "function", "function": {"name": "time", "arguments": {}}},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "time"}},
]
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "name": "time", "content": "noon"},
    {"role": "assistant", "content": "Sunny at noon."},
]
G3_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "opts": {"unit": "C", '
            '"x": [1, true, null]}}}\n</tool_call>\n<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>')
G4_CALLS = ('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2,opts:{unit:<|"|>C<|"|>,x:[1,true,null]}}'
            '<tool_call|><|tool_call>call:time{}<tool_call|>')
G4_TOOL_TOKENS = ["<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']


def test_syntax_per_family():
    assert tool_call_syntax("gemma3") == ToolCallSyntax("<tool_call>\n", "\n</tool_call>", "json")
    assert tool_call_syntax(GEMMA4_TEXT) == ToolCallSyntax("<|tool_call>", "<tool_call|>", "gemma4")
    with pytest.raises(UserError, match="family"):
        tool_call_syntax("llama")


@pytest.mark.parametrize("family,text", [("gemma3", G3_CALLS), ("gemma4", G4_CALLS)])
def test_format_and_parse_round_trip(family, text):
    assert format_tool_calls(CALLS, family) == text
    content, calls = parse_tool_calls("Let me check.\n" + text, family)
    assert content == "Let me check."
    assert [c["id"] for c in calls] == ["call_0", "call_1"]
    assert [c["type"] for c in calls] == ["function", "function"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris", "days": 2, "opts": {"unit": "C", "x": [1, True, None]}}, {}]
    assert all(isinstance(c["function"]["arguments"], str) for c in calls)
    # calls only: no content; plain text: no calls
    assert parse_tool_calls(text, family)[0] is None
    assert parse_tool_calls("just words", family) == ("just words", [])


def test_parse_leaves_malformed_blocks_in_the_content():
    bad3 = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(bad3, "gemma3") == (bad3, [])
    bad4 = "<|tool_call>call:f{a:<|\"|>x}<tool_call|>"  # unterminated string
    assert parse_tool_calls(bad4, "gemma4") == (bad4, [])
    # Gemma 4 strings keep quotes, braces and commas literally
    content, calls = parse_tool_calls('<|tool_call>call:f{q:<|"|>a, "b" {c}<|"|>}<tool_call|>', "gemma4")
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"q": 'a, "b" {c}'}


def _runs(tok, r):
    """The supervised tokens as text, one string per contiguous run (decoded token by token)."""
    mask = r.assistant_mask()
    runs, cur = [], []
    for t, m in zip(r.input_ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return ["".join(tok.convert_ids_to_tokens(run)) for run in runs]


def test_gemma3_tool_conversation_text_and_mask():
    tok = tiny_tokenizer("gemma3")
    r = render(CONV, tok, GEMMA3_TEXT, tools=TOOLS)
    tools_json = json.dumps(TOOLS, ensure_ascii=False)
    assert r.text == (
        "<bos><start_of_turn>user\nBe brief.\n\n"
        "You can call these tools (OpenAI function definitions, as JSON):\n" + tools_json + "\n\n"
        "To call a tool, write one block per call:\n<tool_call>\n"
        '{"name": "<tool name>", "arguments": {<the arguments>}}\n</tool_call>\n'
        "Each result comes back in a <tool_response> block.\n\nWeather?<end_of_turn>\n"
        "<start_of_turn>model\n" + G3_CALLS + "<end_of_turn>\n"
        "<start_of_turn>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
        "<end_of_turn>\n<start_of_turn>model\nSunny at noon.<end_of_turn>\n"
    )
    assert "".join(tok.convert_ids_to_tokens(r.input_ids)) == r.text  # one token per char / special token
    assert _runs(tok, r) == [G3_CALLS + "<end_of_turn>", "Sunny at noon.<end_of_turn>"]


@pytest.mark.parametrize("native_tokens", [False, True])
def test_gemma4_tool_conversation_text_and_mask(native_tokens):
    tok = tiny_tokenizer("gemma4")
    if native_tokens:  # as in the real Gemma 4 vocabulary, each tool marker is one special token
        tok.add_tokens(G4_TOOL_TOKENS, special_tokens=True)
    r = render(CONV, tok, GEMMA4_TEXT, tools=TOOLS)
    assert r.text == (
        "<bos><|turn>system\nBe brief."
        '<|tool>declaration:get_weather{description:<|"|>Weather<|"|>,parameters:{properties:{city:{type:<|"|>string'
        '<|"|>}},type:<|"|>object<|"|>}}<tool|><|tool>declaration:time{}<tool|><turn|>\n'
        "<|turn>user\nWeather?<turn|>\n"
        "<|turn>model\n" + G4_CALLS + '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
        '<|tool_response>response:time{value:<|"|>noon<|"|>}<tool_response|>Sunny at noon.<turn|>\n'
    )
    assert "".join(tok.convert_ids_to_tokens(r.input_ids)) == r.text
    if native_tokens:
        assert tok.convert_tokens_to_ids("<|tool_response>") in r.input_ids
    # the calls and the hand-over token, then the answer; never the results, the declarations or the user
    assert _runs(tok, r) == [G4_CALLS + "<|tool_response>", "Sunny at noon.<turn|>"]


@pytest.mark.parametrize("family,fam", [("gemma3", GEMMA3_TEXT), ("gemma4", GEMMA4_TEXT)])
def test_content_with_calls_and_a_call_as_last_turn(family, fam):
    tok = tiny_tokenizer(family)
    conv = [{"role": "user", "content": "time?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": CALLS[1:]}]
    validate_messages(conv)
    r = render(conv, tok, fam)
    calls = format_tool_calls(CALLS[1:], family)
    want = ("Checking.\n" + calls + "<end_of_turn>") if family == "gemma3" else ("Checking." + calls + "<|tool_response>")
    assert _runs(tok, r) == [want]


@pytest.mark.parametrize("family,fam", [("gemma3", GEMMA3_TEXT), ("gemma4", GEMMA4_TEXT)])
def test_prompt_after_tool_results(family, fam):
    tok = tiny_tokenizer(family)
    validate_messages(CONV[:5], require_final_assistant=False)
    p = render_prompt(CONV[:5], tok, fam, tools=TOOLS)
    if family == "gemma3":
        assert p.text.endswith("</tool_response><end_of_turn>\n<start_of_turn>model\n")
    else:  # Gemma 4 goes on in its own turn after the results
        assert p.text.endswith('response:time{value:<|"|>noon<|"|>}<tool_response|>')
    assert p.assistant_spans  # the earlier calls stay supervised in a training rendering of the same prefix


def test_gemma4_tokenizer_template_spans_match_our_own():
    """A tokenizer with its own template (as real Gemma 4 checkpoints): spans come from the model turns' structure."""
    from gemtune.serve.chat_template import GEMMA4

    tok = tiny_tokenizer("gemma4")
    own = render(CONV, tok, GEMMA4_TEXT, tools=TOOLS)
    tok.chat_template = GEMMA4
    theirs = render(CONV, tok, GEMMA4_TEXT, tools=TOOLS)
    assert theirs.input_ids == own.input_ids
    assert theirs.assistant_spans == own.assistant_spans
    assert _runs(tok, theirs) == [G4_CALLS + "<|tool_response>", "Sunny at noon.<turn|>"]


def test_gemma3_tool_conversation_ignores_a_tokenizer_template_without_tools():
    tok = tiny_tokenizer("gemma3")
    own = render(CONV, tok, GEMMA3_TEXT, tools=TOOLS)
    tok.chat_template = "{{ raise_exception('no tools here') }}"
    assert render(CONV, tok, GEMMA3_TEXT, tools=TOOLS).input_ids == own.input_ids


def test_stop_tokens_include_gemma4_tool_hand_over_when_the_vocabulary_has_it():
    tok = tiny_tokenizer("gemma4")
    assert stop_token_ids(tok, GEMMA4_TEXT) == [106, 1]
    tok.add_tokens(G4_TOOL_TOKENS, special_tokens=True)
    assert stop_token_ids(tok, GEMMA4_TEXT) == [106, 1, tok.convert_tokens_to_ids("<|tool_response>")]
    assert stop_token_ids(tiny_tokenizer("gemma3"), GEMMA3_TEXT) == [106, 1]


def _call(cid="c1", name="f", args="{}"):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


U = {"role": "user", "content": "q"}


def _a(*calls, content=None):
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def _t(cid="c1", content="r", **kw):
    return {"role": "tool", "tool_call_id": cid, "content": content, **kw}


A = {"role": "assistant", "content": "done"}


@pytest.mark.parametrize("msgs,field", [
    ([U, _t(), A], "messages[1].role"),  # a tool turn with no call before it
    ([U, _a(_call()), _t("zz"), A], "messages[2].tool_call_id"),  # answers no pending call
    ([U, _a(_call(), _call("c2")), _t(), A], "messages[3].role"),  # c2 unanswered before the assistant goes on
    ([U, _a(_call()), U], "messages[2].role"),  # the user cannot interrupt pending calls
    ([U, _a(_call()), _t(), U, A], "messages[3].role"),  # after results comes the assistant
    ([U, _a(_call()), _t(), _t(), A], "messages[3].tool_call_id"),  # answered twice
    ([U, _a(_call(args="{oops")), _t(), A], "messages[1].tool_calls[0].function.arguments"),
    ([U, _a(_call(args="[1]")), _t(), A], "messages[1].tool_calls[0].function.arguments"),
    ([U, _a(_call(name="bad name{")), _t(), A], "messages[1].tool_calls[0].function.name"),
    ([U, _a({"id": "c1", "type": "function"}), _t(), A], "messages[1].tool_calls[0].function"),
    ([U, _a({"id": "c1", "type": "web", "function": {"name": "f"}}), _t(), A], "messages[1].tool_calls[0].type"),
    ([U, _a(_call(cid="")), _t(""), A], "messages[1].tool_calls[0].id"),
    ([U, _a(_call(), _call()), _t(), A], "messages[1].tool_calls[1].id"),  # duplicate id
    ([U, _a(_call()), _t(name="g"), A], "messages[2].name"),  # name is not the call's
    ([U, _a(_call()), {"role": "tool", "content": "r"}, A], "messages[2].tool_call_id"),
    ([U, _a(_call()), _t(content=None), A], "messages"),
    ([{"role": "user", "content": "q", "tool_calls": [_call()]}, A], "messages[0].tool_calls"),
    ([U, _a(_call()), _t()], "messages"),  # training data must end with the assistant
])
def test_validation_names_the_field(msgs, field):
    with pytest.raises(UserError) as e:
        validate_messages(msgs)
    assert f'field "{field}"' in str(e.value)


@pytest.mark.parametrize("tools,field", [
    ({"name": "f"}, "tools"),
    ([{"type": "function"}], "tools[0]"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
])
def test_bad_tool_definitions_name_the_field(tools, field):
    with pytest.raises(UserError) as e:
        validate_messages([U, A], tools=tools)
    assert f'field "{field}"' in str(e.value)


def test_valid_tool_conversations():
    validate_messages(CONV, tools=TOOLS)
    validate_messages([U, _a(_call())])  # teaching the call itself
    validate_messages([U, _a(_call()), _t()], require_final_assistant=False)  # a prompt after the result
    validate_messages([U, _a(_call()), _t(), _a(_call("c9")), _t("c9"), A])  # several calling steps
    validate_messages([U, _a(_call(), content="Looking."), _t(name="f"), A])
