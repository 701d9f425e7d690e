"""The registry's names: adapter names, versions (`vN`), aliases and A/B weights, checked the same way everywhere.

Names become directory names and model ids (`name`, `name@vN`, `name@alias`), so the alphabet is narrow: lower-case
letters, digits, `.`, `_`, `-`, no `..`, no `@`. This module imports nothing else from the registry: the store
(store.py), the routes.json document (history.py) and the route commands (routes.py) all build on it.
"""

from __future__ import annotations

import re

from gemtune.errors import UserError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")


def validate_name(name: str, what: str = "adapter name") -> str:
    """Names become directory names and model ids: lower-case, no separators, no `..`, no `@`."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise UserError(
            f"invalid {what} {name!r}: use lower-case letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, at most 64 characters", field="name")
    if name == "base":
        raise UserError("'base' is reserved for the base model", field="name")
    return name


def normalize_version(version: str | int) -> str:
    """Accept `v3`, `3` or 3; return `v3`."""
    s = str(version).strip()
    if s.isdigit():
        s = f"v{int(s)}"
    if not VERSION_RE.match(s):
        raise UserError(f"invalid version {version!r}: expected vN such as v3", field="version")
    return s


def version_number(version: str) -> int:
    return int(normalize_version(version)[1:])


def validate_alias(alias: str) -> str:
    """Aliases share the name alphabet but must not look like a version (`v3` would be ambiguous in `name@v3`)."""
    if not isinstance(alias, str) or not NAME_RE.match(alias) or ".." in alias or VERSION_RE.match(alias):
        raise UserError(f"invalid alias {alias!r}: use lower-case letters, digits, '.', '_' or '-', not vN",
                        field="alias")
    return alias


def validate_weights(weights: dict) -> dict[str, int]:
    """A/B weights: {version: non-negative int}, at least one positive; returned in version order."""
    if not isinstance(weights, dict) or not weights:
        raise UserError("weights must map versions to integer weights, e.g. {\"v3\": 90, \"v4\": 10}",
                        field="weights")
    out = {}
    for v, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise UserError(f"weight for {v} must be a non-negative integer, got {w!r}", field="weights")
        out[normalize_version(v)] = w
    if sum(out.values()) <= 0:
        raise UserError("at least one weight must be positive", field="weights")
    return dict(sorted(out.items(), key=lambda kv: version_number(kv[0])))
