"""Eval suites: a dataset's frozen `eval.jsonl` or any JSONL of cases, checked whole before anything runs.

Two record shapes are accepted because both exist in practice: dataset records (`messages` ending in the
assistant's answer, which becomes `expected`) and hand-written cases (`id`, `messages` or `prompt`, `expected`,
optional `scorers`, `tags`, `label`, `schema`, `tools`). A bad line is reported with its file, line and field;
nothing is skipped silently, since a suite that quietly shrinks is a gate that quietly weakens.

Structured cases: a record's `schema` (a JSON Schema, or a JSON text of one: contract C3) rides on the case; a final
assistant turn with `tool_calls` makes those calls the expected value. Without scorers of its own or in the config,
a case expecting tool calls is scored by `tool_call`, a case with a schema and a JSON answer by `json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gemtune.base.templates import validate_messages, validate_tools
from gemtune.errors import UserError
from gemtune.evals.config import EvalConfig
from gemtune.evals.scorers import ScorerSpec, check_schema, normalize_label, parse_json_output, parse_scorer
from gemtune.utils import iter_jsonl, sha256_text


@dataclass
class Case:
    id: str
    messages: list[dict]  # the prompt: every turn before the answer
    expected: Any
    scorers: list[ScorerSpec]
    tags: list[str] = field(default_factory=list)
    label: Optional[str] = None
    schema: Any = None
    line: int = 0
    tools: Optional[list] = None  # OpenAI tool definitions offered to the model (rendered into the prompt)

    def key(self) -> str:
        """Identity of what is asked and how it is judged: part of the output-cache key and the suite sha."""
        return sha256_text(json.dumps([self.id, self.messages], sort_keys=True, ensure_ascii=False))

    def prompt_text(self) -> str:
        """The last user turn: what a reader of the report needs to see."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


@dataclass
class Suite:
    path: str
    cases: list[Case]
    config: EvalConfig
    labels: Optional[frozenset[str]] = None

    @property
    def sha256(self) -> str:
        body = [[c.id, c.messages, c.expected, [s.to_json() for s in c.scorers], c.label, c.schema] for c in self.cases]
        return sha256_text(json.dumps(body, sort_keys=True, ensure_ascii=False))


def suite_file(path: str | Path) -> Path:
    """A JSONL file, or a dataset directory holding `eval.jsonl`."""
    p = Path(path)
    if p.is_dir():
        if not (p / "eval.jsonl").is_file():
            raise UserError("directory has no eval.jsonl; pass a suite JSONL or a dataset directory", file=str(p))
        return p / "eval.jsonl"
    if not p.is_file():
        raise UserError("suite file not found", file=str(p))
    return p


def _read_records(p: Path):
    return iter_jsonl(p)


def _messages_and_expected(rec: dict, file: str, n: int) -> tuple[list[dict], Any]:
    if "messages" in rec:
        msgs = rec["messages"]
        try:
            validate_messages(msgs, require_final_assistant=False)
        except UserError as e:
            raise UserError(str(e).split(": ", 1)[-1], file=file, line=n, field="messages") from None
        if msgs[-1]["role"] == "assistant":
            last = msgs[-1]
            expected = rec["expected"] if "expected" in rec else last.get("tool_calls") or last.get("content")
            msgs = msgs[:-1]
        elif "expected" in rec:
            expected = rec["expected"]
        else:
            raise UserError("a case needs `expected`, or `messages` ending with the assistant's answer", file=file,
                            line=n, field="expected")
        return [_turn(m) for m in msgs], expected
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise UserError("prompt must be a non-empty string", file=file, line=n, field="prompt")
        if "expected" not in rec:
            raise UserError("missing", file=file, line=n, field="expected")
        return [{"role": "user", "content": rec["prompt"]}], rec["expected"]
    raise UserError("a case needs `messages` or `prompt`", file=file, line=n, field="messages")


_TURN_FIELDS = ("tool_calls", "tool_call_id", "name")  # tool-use turns keep what renders them (contract C2)


def _turn(m: dict) -> dict:
    t = {"role": m["role"], "content": m.get("content") if m.get("content") is not None else ""}
    t.update({k: m[k] for k in _TURN_FIELDS if m.get(k) is not None})
    return t


def _expects_calls(rec: dict) -> bool:
    msgs = rec.get("messages")
    return bool(isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"
                and msgs[-1].get("tool_calls") and "expected" not in rec)


def _default_scorers(rec: dict, config: EvalConfig, expected: Any, schema: Any) -> list:
    if config.scorers:
        return list(config.scorers)
    if _expects_calls(rec):
        return ["tool_call"]
    if schema is not None and (not isinstance(expected, str) or parse_json_output(expected)[1] is None):
        return ["json"]
    return ["label"] if rec.get("label") is not None else ["exact"]


def _case_schema(rec: dict, file: str, n: int) -> Any:
    """The record's JSON Schema (an object, or a JSON text of one), checked."""
    schema = rec.get("schema")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise UserError(f"schema is a string but not JSON: {e}", file=file, line=n, field="schema") from None
    if schema is not None:
        check_schema(schema, file, n, field="schema")
    return schema


def load_suite(path: str | Path, config: EvalConfig | None = None, *, max_cases: int | None = None) -> Suite:
    config = config or EvalConfig()
    p = suite_file(path)
    file = str(p)
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for n, rec in _read_records(p):
        cid = rec.get("id", f"line-{n}")
        if not isinstance(cid, (str, int)) or isinstance(cid, bool):
            raise UserError("id must be a string", file=file, line=n, field="id")
        cid = str(cid)
        if cid in seen:
            raise UserError(f"duplicate id {cid!r} (first on line {seen[cid]})", file=file, line=n, field="id")
        seen[cid] = n
        msgs, expected = _messages_and_expected(rec, file, n)
        label = rec.get("label")
        if label is not None and not isinstance(label, str):
            raise UserError("label must be a string", file=file, line=n, field="label")
        tags = rec.get("tags", [])
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise UserError("tags must be a list of strings", file=file, line=n, field="tags")
        schema = _case_schema(rec, file, n)
        raw_scorers = rec.get("scorers") or _default_scorers(rec, config, expected, schema)
        if not isinstance(raw_scorers, list):
            raise UserError("scorers must be a list", file=file, line=n, field="scorers")
        target = label if label is not None else expected
        specs = [parse_scorer(s, expected=target if _scorer_name(s) == "label" else expected, file=file, line=n)
                 for s in raw_scorers]
        tools = rec.get("tools")
        try:
            validate_tools(tools)
        except UserError as e:
            raise UserError(str(e).split(": ", 1)[-1], file=file, line=n, field="tools") from None
        cases.append(Case(cid, msgs, expected, specs, tags, label, schema, n, tools))
        if max_cases is not None and len(cases) >= max_cases:
            break
    if not cases:
        raise UserError("suite has no cases", file=file)
    return Suite(file, cases, config, _label_set(cases, config))


def _scorer_name(s) -> str | None:
    return s if isinstance(s, str) else (s.get("type") if isinstance(s, dict) else None)


def _label_set(cases: list[Case], config: EvalConfig) -> Optional[frozenset[str]]:
    """The known labels: configured, else every target of a `label`-scored case (when there are at least two)."""
    if config.labels:
        return frozenset(normalize_label(x) for x in config.labels)
    targets = {normalize_label(str(c.label if c.label is not None else c.expected))
               for c in cases if any(s.type == "label" for s in c.scorers)}
    return frozenset(targets) if len(targets) >= 2 else None
