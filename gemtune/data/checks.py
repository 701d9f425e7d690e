"""Per-row admission checks after sanitising: the review a row needs and the schema its answer must satisfy.

- **Review** (`data.require_review: [approved, ...]`): a row is kept only when its provenance `review_status` is
  one of the listed values (compared case-insensitively, spaces trimmed). A row without one fails too. Generic
  instruction rows are public data nobody in the project reviewed: one without a `review_status` is exempt unless
  `data.review_generic: true`; one that carries a status is held to the list like any other row.
- **Schema** (a row's own `schema`, else `data.schemas[task]`): the final assistant answer must parse as JSON and
  satisfy the JSON Schema (Draft 2020-12). The answer checked is the one training and eval will see (PII already
  redacted), so a schema constraining a redacted value (a `pattern` on an email address) rejects the row.

Each check returns None (admit) or the quarantine reason. Provenance is summarised here too: the
(source, review_status, license) key the report's provenance table counts rows by.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Optional, Sequence

PROVENANCE_KEY = ("source", "review_status", "license")


def review_reason(provenance: dict, required: Optional[Sequence[str]], *, generic: bool = False,
                  review_generic: bool = False) -> Optional[str]:
    """Why a row fails `require_review`, or None when it passes (or no review is required)."""
    if not required:
        return None
    status = provenance.get("review_status")
    listed = "[" + ", ".join(required) + "]"
    if status is None or not str(status).strip():
        if generic and not review_generic:
            return None
        return f"no review_status; require_review {listed}"
    if str(status).strip().casefold() not in {r.strip().casefold() for r in required}:
        return f"review_status {str(status)!r} not in require_review {listed}"
    return None


@lru_cache(maxsize=256)
def _validator(schema_json: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(schema_json))


def _json_path(path: Sequence[Any]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def final_answer(messages: list[dict]) -> Optional[str]:
    """The content of the last assistant turn (None when there is none)."""
    for m in reversed(messages):
        if m.get("role") == "assistant":
            c = m.get("content")
            return c if isinstance(c, str) else None
    return None


def schema_reason(messages: list[dict], schema: Optional[dict]) -> Optional[str]:
    """Why the final assistant answer does not satisfy `schema`, or None when it does (or there is no schema)."""
    if schema is None:
        return None
    from jsonschema.exceptions import best_match

    answer = final_answer(messages)
    if answer is None or not answer.strip():
        return 'field "schema": the row has a schema but no assistant answer to check'
    try:
        value = json.loads(answer)
    except (ValueError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        return f'field "schema": the answer is not JSON ({msg}), so it cannot satisfy its schema'
    try:
        err = best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(value))
    except RecursionError:
        return 'field "schema": the answer is nested too deeply to check'
    if err is None:
        return None
    return f'field "schema": the answer does not satisfy its schema at {_json_path(err.absolute_path)}: ' \
           f"{err.message[:300]}"


def resolve_schema(row_schema: Optional[dict], task: str, task_schemas: dict[str, dict]) -> Optional[dict]:
    """The row's own schema wins; else the schema the config sets for its task; else none."""
    return row_schema if row_schema is not None else task_schemas.get(task)


def provenance_key(provenance: Optional[dict]) -> tuple[Optional[str], ...]:
    p = provenance or {}
    return tuple((str(p[k]) if p.get(k) not in (None, "") else None) for k in PROVENANCE_KEY)


def raw_provenance(data: Any, columns: dict[str, str], defaults: dict[str, str], source: str) -> dict:
    """Best-effort provenance of a row sanitising rejected (for the report's table only): its file, the config's
    defaults, then the row's own plain values where they can be read."""
    prov: dict = {"source": source, **defaults}
    if not isinstance(data, dict):
        return prov
    data = {**data, **{t: data[c] for t, c in columns.items() if c in data}}
    own = data.get("provenance")
    if isinstance(own, str):
        try:
            own = json.loads(own)
        except (ValueError, RecursionError):
            own = None
    for src in (own if isinstance(own, dict) else {}, data):
        for k in PROVENANCE_KEY:
            v = src.get(k)
            if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip():
                prov[k] = str(v)
    return prov
