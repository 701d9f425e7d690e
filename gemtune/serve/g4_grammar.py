"""Gemma 4's tool-call notation as a grammar, for `tool_choice` "required" / named on a Gemma 4 base.

A Gemma 4 call is `<|tool_call>call:NAME{...}<tool_call|>`, its arguments in Gemma 4's value notation
(`templates.g4_value`: keys bare and in sorted order, strings between `<|"|>`, numbers / true / false / null as in
JSON, lists in [], no spaces). `call_grammar(tools)` turns the chosen tools' `parameters` JSON Schemas into one EBNF
grammar (xgrammar's dialect) of exactly one such call, which `templates.parse_tool_calls` reads back.

What a schema may say: `type` (one or a list), `properties` / `required` (an object takes exactly its properties,
the required ones always, in sorted order; no other keys), `items`, `enum`, `const`, `anyOf` / `oneOf`, integer
`minimum` / `maximum` spanning at most `MAX_INT_RANGE` values, and annotations (`description`, `title`, `default`,
`examples`). An object without `properties`, or a schema without a type, takes any value. A string is any text
without `<|` or `<<` that does not end in `<` (the notation has no escape for its quote token `<|"|>`). Anything else —
`$ref`, `allOf`, `pattern`, `format`, length and float bounds, `patternProperties`, `not`, `if` — is refused with a
400 naming `tools`: the grammar never claims a constraint it does not enforce.
"""

from __future__ import annotations

import json
from typing import Any

from gemtune.errors import UserError

ANNOTATIONS = {"description", "title", "default", "examples", "$schema", "$comment", "$id"}
SUPPORTED = ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "items", "enum", "const",
                           "anyOf", "oneOf", "minimum", "maximum"}
MAX_INT_RANGE = 500  # integer bounds are written out as alternatives

COMMON = r'''
g4_str ::= "<|\"|>" g4_chars "<|\"|>"
g4_chars ::= ([^<] | "<" [^|<])*
g4_int ::= "-"? ("0" | [1-9] [0-9]*)
g4_num ::= g4_int ("." [0-9]+)? ([eE] [+-]? [0-9]+)?
g4_bool ::= "true" | "false"
g4_key ::= [A-Za-z_] [A-Za-z0-9_.\-]*
g4_any ::= g4_str | g4_num | g4_bool | "null" | "[" (g4_any ("," g4_any)*)? "]" | "{" (g4_key ":" g4_any ("," g4_key ":" g4_any)*)? "}"
'''.strip()

BASIC = {"string": "g4_str", "integer": "g4_int", "number": "g4_num", "boolean": "g4_bool", "null": '"null"'}


def lit(s: str) -> str:
    return json.dumps(s)  # EBNF string literals take JSON's escapes


class _Builder:
    def __init__(self):
        self.rules: list[str] = []

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name} ::= {body}")
        return name

    def value(self, schema: Any, where: str) -> str:
        """An expression (a rule name or literal) for the values `schema` admits."""
        from gemtune.base.templates import g4_value

        if schema is True or schema == {}:
            return "g4_any"
        if not isinstance(schema, dict):
            raise UserError(f"{where}: a schema must be an object", field="tools")
        extra = sorted(set(schema) - SUPPORTED)
        if extra:
            raise UserError(f"{where}: {', '.join(extra)} cannot be enforced in Gemma 4's call notation; use "
                            'tool_choice "auto", or drop the keyword', field="tools")
        if "const" in schema:
            return lit(g4_value(schema["const"]))
        if "enum" in schema:
            if not schema["enum"]:
                raise UserError(f"{where}: an empty enum admits no value", field="tools")
            return self.rule(" | ".join(lit(g4_value(v)) for v in schema["enum"]))
        alts = schema.get("anyOf") or schema.get("oneOf")
        if alts is not None:
            return self.rule(" | ".join(self.value(s, f"{where}.anyOf[{i}]") for i, s in enumerate(alts)))
        types = schema.get("type")
        if types is None:
            if "properties" in schema:
                return self.obj(schema, where)
            if set(schema) - ANNOTATIONS:  # bounds or items with no type to apply them to: not enforced by g4_any
                raise UserError(f"{where}: {', '.join(sorted(set(schema) - ANNOTATIONS))} needs a \"type\" here "
                                "to be enforced in Gemma 4's call notation", field="tools")
            return "g4_any"
        types = types if isinstance(types, list) else [types]
        return self.rule(" | ".join(self.typed(t, schema, where) for t in types))

    def typed(self, t: str, schema: dict, where: str) -> str:
        if t == "object":
            return self.obj(schema, where)
        if t == "array":
            item = self.value(schema.get("items", True), f"{where}.items")
            return self.rule(f'"[" ({item} ("," {item})*)? "]"')
        if t == "integer" and ("minimum" in schema or "maximum" in schema):
            return self.int_range(schema, where)
        if ("minimum" in schema or "maximum" in schema) and t != "integer":
            raise UserError(f"{where}: bounds on a {t} cannot be enforced in Gemma 4's call notation", field="tools")
        if t not in BASIC:
            raise UserError(f"{where}: unknown type {t!r}", field="tools")
        return BASIC[t]

    def int_range(self, schema: dict, where: str) -> str:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if not all(isinstance(v, (int, float)) and float(v).is_integer() for v in (lo, hi)) \
                or hi - lo + 1 > MAX_INT_RANGE or hi < lo:
            raise UserError(f"{where}: integer bounds are enforced only as a range of at most {MAX_INT_RANGE} "
                            "values with both minimum and maximum", field="tools")
        return self.rule(" | ".join(lit(str(v)) for v in range(int(lo), int(hi) + 1)))

    def obj(self, schema: dict, where: str) -> str:
        props = schema.get("properties")
        if props is None:
            return self.rule('"{" (g4_key ":" g4_any ("," g4_key ":" g4_any)*)? "}"')
        if schema.get("additionalProperties", False) not in (False, True):
            raise UserError(f"{where}: additionalProperties schemas cannot be enforced in Gemma 4's call notation",
                            field="tools")
        required = set(schema.get("required", []))
        keys = sorted(props)  # the notation writes keys sorted
        members = [f'{lit(k + ":")} {self.value(props[k], f"{where}.properties.{k}")}' for k in keys]
        # first[i]: members i.. with no leading comma; after[i]: members i.., each preceded by ","
        first, after = ['""'] * (len(keys) + 1), ['""'] * (len(keys) + 1)
        for i in range(len(keys) - 1, -1, -1):
            opt = keys[i] not in required
            after[i] = self.rule(f'("," {members[i]} {after[i + 1]})' + (f" | {after[i + 1]}" if opt else ""))
            first[i] = self.rule(f"({members[i]} {after[i + 1]})" + (f" | {first[i + 1]}" if opt else ""))
        return self.rule(f'"{{" {first[0]} "}}"')


def call_grammar(tools: list[dict], *, open_: str = "<|tool_call>", close: str = "<tool_call|>") -> str:
    """EBNF of one call to any of `tools` (OpenAI tool definitions) in Gemma 4's notation; UserError naming `tools`
    for a schema it cannot enforce."""
    b = _Builder()
    alts = []
    for i, t in enumerate(tools):
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        alts.append(f'{lit("call:" + fn["name"])} {b.value(params, f"tools[{i}].function.parameters")}')
    root = f'root ::= {lit(open_)} ({" | ".join(alts)}) {lit(close)}'
    return "\n".join([root, *b.rules, COMMON])
