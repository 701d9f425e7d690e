"""The normalised record written to train.jsonl / eval.jsonl, and reading a built dataset directory back.

A record is `{"id", "task", "messages", "provenance", "sha256"[, "label"][, "schema"]}`. A turn is
`{"role", "content"}` plus, on tool-use conversations, `tool_calls` (an assistant's calls, OpenAI shape) and
`tool_call_id` / `name` (a `tool` turn's result); `schema` is the JSON Schema the answer must satisfy; `tools` the
tool definitions (OpenAI shape) offered to the model in a tool-use conversation (rendered into the prompt). `sha256` covers the content that
training and evaluation see (task, messages, label) in a canonical JSON form, so a frozen eval set can be checked
row by row no matter how the rows were spelled in the input. Provenance is metadata and is not hashed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from gemtune.errors import UserError
from gemtune.utils import iter_jsonl, sha256_file, sha256_text

DATASET_FILES = ("train.jsonl", "eval.jsonl", "eval.lock.json", "quarantine.jsonl", "report.json", "dataset.json")
PROVENANCE_FIELDS = ("source", "reviewer", "review_status", "license", "collected_at")


TURN_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")


def turn(m: dict) -> dict:
    """One turn as the dataset contract keeps it: role and content, and the tool-use fields when present."""
    return {k: m[k] for k in TURN_FIELDS if k in m and (k in ("role", "content") or m[k] is not None)}


def content_sha256(task: str, messages: list[dict], label: Optional[str], schema: Optional[dict] = None,
                   tools: Optional[list] = None) -> str:
    """Hash of what the model sees; key order and whitespace of the input never change it."""
    body: dict[str, Any] = {"task": task, "messages": [turn(m) for m in messages]}
    if label is not None:
        body["label"] = label
    if schema is not None:
        body["schema"] = schema
    if tools:
        body["tools"] = tools
    return sha256_text(json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")))


def make_record(rid: str, task: str, messages: list[dict], provenance: dict, label: Optional[str],
                sha256: Optional[str] = None, schema: Optional[dict] = None, tools: Optional[list] = None) -> dict:
    """A record in the dataset contract; pass `sha256` when already computed (it is the costliest field)."""
    rec: dict[str, Any] = {
        "id": rid,
        "task": task,
        "messages": [turn(m) for m in messages],
        "provenance": provenance,
        "sha256": sha256 or content_sha256(task, messages, label, schema, tools),
    }
    if label is not None:
        rec["label"] = label
    if schema is not None:
        rec["schema"] = schema
    if tools:
        rec["tools"] = tools
    return rec


def _read_records(path: Path) -> list[dict]:
    rows = []
    for i, rec in iter_jsonl(path):
        for k in ("id", "task", "messages", "sha256"):
            if k not in rec:
                raise UserError("record misses a required key", file=str(path), line=i, field=k)
        rows.append(rec)
    return rows


def load_dataset_dir(d: str | Path) -> tuple[list[dict], list[dict], dict]:
    """(train records, eval records, dataset.json) of a `gemtune data build` output directory.

    Refuses a directory that is not a finished build (missing files) with a message that says which file.
    """
    d = Path(d)
    if not d.is_dir():
        raise UserError("dataset directory not found; build one with `gemtune data build`", file=str(d))
    for name in ("train.jsonl", "eval.jsonl", "dataset.json"):
        if not (d / name).is_file():
            raise UserError(f"not a gemtune dataset directory: {name} is missing", file=str(d))
    try:
        meta = json.loads((d / "dataset.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"unreadable dataset.json: {e}", file=str(d / "dataset.json")) from None
    return _read_records(d / "train.jsonl"), _read_records(d / "eval.jsonl"), meta


def tokenizer_sha256(base_dir: str | Path) -> Optional[str]:
    """sha256 of the base's tokenizer.json: the identity of the vocabulary the token counts were made with."""
    p = Path(base_dir) / "tokenizer.json"
    return sha256_file(p) if p.is_file() else None


def check_tokenizer(meta: dict, base_dir: str | Path, *, dataset: str | Path = "dataset") -> None:
    """Refuse to train on a dataset whose lengths were counted with another tokenizer (exit 2 with both hashes)."""
    want = meta.get("tokenizer_sha256")
    have = tokenizer_sha256(base_dir)
    if want and have and want != have:
        raise UserError(
            f"this dataset was built for the tokenizer of {meta.get('base', {}).get('name')!r} "
            f"(tokenizer.json sha256 {want[:12]}…) but the base at {base_dir} has {have[:12]}…; "
            "rebuild it with `gemtune data build --base ...`",
            file=str(Path(dataset) / "dataset.json"), field="tokenizer_sha256",
        )
