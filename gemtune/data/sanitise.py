"""Turning a raw input row into a clean conversation, or into a quarantine reason.

Everything that can be wrong with one row is decided here, per row, so a bad row costs the user one quarantine
line (file, line, reason, raw text) and never the build: wrong types, empty fields, broken `messages`
(roles, alternation, last turn not the assistant's), unpaired surrogates from broken encodings, unknown `split`.

Tool-use conversations (assistant `tool_calls`, `tool` turns, a row's `tools`) are checked with the templates' own
validation (`gemtune.base.templates.validate_messages`: every tool turn answers a call of the assistant turn before
it, by id). Call arguments and tool results are cleaned value by value when they are JSON, so control tokens are
neutralised and PII redacted inside them while the JSON stays valid; arguments are kept as a JSON string.
A row's `schema` (a JSON Schema object, or a JSON string of one) is checked with Draft 2020-12's metaschema and
kept on the Example; the pipeline validates the answer against it.

Gemma control tokens typed into content (`<start_of_turn>`, `<end_of_turn>`, `<|turn>`, `<bos>` …) would be
tokenised as the real special tokens and let a row forge turns; they are neutralised by swapping their angle or
square brackets for look-alike characters (‹ › ［ ］), which keeps the text readable and can never match a
special token.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from gemtune.base.templates import call_name_args, validate_messages, validate_tools
from gemtune.data.config import DataConfig
from gemtune.data.readers import RawRow
from gemtune.data.records import PROVENANCE_FIELDS
from gemtune.errors import UserError
from gemtune.utils import json_line_error

ROLES = ("system", "user", "assistant", "tool")
SPLITS = {"train": "train", "eval": "eval", "test": "eval", "validation": "eval", "valid": "eval"}

# Control tokens of Gemma 3 and Gemma 4 chat templates and vocabularies; the base tokenizer adds its own.
GEMMA_CONTROL_TOKENS = (
    "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
    "<|channel>", "<channel|>", "<|think|>",
)
_TOKEN_SHAPE = re.compile(r"<[^<>\s]{1,48}>|\[[^\[\]\s]{1,48}\]")
_UNUSED = re.compile(r"<unused\d+>")
_LOOKALIKE = str.maketrans({"<": "‹", ">": "›", "[": "［", "]": "］"})


class ControlTokens:
    """Finds special-token strings in text: the Gemma list plus every special token of the given tokenizer."""

    def __init__(self, tokenizer: Any = None, specials_extra: Optional[list[str]] = None):
        specials = set(GEMMA_CONTROL_TOKENS) | set(specials_extra or ())
        if tokenizer is not None:
            for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
                if getattr(tok, "special", False):
                    specials.add(str(tok.content))
            specials.update(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
        # Only bracketed tokens can be matched by shape; anything else would need a slower scan and Gemma has none.
        self.specials = frozenset(s for s in specials if _TOKEN_SHAPE.fullmatch(s))
        self.others = tuple(sorted(s for s in specials if not _TOKEN_SHAPE.fullmatch(s) and len(s) > 1))

    def is_special(self, s: str) -> bool:
        return s in self.specials or bool(_UNUSED.fullmatch(s))

    def neutralise(self, text: str) -> tuple[str, int]:
        """(text with every control token made inert, how many were found)."""
        n = 0
        if "<" in text or "[" in text:
            def swap(m: re.Match) -> str:
                nonlocal n
                s = m.group()
                if self.is_special(s):
                    n += 1
                    return s.translate(_LOOKALIKE)
                return s

            text = _TOKEN_SHAPE.sub(swap, text)
        for s in self.others:
            if s in text:
                n += text.count(s)
                text = text.replace(s, s.translate(_LOOKALIKE) if any(c in s for c in "<>[]") else s[0] + "\u2060" + s[1:])
        return text, n


@dataclass(slots=True)
class Example:
    """A row that passed sanitising; PII redaction, ids and hashes come next in the pipeline."""

    file: str
    line: int
    id: Optional[str]
    task: str
    label: Optional[str]
    messages: list[dict]
    provenance: dict
    split: Optional[str]
    key_text: str
    raw: str
    control_tokens: int = 0
    extra: dict = field(default_factory=dict)
    schema: Optional[dict] = None  # the row's JSON Schema for its answer (contract C3)
    tools: Optional[list] = None  # the row's tool definitions (OpenAI shape), for tool-use conversations

    @property
    def output(self) -> str:
        return "\n".join(m["content"] or "" for m in self.messages if m["role"] == "assistant")


class Reject(Exception):
    """A row that cannot be used; `reason` goes to quarantine.jsonl."""

    def __init__(self, reason: str, field: Optional[str] = None):
        super().__init__(reason)
        self.reason = f'field "{field}": {reason}' if field else reason
        self.field = field


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(s: str) -> bool:
    """Unpaired surrogates (from JSON escapes or undecodable bytes) cannot be written as UTF-8."""
    return _SURROGATE.search(s) is not None


def _text(data: dict, name: str, *, required: bool = False) -> Optional[str]:
    """A string field: None/absent allowed unless required; numbers, lists and dicts are wrong types."""
    v = data.get(name)
    if v is None:
        if required:
            raise Reject("missing", name)
        return None
    if not isinstance(v, str):
        raise Reject(f"must be a string, got {type(v).__name__}", name)
    if _has_surrogate(v):
        raise Reject("invalid UTF-8 (unpaired surrogate)", name)
    if required and not v.strip():
        raise Reject("is empty", name)
    return v


def _scalar_str(data: dict, name: str) -> Optional[str]:
    """id / label: strings or integers, stored as strings."""
    v = data.get(name)
    if v is None or v == "":
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise Reject(f"must be a string or an integer, got {type(v).__name__}", name)
    s = str(v).strip()
    if _has_surrogate(s):
        raise Reject("invalid UTF-8 (unpaired surrogate)", name)
    return s or None


def apply_columns(data: dict, columns: dict[str, str]) -> dict:
    """Rename input columns onto gemtune fields; one column may feed several fields (output and label)."""
    if not columns:
        return data
    out = dict(data)
    for target, source in columns.items():
        if source in data:
            out[target] = data[source]
    return out


def _json_field(v: Any, name: str) -> Any:
    """CSV and Parquet carry structured fields as JSON strings."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError as e:
        raise Reject(f"not valid JSON ({e.msg})", name) from None
    except (RecursionError, ValueError) as e:  # nested too deeply; a number over Python's digit limit
        raise Reject(json_line_error(e), name) from None


def _user_error_reason(e: UserError) -> str:
    return str(e).split(": ", 1)[1] if e.field and str(e).startswith("field ") else str(e)


def _turn(i: int, m: Any) -> dict:
    """One turn's own types: role, content (may be empty on an assistant turn that calls tools, or on a tool turn),
    and the tool-use fields as given (their structure is checked with the whole conversation)."""
    if not isinstance(m, dict):
        raise Reject(f"turn {i} is a {type(m).__name__}, expected an object", "messages")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise Reject(f"turn {i} has role {role!r}; expected one of {', '.join(ROLES)}", "messages")
    calls = m.get("tool_calls")
    calls = None if calls in (None, []) else calls
    if content is None and calls is not None:
        content = ""
    if not isinstance(content, str):
        raise Reject(f"turn {i} content must be a string, got {type(content).__name__}", "messages")
    if _has_surrogate(content):
        raise Reject(f"turn {i} content is not valid UTF-8 (unpaired surrogate)", "messages")
    if not content.strip() and calls is None and role != "tool":
        raise Reject(f"turn {i} ({role}) is empty", "messages")
    turn = {"role": role, "content": content}
    if calls is not None:
        turn["tool_calls"] = calls
    for k in ("tool_call_id", "name"):
        if m.get(k) is not None:
            if isinstance(m[k], str) and _has_surrogate(m[k]):
                raise Reject("invalid UTF-8 (unpaired surrogate)", f"messages[{i}].{k}")
            turn[k] = m[k]
    return turn


def _parse_messages(v: Any, tools: Optional[list] = None) -> list:
    v = _json_field(v, "messages")
    if not isinstance(v, list) or not v:
        raise Reject("must be a non-empty list of {role, content} turns", "messages")
    msgs = [_turn(i, m) for i, m in enumerate(v)]
    try:
        validate_messages(msgs, tools=tools)
    except UserError as e:
        raise Reject(_user_error_reason(e), e.field or "messages") from None
    for i, m in enumerate(msgs):  # arguments as objects, in the OpenAI shape; cleaned and re-serialised later
        if "tool_calls" in m:
            m["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": call_name_args(c)[0], "arguments": call_name_args(c)[1]}}
                               for c in m["tool_calls"]]
    return msgs


def _clean_json(value: Any, clean: Callable[[str], str], keys: Callable[[str], str]) -> Any:
    """Every string of a JSON value through `clean` (keys through `keys`); the structure stays as it was."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return [_clean_json(x, clean, keys) for x in value]
    if isinstance(value, dict):
        return {keys(k): _clean_json(x, clean, keys) for k, x in value.items()}
    return value


def _clean_tool_result(text: str, clean: Callable[[str], str], keys: Callable[[str], str]) -> str:
    """A tool result: a JSON object or array is cleaned value by value (it stays valid JSON); other text as text."""
    s = text.strip()
    if s[:1] in ("{", "["):
        try:
            value = json.loads(s)
        except (ValueError, RecursionError):
            return clean(text)
        cleaned = _clean_json(value, clean, keys)
        return text if cleaned == value else json.dumps(cleaned, ensure_ascii=False)
    return clean(text)


def _clean_turns(messages: list[dict], clean: Callable[[str], str], keys: Callable[[str], str]) -> None:
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            m["content"] = _clean_tool_result(m["content"], clean, keys)
        else:
            m["content"] = clean(m["content"])
        for j, c in enumerate(m.get("tool_calls") or []):
            args = json.dumps(_clean_json(c["function"]["arguments"], clean, keys), ensure_ascii=False)
            if _has_surrogate(args):
                raise Reject("invalid UTF-8 (unpaired surrogate)", f"messages[{i}].tool_calls[{j}].function.arguments")
            c["function"]["arguments"] = args


def _tools(data: dict, keys: Callable[[str], str]) -> Optional[list]:
    """A row's tool definitions (OpenAI shape), control tokens neutralised in every string."""
    v = data.get("tools")
    if v is None or v == "" or v == []:
        return None
    v = _json_field(v, "tools")
    try:
        validate_tools(v)
    except UserError as e:
        raise Reject(_user_error_reason(e), e.field or "tools") from None
    if _has_surrogate(json.dumps(v, ensure_ascii=False)):
        raise Reject("invalid UTF-8 (unpaired surrogate)", "tools")
    return _clean_json(v, keys, keys)


@lru_cache(maxsize=256)
def _schema_problem(canonical: str) -> Optional[str]:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(json.loads(canonical))
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"is not a valid JSON Schema (Draft 2020-12){' at ' + where if where else ''}: {e.message}"
    return None


def parse_schema(v: Any) -> Optional[dict]:
    """A row's `schema`: a JSON Schema object or a JSON string of one (None when absent); Reject when invalid."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    v = _json_field(v, "schema")
    if not isinstance(v, dict):
        raise Reject(f"must be a JSON Schema object, got {type(v).__name__}", "schema")
    try:
        canonical = json.dumps(v, sort_keys=True, ensure_ascii=False)
    except (ValueError, RecursionError) as e:
        raise Reject(json_line_error(e), "schema") from None
    if _has_surrogate(canonical):
        raise Reject("invalid UTF-8 (unpaired surrogate)", "schema")
    why = _schema_problem(canonical)
    if why:
        raise Reject(why, "schema")
    return v


@lru_cache(maxsize=1024)
def _basename(file: str) -> str:
    return Path(file).name


def _provenance(data: dict, file: str, defaults: dict[str, str], redact: Callable[[str], str]) -> dict:
    """Provenance of a row: file name and config defaults, then the row's own values (PII-redacted: a reviewer
    field may hold an email address)."""
    prov: dict[str, str] = {"source": _basename(file), **defaults}
    given = data.get("provenance")
    if isinstance(given, str) and given.strip():
        try:
            given = json.loads(given)
        except (RecursionError, ValueError):  # JSONDecodeError, deep nesting, a number over the digit limit
            raise Reject("must be an object (or a JSON object string)", "provenance") from None
    own: dict[str, str] = {}
    if given is not None and given != "":
        if not isinstance(given, dict):
            raise Reject(f"must be an object, got {type(given).__name__}", "provenance")
        for k, v in given.items():
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise Reject(f"value of {k!r} must be a string, got {type(v).__name__}", "provenance")
            own[str(k)] = str(v)
    for k in PROVENANCE_FIELDS:
        v = data.get(k)
        if v is None or v == "":
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise Reject(f"must be a string, got {type(v).__name__}", k)
        own[k] = str(v)
    for k, v in own.items():
        if _has_surrogate(k):
            raise Reject("a key is not valid UTF-8 (unpaired surrogate)", "provenance")
        if _has_surrogate(v):
            raise Reject("invalid UTF-8 (unpaired surrogate)", f"provenance.{k}")
        prov[k] = redact(v)
    return prov


def _identity(text: str) -> str:
    return text


def sanitise_row(row: RawRow, cfg: DataConfig, control: ControlTokens, *, redact: Callable[[str], str] = _identity,
                 task_default: Optional[str] = None) -> Example:
    """A usable, PII-redacted Example, or `Reject` with the reason. Never raises anything else for a data problem.

    Each text field is neutralised and redacted on its own before the conversation is assembled, so the dedup key
    (the input, or the user turns) is exactly the redacted text the model will see.
    """
    if row.error is not None or row.data is None:
        raise Reject(row.error or "unreadable row")
    data = apply_columns(row.data, cfg.columns)
    rid = _scalar_str(data, "id")
    label = _scalar_str(data, "label")
    task = _text(data, "task")
    task = task.strip() if task and task.strip() else (task_default or cfg.task)
    split = _text(data, "split")
    if split is not None and split.strip():
        s = SPLITS.get(split.strip().lower())
        if s is None:
            raise Reject(f"unknown split {split!r}; expected train or eval", "split")
        split = s
    else:
        split = None
    n_ctrl = 0

    def clean(text: str) -> str:
        nonlocal n_ctrl
        text, n = control.neutralise(text)
        n_ctrl += n
        return redact(text)

    def keys(text: str) -> str:
        nonlocal n_ctrl
        text, n = control.neutralise(text)
        n_ctrl += n
        return text

    schema = parse_schema(data.get("schema"))
    tools = _tools(data, keys)
    if data.get("messages") is not None and data.get("messages") != "":
        messages = _parse_messages(data["messages"], tools)
        _clean_turns(messages, clean, keys)
        key = "\n".join(m["content"] for m in messages if m["role"] == "user")
    else:
        output = _text(data, "output", required=True)
        instruction = _text(data, "instruction")
        inp = _text(data, "input")
        system = _text(data, "system")
        own_instruction = bool(instruction and instruction.strip())
        if own_instruction:
            instruction = clean(instruction.strip())
        else:
            instruction = cfg.instruction.strip() if cfg.instruction else None  # the user's own text: no scan needed
        inp = clean(inp.strip()) if inp and inp.strip() else None
        if not instruction and not inp:
            raise Reject("row has neither an instruction nor an input (set `instruction` in the config for "
                         "instruction-less data)", "input")
        if not inp and not own_instruction:
            # the configured instruction ("Route the ticket.") is a task over an input; without one the example
            # teaches the model to answer an empty ticket. A row with its own instruction may stand alone.
            raise Reject("empty input: the configured instruction has nothing to act on", "input")
        user = f"{instruction}\n\n{inp}" if instruction and inp else (inp or instruction)
        messages = [{"role": "system", "content": clean(system.strip())}] if system and system.strip() else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": clean(output.strip())}]
        key = inp if inp else instruction
    prov = _provenance(data, row.file, cfg.provenance, redact)
    return Example(file=row.file, line=row.line, id=rid, task=task, label=label, messages=messages, provenance=prov,
                   split=split, key_text=key, raw=row.raw, control_tokens=n_ctrl, schema=schema, tools=tools)
