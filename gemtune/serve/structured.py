"""Structured outputs and tool use in OpenAI's shape: `response_format`, `tools` / `tool_choice` → a `GrammarSpec`
the backend decodes under, and a finished answer → `tool_calls`.

Torch-free (the gateway and the vLLM backend use it too); compiling and masking live in `engine_grammar`.

- `response_format`: {"type": "text"} (free), {"type": "json_object"} (any JSON object), {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}} (the schema's grammar; `strict` false is decoded under the schema
  too, as vLLM does). The schema is checked here (size, nesting, the JSON Schema meta-schema) so a bad one is a
  400 naming `response_format.json_schema.schema` before anything is queued.
- `tools` are rendered into the prompt (`gemtune.base.templates`, contract C2). `tool_choice`: "none" (no call is
  parsed), "auto" (default with tools: decode freely, parse calls out of the text), "required" (decode under a
  grammar of one call to any of the tools), {"type": "function", "function": {"name"}} (one call to that tool).
  The call grammar is the family's tool-call syntax (`tool_call_syntax`) around the JSON object {"name",
  "arguments"} whose arguments follow the tool's `parameters` schema (Gemma 3); for Gemma 4 it is `call:NAME{...}`
  in Gemma 4's own value notation, written by `g4_grammar` from the same schemas (a schema keyword that grammar
  cannot enforce is a 400 naming `tools`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from gemtune.errors import UserError
from gemtune.serve.engine_stream import GrammarSpec

MAX_SCHEMA_CHARS = 32_000  # a schema's JSON text; a hostile schema is refused before it reaches the compiler
MAX_SCHEMA_DEPTH = 24  # nesting of the schema document
SCHEMA_FIELD = "response_format.json_schema.schema"


class GrammarError(UserError):
    """A grammar that cannot be used (HTTP 400 naming the field)."""


def _depth(x, limit: int) -> int:
    stack, deepest = [(x, 1)], 0
    while stack and deepest <= limit:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack += [(w, d + 1) for w in v.values()]
        elif isinstance(v, list):
            stack += [(w, d + 1) for w in v]
    return deepest


def check_schema(schema, field: str = SCHEMA_FIELD) -> str:
    """A JSON Schema (dict or JSON text) → its JSON text (property order kept: the grammar emits keys in the
    schema's order), or GrammarError naming `field`."""
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the schema is {len(schema)} characters; at most {MAX_SCHEMA_CHARS}", field=field)
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise GrammarError(f"the schema is not valid JSON: {e}", field=field) from None
    if not isinstance(schema, dict):
        raise GrammarError(f"the schema must be a JSON object, got {type(schema).__name__}", field=field)
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels", field=field)
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS}", field=field)
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise GrammarError(f"invalid JSON Schema{' at ' + where if where else ''}: {e.message[:300]}",
                           field=field) from None
    return text


def _get(x, key: str, default=None):
    if x is None:
        return default
    if isinstance(x, dict):
        return x.get(key, default)
    return getattr(x, key, default)


def response_format_grammar(rf) -> GrammarSpec | None:
    """`response_format` (a dict or the request model) → the grammar to decode under, None for text."""
    if rf is None:
        return None
    kind = _get(rf, "type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "{}", "response_format")
    if kind == "json_schema":
        js = _get(rf, "json_schema")
        schema = _get(js, "schema", None) if isinstance(js, dict) else _get(js, "schema_", None)
        if schema is None:
            raise GrammarError("response_format json_schema needs json_schema.schema", field=SCHEMA_FIELD)
        return GrammarSpec("json_schema", check_schema(schema), SCHEMA_FIELD)
    raise GrammarError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                       field="response_format.type")


def ebnf_literal(s: str) -> str:
    return json.dumps(s)  # EBNF string literals take JSON's escapes


def xgrammar_grammar(spec: GrammarSpec):
    """The spec as an `xgrammar.Grammar`: what the engine compiles, and (as EBNF text) what vLLM is sent for a
    tool call. JSON is emitted compactly with `json.dumps`'s default separators (", ", ": "), so the whitespace
    between tokens is fixed and a decoding always ends."""
    import xgrammar as xgr

    if spec.kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
    if spec.kind == "ebnf":
        return xgr.Grammar.from_ebnf(spec.schema)
    body = xgr.Grammar.from_json_schema(spec.schema, any_whitespace=False, strict_mode=True)
    if spec.kind == "json_schema":
        return body
    if spec.kind == "tool_call":
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {ebnf_literal(spec.open)}"), body,
                                  xgr.Grammar.from_ebnf(f"root ::= {ebnf_literal(spec.close)}"))
    raise GrammarError(f"unknown grammar kind {spec.kind!r}", field=spec.field)


# ------------------------------------------------------------------------------------------------------ tools
@dataclass
class ToolPlan:
    """What a chat request's tools mean for its generation: the definitions to render, the grammar (required /
    named), and whether calls are parsed out of the answer."""

    tools: Optional[list]
    grammar: Optional[GrammarSpec]
    parse: bool


def _call_schema(tool: dict) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_plan(tools, tool_choice, family) -> ToolPlan | None:
    """Validate `tools` / `tool_choice` (UserError naming the field) and plan the generation."""
    from gemtune.base.templates import tool_call_syntax, validate_tools

    if not tools:
        if tool_choice not in (None, "none"):
            raise UserError("tool_choice needs tools", field="tool_choice")
        return None
    validate_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("none", "auto"):
        return ToolPlan(tools, None, choice == "auto")
    if choice == "required":
        chosen = list(tools)
    elif isinstance(choice, dict) and choice.get("type", "function") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise UserError(f"tool_choice names {str(name)[:64]!r}, which is not among the tools",
                            field="tool_choice.function.name")
    else:
        raise UserError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                        '{"name": ...}}', field="tool_choice")
    syntax = tool_call_syntax(family)
    if syntax.body == "gemma4":  # Gemma 4's own value notation: a grammar written for it
        from gemtune.serve.g4_grammar import call_grammar

        for t in chosen:
            check_schema(t["function"].get("parameters") or {"type": "object"}, "tools")
        return ToolPlan(tools, GrammarSpec("ebnf", call_grammar(chosen, open_=syntax.open, close=syntax.close),
                                           "tools"), True)
    if syntax.body != "json":
        raise UserError(f"tool_choice {json.dumps(choice)[:80]} needs a grammar over the call syntax; this base's "
                        f"calls are written in {syntax.body!r} notation, for which gemtune has no grammar: use "
                        '"auto"', field="tool_choice")
    schemas = [_call_schema(t) for t in chosen]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    try:
        text = check_schema(body, "tools")
    except GrammarError as e:
        raise GrammarError(f"a tool's parameters are not a usable JSON Schema: {e}", field="tools") from None
    return ToolPlan(tools, GrammarSpec("tool_call", text, "tools", syntax.open, syntax.close), True)


def tool_calls_of(text: str, family) -> tuple[Optional[str], list[dict]]:
    """A finished answer → (content, OpenAI-shape tool_calls with unique ids)."""
    import uuid

    from gemtune.base.templates import parse_tool_calls

    content, calls = parse_tool_calls(text, family)
    for c in calls:
        c["id"] = f"call_{uuid.uuid4().hex[:24]}"
    return content, calls


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    """Streamed tool calls as OpenAI sends them: per call, a first delta with index, id, type and name (empty
    arguments), then its arguments."""
    out: list[dict[str, Any]] = []
    for k, c in enumerate(calls):
        out.append({"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"], "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": c["function"]["arguments"]}}]})
    return out
