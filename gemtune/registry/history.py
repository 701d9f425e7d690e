"""`routes.json`, the registry's route history: the document, its checks, and the two ways it grows.

    {"format": 1,
     "routes": {"<name>": {"<alias>": {"weights": {"v3": 90, "v4": 10}, "updated_at": "…",
                                       "history": [{"weights": {"v2": 100}, "updated_at": "…"}, …]}}},
     "log": [{"at": "…", "event": "promote", …}, …]}

`history` (per alias, newest last) is what `rollback` pops; `log` is the audit log every push and route change
appends to. A route (or history entry) made with `--force` over a missing eval verdict carries `"forced": true`
and `"forced_reasons"`, so an unvetted route stays visible as such.

This module only reads, checks and edits the document in memory; the caller writes it (atomically, under the
registry lock). The store (a push is logged here) and the route commands (routes.py) both build on it, so neither
imports the other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gemtune.errors import UserError
from gemtune.registry.names import validate_weights

FORMAT = 1
LOG_KEEP = 500
HISTORY_KEEP = 100


def now() -> str:
    """The timestamps routes.json and manifests carry: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def empty_routes() -> dict:
    return {"format": FORMAT, "routes": {}, "log": []}


def read_routes(path: Path) -> dict:
    """Parse and check routes.json (missing → empty table); a hand-edited mistake names the field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return empty_routes()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None
    if not isinstance(data, dict) or not isinstance(data.get("routes", {}), dict):
        raise UserError("expected an object with a 'routes' object", file=str(path), field="routes")
    data.setdefault("format", FORMAT)
    data.setdefault("routes", {})
    data.setdefault("log", [])
    for name, aliases in data["routes"].items():
        if not isinstance(aliases, dict):
            raise UserError(f"routes.{name} must be an object of aliases", file=str(path), field=f"routes.{name}")
        for alias, entry in aliases.items():
            where = f"routes.{name}.{alias}"
            if not isinstance(entry, dict) or not isinstance(entry.get("weights"), dict):
                raise UserError("expected an object with 'weights'", file=str(path), field=where)
            try:
                entry["weights"] = validate_weights(entry["weights"])
            except UserError as e:
                raise UserError(str(e), file=str(path), field=f"{where}.weights") from None
            entry.setdefault("history", [])
    return data


def append_log(data: dict, event: dict) -> None:
    """Add one event to the audit log (timestamped; the oldest beyond LOG_KEEP drop off)."""
    data.setdefault("log", []).append({"at": now(), **event})
    data["log"] = data["log"][-LOG_KEEP:]


ROUTE_META = ("forced", "forced_reasons")  # how a route came to be, kept with it (and with it in history)


def _meta(entry: dict) -> dict:
    return {k: entry[k] for k in ROUTE_META if k in entry}


def set_weights(data: dict, name: str, alias: str, weights: dict[str, int],
                **meta) -> tuple[dict, dict | None]:
    """Point `name@alias` at `weights`; the weights it had go onto its history (unless unchanged), with how they
    came to be (`forced`, `forced_reasons` when a route change overrode a missing eval verdict). `meta` is that
    record for the new weights (none: a plain change). Returns (the alias entry, the weights before or None for a
    new alias)."""
    unknown = set(meta) - set(ROUTE_META)
    if unknown:
        raise ValueError(f"unknown route fields: {sorted(unknown)}")
    aliases = data["routes"].setdefault(name, {})
    entry = aliases.get(alias)
    if entry is None:
        entry = aliases[alias] = {"weights": weights, "updated_at": now(), "history": [], **meta}
        return entry, None
    before = entry["weights"]
    if before != weights:
        entry["history"].append({"weights": before, "updated_at": entry.get("updated_at"), **_meta(entry)})
        entry["history"] = entry["history"][-HISTORY_KEEP:]
    for k in ROUTE_META:
        entry.pop(k, None)
    entry.update(meta)
    entry["weights"], entry["updated_at"] = weights, now()
    return entry, before


def restore(entry: dict, prev: dict) -> None:
    """Rollback: `prev` (popped from the entry's history) becomes the route again, with its own record."""
    for k in ROUTE_META:
        entry.pop(k, None)
    entry.update(_meta(prev))
    entry["weights"], entry["updated_at"] = prev["weights"], now()


def public(name: str, alias: str, entry: dict) -> dict:
    """What a route change returns to its caller (CLI, admin API)."""
    return {"name": name, "alias": alias, "weights": dict(entry["weights"]), "updated_at": entry.get("updated_at"),
            "history_depth": len(entry.get("history", []))}
