"""Scorers: does one output satisfy one check?

Each scorer returns a `Score` with `passed` (None when it does not apply, e.g. `latency` without a latency pass)
and, for scorers that define an output *format* (a label from a known set, a regex, JSON), `format_ok` — so the
summary can tell "wrong answer" from "answer in the wrong shape", which need different fixes (data vs template).
Specs are validated when the suite loads, never half-way through a run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from gemtune.errors import UserError

NAMES = ("exact", "label", "contains", "regex", "json_schema", "latency")


@dataclass(frozen=True)
class ScorerSpec:
    type: str
    params: dict = field(default_factory=dict)

    def to_json(self) -> Any:
        return self.type if not self.params else {"type": self.type, **self.params}


@dataclass
class Score:
    passed: Optional[bool]
    detail: str = ""
    format_ok: Optional[bool] = None

    def to_json(self) -> dict:
        d: dict = {"pass": self.passed}
        if self.detail:
            d["detail"] = self.detail
        if self.format_ok is not None:
            d["format_ok"] = self.format_ok
        return d


@dataclass
class ScoreContext:
    """Run-wide facts a scorer may need."""

    labels: Optional[frozenset[str]] = None  # normalised known label set
    max_latency_ms: Optional[float] = None


_ALLOWED = {
    "exact": {"ignore_case"},
    "label": set(),
    "contains": {"value", "ignore_case"},
    "regex": {"pattern", "fullmatch", "ignore_case"},
    "json_schema": {"schema"},
    "latency": {"max_ms"},
}


def parse_scorer(spec: Any, *, expected: Any = None, file: str | None = None, line: int | None = None) -> ScorerSpec:
    """A scorer given as `"name"` or `{"type": name, ...params}`; checked now so a bad spec fails before generating."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("type"), str):
        name, params = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    else:
        raise UserError(f"a scorer must be a name or an object with a \"type\"; got {spec!r}", file=file, line=line,
                        field="scorers")
    if name not in NAMES:
        raise UserError(f"unknown scorer {name!r}; expected one of {', '.join(NAMES)}", file=file, line=line, field="scorers")
    unknown = set(params) - _ALLOWED[name]
    if unknown:
        raise UserError(f"scorer {name!r} has unknown option(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED[name])}",
                        file=file, line=line, field="scorers")
    if name == "regex":
        pattern = params.get("pattern", expected)
        if not isinstance(pattern, str):
            raise UserError("regex scorer needs a \"pattern\" (or a string `expected`)", file=file, line=line, field="scorers")
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"invalid regex {pattern!r}: {e}", file=file, line=line, field="scorers") from None
    if name == "json_schema" and "schema" in params:
        _check_schema(params["schema"], file, line)
    if name in ("exact", "label", "contains") and "value" not in params and not isinstance(expected, str):
        raise UserError(f"scorer {name!r} compares against `expected`, which must be a string", file=file, line=line,
                        field="expected")
    if name == "latency" and "max_ms" in params and not isinstance(params["max_ms"], (int, float)):
        raise UserError("latency scorer \"max_ms\" must be a number", file=file, line=line, field="scorers")
    return ScorerSpec(name, params)


def _check_schema(schema: Any, file, line) -> None:
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise UserError("json_schema \"schema\" must be a JSON Schema object", file=file, line=line, field="scorers")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"invalid JSON Schema: {e.message}", file=file, line=line, field="scorers") from None


# ---------------------------------------------------------------- label normalisation

_LABEL_SEP = re.compile(r"[\W_]+")


def normalize_label(text: str) -> str:
    """`"Card Arrival."` → `card_arrival`: case, punctuation and separators never decide a label."""
    return _LABEL_SEP.sub("_", text.strip().lower()).strip("_")


def first_line(text: str) -> str:
    for ln in text.strip().splitlines():
        if ln.strip():
            return ln.strip()
    return ""


def predict_label(output: str, labels: Optional[frozenset[str]]) -> tuple[str, bool]:
    """(predicted label, in the known set exactly). Without a set the first line is the label; with one, a first
    line that starts with a known label at a word boundary counts as that label (the longest such)."""
    pred = normalize_label(first_line(output))
    if labels is None or pred in labels:
        return pred, labels is not None
    starts = [lab for lab in labels if pred.startswith(lab + "_")]
    return (max(starts, key=len) if starts else pred), False


# ---------------------------------------------------------------- scorers

_FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```\s*$", re.S)


def parse_json_output(output: str) -> tuple[Any, Optional[str]]:
    """(value, error). A single ```json fence around the answer is accepted: chat models add it by habit."""
    text = output.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"


def score_one(spec: ScorerSpec, output: str, expected: Any, ctx: ScoreContext, *, case_schema: Any = None,
              latency_ms: Optional[float] = None) -> Score:
    p = spec.params
    if spec.type == "exact":
        a, b = output.strip(), str(expected).strip()
        if p.get("ignore_case"):
            a, b = a.lower(), b.lower()
        return Score(a == b, "" if a == b else "output differs from expected")
    if spec.type == "label":
        pred, in_set = predict_label(output, ctx.labels)
        want = normalize_label(str(expected))
        ok = pred == want
        return Score(ok, "" if ok else f"predicted {pred!r}, expected {want!r}",
                     format_ok=in_set if ctx.labels is not None else None)
    if spec.type == "contains":
        values = p.get("value", expected)
        values = values if isinstance(values, list) else [values]
        hay = output.lower() if p.get("ignore_case") else output
        missing = [v for v in values if (str(v).lower() if p.get("ignore_case") else str(v)) not in hay]
        return Score(not missing, f"missing {missing!r}" if missing else "")
    if spec.type == "regex":
        flags = re.I if p.get("ignore_case") else 0
        rx = re.compile(p.get("pattern", expected), flags)
        m = rx.fullmatch(output.strip()) if p.get("fullmatch") else rx.search(output)
        return Score(m is not None, "" if m else f"no match for /{rx.pattern}/", format_ok=m is not None)
    if spec.type == "json_schema":
        return _score_json(output, p.get("schema", case_schema))
    if spec.type == "latency":
        budget = p.get("max_ms", ctx.max_latency_ms)
        if latency_ms is None or budget is None:
            return Score(None, "not measured" if latency_ms is None else "no latency budget")
        ok = latency_ms <= budget
        return Score(ok, "" if ok else f"{latency_ms:.0f} ms > {budget:.0f} ms")
    raise AssertionError(spec.type)


def _score_json(output: str, schema: Any) -> Score:
    import jsonschema

    value, err = parse_json_output(output)
    if err:
        return Score(False, err, format_ok=False)
    if schema is None:
        return Score(True, format_ok=True)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        return Score(False, f"schema violation at {e.json_path}: {e.message}", format_ok=False)
    return Score(True, format_ok=True)
