"""Scorers: does one output satisfy one check?

Each scorer returns a `Score` with `passed` (None when it does not apply, e.g. `latency` without a latency pass)
and, for scorers that define an output *format* (a label from a known set, a regex, JSON), `format_ok` — so the
summary can tell "wrong answer" from "answer in the wrong shape", which need different fixes (data vs template).
Specs are validated when the suite loads, never half-way through a run.

Structured outputs (`json`, `tool_call`) are scored field by field as well as whole: a case's `Score.metrics`
carries its per-field counts, and `field_summary(rows)` adds them up over a run (micro and per key).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from collections import Counter
from typing import Any, Optional

from gemtune.errors import UserError

NAMES = ("exact", "label", "contains", "regex", "json_schema", "json", "tool_call", "latency")


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
    metrics: Optional[dict] = None  # structured scorers: per-field counts (see `field_summary`)

    def to_json(self) -> dict:
        d: dict = {"pass": self.passed}
        if self.detail:
            d["detail"] = self.detail
        if self.format_ok is not None:
            d["format_ok"] = self.format_ok
        if self.metrics is not None:
            d["metrics"] = self.metrics
        return d


@dataclass
class ScoreContext:
    """Run-wide facts a scorer may need."""

    labels: Optional[frozenset[str]] = None  # normalised known label set
    max_latency_ms: Optional[float] = None
    family: Any = None  # the model's template family (`tool_call` parses its syntax); None = Gemma 3's


_ALLOWED = {
    "exact": {"ignore_case"},
    "label": set(),
    "contains": {"value", "ignore_case"},
    "regex": {"pattern", "fullmatch", "ignore_case"},
    "json_schema": {"schema"},
    "json": {"pass", "schema"},
    "tool_call": set(),
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
    if name in ("json_schema", "json") and "schema" in params:
        check_schema(params["schema"], file, line)
    if name == "json":
        json_pass_rule(params.get("pass", "exact"), file, line)
        expected_json(expected, file, line)
    if name == "tool_call":
        expected_calls(expected, file, line)
    if name in ("exact", "label", "contains") and "value" not in params and not isinstance(expected, str):
        raise UserError(f"scorer {name!r} compares against `expected`, which must be a string", file=file, line=line,
                        field="expected")
    if name == "latency" and "max_ms" in params and not isinstance(params["max_ms"], (int, float)):
        raise UserError("latency scorer \"max_ms\" must be a number", file=file, line=line, field="scorers")
    return ScorerSpec(name, params)


def check_schema(schema: Any, file=None, line=None, field: str = "scorers") -> None:
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise UserError("a \"schema\" must be a JSON Schema object", file=file, line=line, field=field)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"invalid JSON Schema: {e.message}", file=file, line=line, field=field) from None


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
    if spec.type == "json":
        return score_json_fields(output, expected, p.get("schema", case_schema), p.get("pass", "exact"))
    if spec.type == "tool_call":
        return score_tool_calls(output, expected, ctx.family)
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


# ---------------------------------------------------------------- structured outputs: json and tool_call
#
# Fields are leaf paths: `{"weight": {"value": 5, "unit": "kg"}}` has the fields `weight.value` and `weight.unit`.
# A field is right when its value equals the expected one after canonicalisation (key order and spacing never
# matter; numbers compare by value, so 5 == 5.0, but true != 1). A list is one field whose elements compare as a
# multiset of canonical JSON: order never matters and an element (an object included) is right only when whole.
# A null leaf is an absent field: predicting null where a value was expected is a miss (fn), a value where null
# was expected is a false alarm (fp), null for null counts nothing. Exact match compares the whole objects.

_PASS_RULE = re.compile(r"^\s*f1\s*>=\s*([0-9]*\.?[0-9]+)\s*$")


def json_pass_rule(rule: Any, file=None, line=None) -> Optional[float]:
    """`"exact"` -> None (pass = exact object match); `"f1>=0.9"` -> 0.9 (pass = field F1 at least that)."""
    if rule == "exact":
        return None
    m = _PASS_RULE.match(rule) if isinstance(rule, str) else None
    if m is None or float(m.group(1)) > 1.0:
        raise UserError(f"json scorer \"pass\" must be \"exact\" or \"f1>=X\" with X in [0, 1]; got {rule!r}",
                        file=file, line=line, field="scorers")
    return float(m.group(1))


def expected_json(expected: Any, file=None, line=None) -> Any:
    """The expected value of a `json` case: a JSON text (a dataset's assistant answer) or an already-parsed value."""
    if not isinstance(expected, str):
        return expected
    value, err = parse_json_output(expected)
    if err:
        raise UserError(f"the json scorer compares against a JSON value and `expected` is not one ({err})",
                        file=file, line=line, field="expected")
    return value


def _norm(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {str(k): _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def canonical_json(v: Any) -> str:
    """One text per JSON value: sorted keys, no spaces, integral floats as integers."""
    return json.dumps(_norm(v), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_fields(value: Any, prefix: str = "") -> Counter:
    """Multiset of (path, canonical value) leaves; see the comment above for lists and nulls."""
    out: Counter = Counter()

    def walk(v, path):
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(x, f"{path}.{k}" if path else str(k))
        elif isinstance(v, list) and v:
            for x in v:
                out[(path or "$", canonical_json(x))] += 1
        elif v is not None:
            out[(path or "$", canonical_json(v))] += 1

    walk(value, prefix)
    return out


def field_counts(pred: Counter, exp: Counter) -> dict[str, list[int]]:
    """Per key [tp, fp, fn] from two leaf multisets."""
    per: dict[str, list[int]] = {}
    for (key, val), n in exp.items():
        c = per.setdefault(key, [0, 0, 0])
        tp = min(n, pred.get((key, val), 0))
        c[0] += tp
        c[2] += n - tp
    for (key, val), n in pred.items():
        per.setdefault(key, [0, 0, 0])[1] += n - min(n, exp.get((key, val), 0))
    return per


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall, F1 (zero where undefined; all 1.0 when there was nothing to find and nothing found)."""
    if tp + fp + fn == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {"precision": round(tp / (tp + fp), 6) if tp + fp else 0.0,
            "recall": round(tp / (tp + fn), 6) if tp + fn else 0.0,
            "f1": round(2 * tp / (2 * tp + fp + fn), 6)}


def _field_diff(pred: Counter, exp: Counter, per: dict[str, list[int]], limit: int = 4) -> str:
    bad = [k for k, (tp, fp, fn) in sorted(per.items()) if fp or fn]
    parts = []
    for k in bad[:limit]:
        want = sorted(v for (kk, v), n in exp.items() if kk == k for _ in range(n))
        got = sorted(v for (kk, v), n in pred.items() if kk == k for _ in range(n))
        show = lambda xs: "absent" if not xs else xs[0] if len(xs) == 1 else "[" + ", ".join(xs) + "]"  # noqa: E731
        parts.append(f"{k}: expected {show(want)}, got {show(got)}")
    more = f" (+{len(bad) - limit} more)" if len(bad) > limit else ""
    return "; ".join(parts) + more


def _schema_errors(value: Any, schema: Any) -> Optional[str]:
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    return f"schema violation at {errors[0].json_path}: {errors[0].message}" if errors else None


def score_json_fields(output: str, expected: Any, schema: Any = None, rule: Any = "exact") -> Score:
    """Exact object match, per-field counts and schema validity of one JSON answer; `rule` decides the pass."""
    threshold = json_pass_rule(rule)
    want = expected_json(expected)
    exp = json_fields(want)
    value, err = parse_json_output(output)
    pred = Counter() if err else json_fields(value)
    per = field_counts(pred, exp)
    tp, fp, fn = (sum(c[i] for c in per.values()) for i in range(3))
    exact = err is None and canonical_json(value) == canonical_json(want)
    schema_err = None if err or schema is None else _schema_errors(value, schema)
    schema_valid = None if schema is None else (err is None and schema_err is None)
    f1 = prf(tp, fp, fn)["f1"]
    metrics = {"kind": "json", "valid": err is None, "schema_valid": schema_valid, "exact": exact,
               "tp": tp, "fp": fp, "fn": fn, "f1": f1, "per_key": per}
    if threshold is None:
        passed = exact
    else:
        passed = err is None and schema_valid is not False and f1 >= threshold
    details = [d for d in (err, schema_err, "" if exact else _field_diff(pred, exp, per)) if d]
    return Score(passed, "; ".join(details), format_ok=err is None and schema_valid is not False, metrics=metrics)


# tool calls ---------------------------------------------------------------------------------------------------

def _call_of(c: Any, file=None, line=None) -> dict:
    """{name, arguments} from an OpenAI-shape call or a plain {name, arguments} object; arguments parsed."""
    fn = c.get("function") if isinstance(c, dict) and isinstance(c.get("function"), dict) else c
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise UserError(f"a tool call needs a \"name\" (or \"function\": {{\"name\"}}); got {c!r}", file=file,
                        line=line, field="expected")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args, err = parse_json_output(args) if args.strip() else ({}, None)
        if err:
            raise UserError(f"tool call {fn['name']!r}: arguments are not JSON ({err})", file=file, line=line,
                            field="expected")
    return {"name": fn["name"], "arguments": args}


def expected_calls(expected: Any, file=None, line=None) -> list[dict]:
    """Expected calls as [{name, arguments}]: a list of OpenAI-shape or {name, arguments} calls, one such call, or a
    JSON text of either; `[]` means "no tool should be called"."""
    if isinstance(expected, str):
        value, err = parse_json_output(expected)
        if err:
            raise UserError(f"the tool_call scorer needs expected tool calls; `expected` is not JSON ({err})",
                            file=file, line=line, field="expected")
        expected = value
    if isinstance(expected, dict):
        expected = expected["tool_calls"] if isinstance(expected.get("tool_calls"), list) else [expected]
    if not isinstance(expected, list):
        raise UserError("the tool_call scorer needs a list of tool calls as `expected`", file=file, line=line,
                        field="expected")
    return [_call_of(c, file, line) for c in expected]


def parse_output_calls(output: str, family: Any = None) -> tuple[list[dict], Optional[str]]:
    """([{name, arguments}], error) from a model's text, through the family's tool-call syntax (contract C2); a call
    block that does not parse is an error, not a silently missing call."""
    from gemtune.base.templates import parse_tool_calls, tool_call_syntax

    family = family if family is not None else "gemma3"
    calls = [_call_of(c) for c in parse_tool_calls(output, family)[1]]
    opened = output.count(tool_call_syntax(family).open)
    if opened > len(calls):
        return calls, f"unparseable tool call: {opened - len(calls)} of {opened} call block(s) do not parse"
    return calls, None


def _match_calls(pred: list[dict], exp: list[dict]) -> list[tuple[Optional[dict], Optional[dict]]]:
    """(expected, predicted) pairs: each expected call takes the unmatched predicted call of the same name whose
    arguments agree most; leftovers pair with None."""
    free = list(range(len(pred)))
    pairs: list[tuple[Optional[dict], Optional[dict]]] = []
    for e in exp:
        same = [i for i in free if pred[i]["name"] == e["name"]]
        if not same:
            pairs.append((e, None))
            continue
        ef = json_fields(e["arguments"])
        best = max(same, key=lambda i: (sum((json_fields(pred[i]["arguments"]) & ef).values()), -i))
        free.remove(best)
        pairs.append((e, pred[best]))
    return pairs + [(None, pred[i]) for i in free]


def score_tool_calls(output: str, expected: Any, family: Any = None) -> Score:
    """Names first (a missing or unexpected call), then each matched call's arguments as objects (per-argument
    counts under `name.argument`). Pass = the same calls with equal arguments."""
    exp = expected_calls(expected)
    pred, err = parse_output_calls(output, family)
    per: dict[str, list[int]] = {}
    names = [0, 0, 0]
    missing, extra, wrong_args = [], [], []
    for e, p in _match_calls(pred, exp):
        names[0 if e and p else 2 if e else 1] += 1
        if e is None:
            extra.append(p["name"])
        elif p is None:
            missing.append(e["name"])
        ef = json_fields(e["arguments"], e["name"]) if e else Counter()
        pf = json_fields(p["arguments"], p["name"]) if p else Counter()
        for k, c in field_counts(pf, ef).items():
            tot = per.setdefault(k, [0, 0, 0])
            tot[:] = [a + b for a, b in zip(tot, c)]
        if e and p and canonical_json(e["arguments"]) != canonical_json(p["arguments"]):
            wrong_args.append(_field_diff(pf, ef, field_counts(pf, ef), limit=3) or f"{e['name']}: arguments differ")
    tp, fp, fn = (sum(c[i] for c in per.values()) for i in range(3))
    passed = err is None and not missing and not extra and not wrong_args
    details = [d for d in (err, f"expected call(s) not made: {missing}" if missing else "",
                           f"unexpected call(s): {extra}" if extra else "", *wrong_args) if d]
    metrics = {"kind": "tool_call", "valid": err is None, "exact": passed, "names_ok": not missing and not extra,
               "names": names, "tp": tp, "fp": fp, "fn": fn, "f1": prf(tp, fp, fn)["f1"], "per_key": per}
    return Score(passed, "; ".join(details), format_ok=err is None, metrics=metrics)


# run-level aggregation ----------------------------------------------------------------------------------------

def _block(ms: list[dict]) -> dict:
    per: dict[str, list[int]] = {}
    for m in ms:
        for k, c in m["per_key"].items():
            tot = per.setdefault(k, [0, 0, 0])
            tot[:] = [a + b for a, b in zip(tot, c)]
    tp, fp, fn = (sum(m[k] for m in ms) for k in ("tp", "fp", "fn"))
    n = len(ms)
    out = {"cases": n, "exact_match": round(sum(bool(m["exact"]) for m in ms) / n, 6),
           "valid": round(sum(bool(m["valid"]) for m in ms) / n, 6),
           "micro": {**prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn},
           "per_key": {k: {**prf(*c), "tp": c[0], "fp": c[1], "fn": c[2], "support": c[0] + c[2]}
                       for k, c in sorted(per.items())}}
    if ms[0]["kind"] == "json":
        checked = [m["schema_valid"] for m in ms if m.get("schema_valid") is not None]
        out["schema_checked"] = len(checked)
        out["schema_valid"] = round(sum(checked) / len(checked), 6) if checked else None
    else:
        names = [sum(m["names"][i] for m in ms) for i in range(3)]
        out["names"] = {**prf(*names), "tp": names[0], "fp": names[1], "fn": names[2]}
        out["names_ok"] = round(sum(bool(m["names_ok"]) for m in ms) / n, 6)
    return out


CONSTRAINED_SCORES = "scores_constrained"  # the runner's scores of a row's schema-constrained output


def field_summary(rows: list[dict], scores_key: str = "scores") -> dict:
    """Per-field results of a run from its result rows: {"json": {...}, "tool_call": {...}} for the structured
    scorers that ran (each: cases, exact_match, valid, micro P/R/F1, per_key P/R/F1 + support; json adds
    schema_valid over the cases that had a schema, tool_call adds name-level P/R/F1)."""
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        for s in (r.get(scores_key) or {}).values():
            m = s.get("metrics") if isinstance(s, dict) else None
            if isinstance(m, dict) and m.get("kind") in ("json", "tool_call"):
                by_kind.setdefault(m["kind"], []).append(m)
    return {kind: _block(ms) for kind, ms in by_kind.items()}


def field_regressions(candidate: dict, baseline: dict) -> list[dict]:
    """Keys whose F1 dropped versus the baseline (blocks from `field_summary`), largest drop first."""
    out = []
    base = baseline.get("per_key") or {}
    for k, c in (candidate.get("per_key") or {}).items():
        if k in base and base[k]["f1"] - c["f1"] > 1e-9:
            out.append({"key": k, "f1": c["f1"], "baseline_f1": base[k]["f1"],
                        "drop": round(base[k]["f1"] - c["f1"], 6), "support": c["support"]})
    return sorted(out, key=lambda d: (-d["drop"], d["key"]))
