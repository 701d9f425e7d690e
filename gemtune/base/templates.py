"""Chat templates for Gemma 3 and Gemma 4, with the token span of every assistant turn, tool use included.

Training must put exactly the assistant tokens and their end-of-turn token inside the loss, so rendering returns
the spans as well as the ids. Ids are produced by tokenizing the fully rendered string once (special tokens as the
tokenizer defines them); spans come from character offsets, so they agree with the ids by construction.

When the tokenizer carries its own chat template we render with it (a real Gemma 4 checkpoint's template stays
authoritative) and locate the assistant turns in its output; when it has none (the embedded GGUF) we use ours.

Tool use (OpenAI shape: assistant `tool_calls`, `tool` turns with `tool_call_id`/`name`/`content`, `tools=`
definitions). The spans cover the assistant's calls and answers, never tool results or tool definitions.

- Gemma 4 has native tool tokens; ours renders them the way its chat template does: definitions in the system
  turn as `<|tool>declaration:NAME{...}<tool|>`, each call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`
  (Gemma 4's value notation: bare keys in sorted order, strings between `<|"|>`), and the results inside the same
  model turn as `<|tool_response>response:NAME{value:<|"|>...<|"|>}<tool_response|>`, after which the model
  goes on in that turn. The model ends a calling step with `<|tool_response>` (a stop token of real checkpoints),
  so that token is supervised after the calls; the rest of the response block is not.
- Gemma 3 has no tool support; one documented convention: the tools as JSON in the system preamble
  (`GEMMA3_TOOLS_PREAMBLE`), each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in
  the model turn (calls joined by a newline, after the content when there is some), and the results as
  `<tool_response>\\n...\\n</tool_response>` blocks in one user turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from gemtune.base.families import Family
from gemtune.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's function-name alphabet (dots too); nothing a template reads
G4_QUOTE = '<|"|>'
GEMMA3_TOOLS_PREAMBLE = (
    "You can call these tools (OpenAI function definitions, as JSON):\n{tools}\n\n"
    "To call a tool, write one block per call:\n"
    "<tool_call>\n{{\"name\": \"<tool name>\", \"arguments\": {{<the arguments>}}}}\n</tool_call>\n"
    "Each result comes back in a <tool_response> block."
)


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)  # token [start, end), end-of-turn inside
    char_spans: list[tuple[int, int]] = field(default_factory=list)

    def assistant_mask(self) -> list[bool]:
        mask = [False] * len(self.input_ids)
        for s, e in self.assistant_spans:
            for i in range(s, e):
                mask[i] = True
        return mask


# --- tool calls as text (contract C2) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCallSyntax:
    """How one call appears in the assistant's text: `open` + body + `close`.

    `body` is "json" when the text between open and close is the JSON object {"name", "arguments"} (Gemma 3's
    convention; several calls are joined by "\\n"); "gemma4" when it is `call:NAME{...}` in Gemma 4's value
    notation (keys bare and sorted, strings between `<|"|>`, numbers/true/false/null as in JSON, lists in [];
    several calls are concatenated).
    """

    open: str
    close: str
    body: str


_SYNTAX = {
    "gemma3": ToolCallSyntax("<tool_call>\n", "\n</tool_call>", "json"),
    "gemma4": ToolCallSyntax("<|tool_call>", "<tool_call|>", "gemma4"),
}


def _family_name(family) -> str:
    name = family if isinstance(family, str) else getattr(family, "name", None)
    if name not in _SYNTAX:
        raise UserError(f"no tool-call syntax for template family {name!r}", field="family")
    return name


def tool_call_syntax(family) -> ToolCallSyntax:
    """The tool-call syntax of a family (a `Family` or its template name, "gemma3" / "gemma4")."""
    return _SYNTAX[_family_name(family)]


def g4_value(v: Any) -> str:
    """A JSON value in Gemma 4's notation (what its template writes inside calls, declarations and responses)."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{g4_value(v[k])}" for k in sorted(v)) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(g4_value(x) for x in v) + "]"
    if isinstance(v, str):
        return G4_QUOTE + v + G4_QUOTE
    return json.dumps(v)  # numbers, true, false, null


_G4_BARE = re.compile(r"[^\s,:{}\[\]]+")


def _g4_parse(s: str, i: int) -> tuple[Any, int]:
    """One value of Gemma 4's notation at s[i:] → (value, index after it); ValueError when it is not one."""
    while i < len(s) and s[i].isspace():
        i += 1
    if s.startswith(G4_QUOTE, i):
        j = s.find(G4_QUOTE, i + len(G4_QUOTE))
        if j < 0:
            raise ValueError("unterminated string")
        return s[i + len(G4_QUOTE):j], j + len(G4_QUOTE)
    if i < len(s) and s[i] in "{[":
        close, out = ("}", {}) if s[i] == "{" else ("]", [])
        i += 1
        while True:
            while i < len(s) and s[i].isspace():
                i += 1
            if i < len(s) and s[i] == close and not out:
                return out, i + 1
            if close == "}":
                key, i = _g4_parse(s, i)
                if not isinstance(key, str) or not s.startswith(":", i):
                    raise ValueError("expected key:value")
                out[key], i = _g4_parse(s, i + 1)
            else:
                item, i = _g4_parse(s, i)
                out.append(item)
            if s.startswith(",", i):
                i += 1
            elif s.startswith(close, i):
                return out, i + 1
            else:
                raise ValueError(f"expected ',' or '{close}'")
    m = _G4_BARE.match(s, i)
    if not m:
        raise ValueError("expected a value")
    word = m.group()
    try:
        return json.loads(word), m.end()
    except ValueError:
        return word, m.end()  # a bare key (or a bare word a model wrote)


def call_name_args(call: Any, where: str = "tool_calls[0]") -> tuple[str, dict]:
    """(name, arguments as an object) of one OpenAI-shape call; UserError naming the field when it is malformed."""
    if not isinstance(call, dict):
        raise UserError(f"{where} must be an object", field=where)
    if call.get("type", "function") != "function":
        raise UserError(f"{where}.type must be \"function\"", field=f"{where}.type")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise UserError(f"{where}.function must be an object with name and arguments", field=f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise UserError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}",
                        field=f"{where}.function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            raise UserError(f"{where}.function.arguments is not valid JSON", field=f"{where}.function.arguments") from None
    if not isinstance(args, dict):
        raise UserError(f"{where}.function.arguments must be a JSON object", field=f"{where}.function.arguments")
    return name, args


def format_tool_calls(calls: list, family) -> str:
    """OpenAI-shape calls → the assistant text that carries them in this family's syntax."""
    fam = _family_name(family)
    syn = _SYNTAX[fam]
    out = []
    for j, call in enumerate(calls):
        name, args = call_name_args(call, f"tool_calls[{j}]")
        if fam == "gemma3":
            out.append(syn.open + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + syn.close)
        else:
            out.append(syn.open + "call:" + name + g4_value(args) + syn.close)
    return ("\n" if fam == "gemma3" else "").join(out)


_PARSE = {
    "gemma3": re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S),
    "gemma4": re.compile(r"<\|tool_call>\s*call:([A-Za-z0-9_.\-]{1,64})\s*(.*?)<tool_call\|>", re.S),
}


def _parse_one(fam: str, m: re.Match) -> Optional[tuple[str, dict]]:
    try:
        if fam == "gemma3":
            obj = json.loads(m.group(1))
            if not isinstance(obj, dict) or set(obj) - {"name", "arguments"}:
                return None
            return call_name_args({"function": {"name": obj.get("name"), "arguments": obj.get("arguments", {})}})
        args, end = _g4_parse(m.group(2), 0)
        if not isinstance(args, dict) or m.group(2)[end:].strip():
            return None
        return m.group(1), args
    except (ValueError, RecursionError, UserError, IndexError):
        return None


def parse_tool_calls(text: str, family) -> tuple[Optional[str], list[dict]]:
    """Assistant text → (the content without the calls, None when empty; OpenAI-shape calls).

    Each call is {"id": "call_<n>" (n from 0 in order), "type": "function", "function": {"name", "arguments":
    a JSON string}}. A block that does not parse as a call stays in the content.
    """
    fam = _family_name(family)
    calls, kept, pos = [], [], 0
    for m in _PARSE[fam].finditer(text):
        got = _parse_one(fam, m)
        if got is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        name, args = got
        calls.append({"id": f"call_{len(calls)}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None), calls


# --- validation ---------------------------------------------------------------------------------------------------

def validate_tools(tools, where: str = "") -> None:
    """`tools`: a list of OpenAI tool definitions {"type": "function", "function": {"name", "description"?,
    "parameters"?}}."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise UserError(f"{where}tools must be a list of tool definitions", field="tools")
    for k, t in enumerate(tools):
        f = f"tools[{k}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise UserError(f"{where}{f} must be {{\"type\": \"function\", \"function\": {{...}}}}", field=f)
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not TOOL_NAME.fullmatch(fn["name"]):
            raise UserError(f"{where}{f}.function.name must be 1-64 letters, digits, '_', '-' or '.'", field=f"{f}.function.name")
        if "description" in fn and not isinstance(fn["description"], str):
            raise UserError(f"{where}{f}.function.description must be a string", field=f"{f}.function.description")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise UserError(f"{where}{f}.function.parameters must be a JSON Schema object", field=f"{f}.function.parameters")


def _check_turn(i: int, m: Any, where: str) -> list[str]:
    """One turn's own fields; returns the ids of the calls it makes (assistant turns with tool_calls)."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise UserError(f"{where}messages[{i}].role must be one of {ROLES}", field="messages")
    role, content, calls = m["role"], m.get("content"), m.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise UserError(f"{where}messages[{i}].tool_calls must be a list", field=f"messages[{i}].tool_calls")
        if content is not None and not isinstance(content, str):
            raise UserError(f"{where}messages[{i}].content must be a string or null", field=f"messages[{i}].content")
        ids = []
        for j, call in enumerate(calls):
            f = f"messages[{i}].tool_calls[{j}]"
            call_name_args(call, f)
            cid = call.get("id")
            if not isinstance(cid, str) or not cid.strip():
                raise UserError(f"{where}{f}.id must be a non-empty string", field=f"{f}.id")
            if cid in ids:
                raise UserError(f"{where}{f}.id {cid!r} is used twice in one turn", field=f"{f}.id")
            ids.append(cid)
        return ids
    if calls is not None and calls != [] and role != "assistant":
        raise UserError(f"{where}messages[{i}].tool_calls is only allowed on assistant turns", field=f"messages[{i}].tool_calls")
    if not isinstance(content, str):
        raise UserError(f"{where}messages[{i}].content must be a string", field="messages")
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise UserError(f"{where}messages[{i}].tool_call_id must name the call this turn answers",
                            field=f"messages[{i}].tool_call_id")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise UserError(f"{where}messages[{i}].name must be a string", field=f"messages[{i}].name")
    return []


def validate_messages(messages, *, require_final_assistant: bool = True, where: str = "", tools=None) -> None:
    """Roles known, fields well typed, an optional system turn first, then user → assistant, where an assistant
    turn with `tool_calls` is followed by one `tool` turn per call (each answering one of its call ids, by name
    too when a name is given) and then by an assistant turn."""
    validate_tools(tools, where)
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}messages must be a non-empty list", field="messages")
    pending: dict[str, str] = {}  # call id -> function name, of the last assistant turn's unanswered calls
    answered: set[str] = set()  # its answered calls
    expect = "user"
    for i, m in enumerate(messages):
        ids = _check_turn(i, m, where)
        role = m["role"]
        if i == 0 and role == "system":
            continue
        if role == "tool":
            if m["tool_call_id"] in answered:
                raise UserError(f"{where}messages[{i}].tool_call_id {m['tool_call_id']!r} answers a call a second time",
                                field=f"messages[{i}].tool_call_id")
            if expect != "tool":
                raise UserError(f"{where}messages[{i}] is a tool turn that answers no assistant tool call",
                                field=f"messages[{i}].role")
            cid = m["tool_call_id"]
            if cid not in pending:
                raise UserError(f"{where}messages[{i}].tool_call_id {cid!r} answers no pending call of the assistant "
                                f"turn before it (pending: {sorted(pending)})", field=f"messages[{i}].tool_call_id")
            if m.get("name") is not None and m["name"] != pending[cid]:
                raise UserError(f"{where}messages[{i}].name {m['name']!r} is not the name of call {cid!r} "
                                f"({pending[cid]!r})", field=f"messages[{i}].name")
            del pending[cid]
            answered.add(cid)
            expect = "tool" if pending else "assistant"
            continue
        if expect == "tool":
            raise UserError(f"{where}messages[{i}]: every tool call needs its tool turn before the conversation goes on "
                            f"(unanswered: {sorted(pending)})", field=f"messages[{i}].role")
        want = "user" if expect == "user" else "assistant"
        if role != want:
            if i == 0 or messages[i - 1].get("role") != "tool":
                raise UserError(f"{where}messages must alternate user/assistant after an optional system turn",
                                field="messages")
            raise UserError(f"{where}messages[{i}]: after tool results comes the assistant's turn, not {role!r}",
                            field=f"messages[{i}].role")
        if role == "assistant":
            pending = {cid: call_name_args(c)[0] for cid, c in zip(ids, m.get("tool_calls") or [])}
            answered = set()
            expect = "tool" if pending else "user"
        else:
            expect = "assistant"
    if expect == "user" and messages[-1]["role"] == "system":
        raise UserError(f"{where}messages has only a system turn", field="messages")
    if pending and messages[-1]["role"] == "tool":
        raise UserError(f"{where}every tool call needs its tool turn (unanswered: {sorted(pending)})", field="messages")
    if require_final_assistant and messages[-1]["role"] != "assistant":
        raise UserError(f"{where}the last turn must be the assistant's", field="messages")


# --- rendering ----------------------------------------------------------------------------------------------------

def _content(m: dict) -> str:
    return (m.get("content") or "").strip()


def _call_names(messages) -> dict[str, str]:
    """Call id → function name over the conversation (a tool turn without `name` is rendered with its call's)."""
    out = {}
    for m in messages:
        for c in m.get("tool_calls") or []:
            if isinstance(c, dict) and isinstance(c.get("function"), dict):
                out[c.get("id")] = c["function"].get("name")
    return out


def uses_tools(messages, tools) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def gemma3_tools_preamble(tools) -> str:
    return GEMMA3_TOOLS_PREAMBLE.format(tools=json.dumps(tools, ensure_ascii=False)) if tools else ""


def _render_gemma3(messages, add_generation_prompt: bool, bos: str, tools=None):
    """Gemma 3: no system role; the system text (and the tools preamble) prefixes the first user turn, separated by
    a blank line. Tool results go in a user turn as <tool_response> blocks."""
    parts: list[tuple[str, bool]] = [(bos, False)]
    msgs = messages
    system = ""
    if msgs and msgs[0]["role"] == "system":
        system = _content(msgs[0])
        msgs = msgs[1:]
    preamble = "\n\n".join(x for x in (system, gemma3_tools_preamble(tools)) if x)
    prefix = preamble + "\n\n" if (preamble or (messages and messages[0]["role"] == "system")) else ""
    i = 0
    while i < len(msgs):
        m = msgs[i]
        head = prefix if i == 0 else ""
        if m["role"] == "tool":
            blocks = []
            while i < len(msgs) and msgs[i]["role"] == "tool":
                blocks.append("<tool_response>\n" + _content(msgs[i]) + "\n</tool_response>")
                i += 1
            parts.append(("<start_of_turn>user\n" + head + "\n".join(blocks) + "<end_of_turn>\n", False))
            continue
        i += 1
        role = "model" if m["role"] == "assistant" else m["role"]
        parts.append((f"<start_of_turn>{role}\n", False))
        if m["role"] == "assistant":
            text = _content(m)
            if m.get("tool_calls"):
                calls = format_tool_calls(m["tool_calls"], "gemma3")
                text = text + "\n" + calls if text else calls
            parts.append((text + "<end_of_turn>", True))
            parts.append(("\n", False))
        else:
            parts[-1] = (parts[-1][0] + head + _content(m) + "<end_of_turn>\n", False)
    if add_generation_prompt:
        parts.append(("<start_of_turn>model\n", False))
    return parts


def gemma4_declarations(tools) -> str:
    out = []
    for t in tools or []:
        fn = t["function"]
        out.append("<|tool>declaration:" + fn["name"] + g4_value({k: v for k, v in fn.items() if k != "name"}) + "<tool|>")
    return "".join(out)


def _render_gemma4(messages, add_generation_prompt: bool, bos: str, tools=None):
    """Gemma 4: native system role, turns delimited by `<|turn>` and `<turn|>`; tool declarations in the system
    turn; tool results inside the model turn, which goes on after them."""
    parts: list[tuple[str, bool]] = [(bos, False)]
    msgs = messages
    if msgs and msgs[0]["role"] == "system" or tools:
        system = _content(msgs[0]) if msgs and msgs[0]["role"] == "system" else ""
        parts.append(("<|turn>system\n" + system + gemma4_declarations(tools) + "<turn|>\n", False))
        msgs = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    names = _call_names(messages)
    prev = None
    for m in msgs:
        role = m["role"]
        if role == "tool":
            opener = "" if prev == "assistant" else "<|tool_response>"  # the first one ends the model's calling step
            name = m.get("name") or names.get(m.get("tool_call_id")) or "tool"
            parts.append((opener + "response:" + name + "{value:" + G4_QUOTE + _content(m) + G4_QUOTE + "}"
                           + "<tool_response|>", False))
        elif role == "assistant":
            if prev != "tool":
                parts.append(("<|turn>model\n", False))
            calls = format_tool_calls(m["tool_calls"], "gemma4") if m.get("tool_calls") else ""
            parts.append((_content(m) + calls + ("<|tool_response>" if calls else "<turn|>"), True))
            if not calls:
                parts.append(("\n", False))
        else:
            parts.append((f"<|turn>{role}\n" + _content(m) + "<turn|>\n", False))
        prev = role
    if add_generation_prompt and prev != "tool":
        parts.append(("<|turn>model\n", False))
    return parts


def _own_parts(messages, family: Family, add_generation_prompt: bool, bos: str, tools=None):
    if family.name == "gemma3":
        return _render_gemma3(messages, add_generation_prompt, bos, tools)
    return _render_gemma4(messages, add_generation_prompt, bos, tools)


def render_text(messages, family: Family, *, bos: str = "<bos>", add_generation_prompt: bool = False, tools=None) -> str:
    """The conversation as text in gemtune's own Gemma template (no tokenizer needed: fast token counting)."""
    return "".join(p for p, _ in _own_parts(messages, family, add_generation_prompt, bos, tools))


def hf_messages(messages) -> list[dict]:
    """The messages as Hugging Face chat templates expect them: call arguments as objects, not JSON strings."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = dict(m)
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                name, args = call_name_args(c, f"tool_calls[{j}]")
                calls.append({**c, "type": "function", "function": {**c["function"], "arguments": args}})
            m["tool_calls"] = calls
        out.append(m)
    return out


def _gemma4_model_spans(text: str) -> list[tuple[int, int]]:
    """In a Gemma 4 rendering: every model turn's text after its header through `<turn|>`, less the tool response
    blocks inside it (the first `<|tool_response>` after the calls stays: the model emits it to hand over)."""
    spans = []
    for h in re.finditer(r"<\|turn>model\n", text):
        pos = h.end()
        e = text.find("<turn|>", pos)
        end = len(text) if e < 0 else e + len("<turn|>")
        while True:
            j = text.find("<|tool_response>", pos, end)
            if j < 0:
                break
            spans.append((pos, j + len("<|tool_response>")))
            k = j
            while text.startswith("<|tool_response>", k):
                c = text.find("<tool_response|>", k, end)
                k = end if c < 0 else c + len("<tool_response|>")
            pos = k
        if pos < end:
            spans.append((pos, end))
    return [(s, e) for s, e in spans if e > s]


def _tokenizer_template_spans(tokenizer, messages, family: Family, add_generation_prompt: bool, tools=None):
    """Render with the tokenizer's own template; find each assistant content + end-of-turn in order."""
    if uses_tools(messages, tools):
        text = tokenizer.apply_chat_template(hf_messages(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return text, _gemma4_model_spans(text)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        needle = m["content"].strip()
        start = text.find(needle, cursor)
        eot = text.find(family.end_of_turn, start + len(needle)) if start >= 0 else -1
        if start < 0 or eot < 0:
            raise UserError("the tokenizer's chat template does not reproduce an assistant turn verbatim", field="chat_template")
        end = eot + len(family.end_of_turn)
        spans.append((start, end))
        cursor = end
    return text, spans


def render(messages, tokenizer, family: Family, *, add_generation_prompt: bool = False, use_tokenizer_template: bool = True,
           tools=None) -> Rendered:
    """Render and tokenize a conversation; `assistant_spans` covers each assistant turn including end-of-turn (on
    tool use: the calls and the token that ends the calling step; never tool results or definitions).

    A Gemma 3 tokenizer's own template knows no tools, so tool-use conversations use gemtune's convention there.
    """
    bos = tokenizer.bos_token or "<bos>"
    own_for_tools = family.name == "gemma3" and uses_tools(messages, tools)
    if use_tokenizer_template and getattr(tokenizer, "chat_template", None) and not own_for_tools:
        text, char_spans = _tokenizer_template_spans(tokenizer, messages, family, add_generation_prompt, tools)
    else:
        parts = _own_parts(messages, family, add_generation_prompt, bos, tools)
        text, char_spans, pos = "", [], 0
        for piece, is_assistant in parts:
            if is_assistant:
                char_spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    tok_spans = []
    for cs, ce in char_spans:
        idx = [i for i, (s, e) in enumerate(offsets) if e > cs and s < ce]
        if idx:
            tok_spans.append((idx[0], idx[-1] + 1))
    return Rendered(text=text, input_ids=list(ids), assistant_spans=tok_spans, char_spans=char_spans)


def render_prompt(messages, tokenizer, family: Family, use_tokenizer_template: bool = True, tools=None) -> Rendered:
    """The prompt for generation: everything up to and including the model-turn header (after Gemma 4 tool results,
    where the model goes on in its own turn, up to the last result)."""
    return render(messages, tokenizer, family, add_generation_prompt=True, use_tokenizer_template=use_tokenizer_template,
                  tools=tools)


def end_of_turn_id(tokenizer, family: Family) -> int:
    tid = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    if tid is None or tid == tokenizer.unk_token_id:
        raise UserError(f"tokenizer has no {family.end_of_turn} token; is this a {family.name} tokenizer?", field="tokenizer")
    return tid


def stop_token_ids(tokenizer, family: Family) -> list[int]:
    """End-of-turn, EOS, and the family's tool hand-over token where the vocabulary has it as one token (Gemma 4's
    `<|tool_response>`: a model stops there after its calls)."""
    ids = [end_of_turn_id(tokenizer, family)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    for tok in family.tool_stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids
