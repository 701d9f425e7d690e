"""Tenants: which API key may see and use which adapters.

tenants.yaml (or .json):

    admin_key: "…"                       # or admin_key_sha256: "<64 hex>"
    tenants:
      acme:   {api_key: "…", adapters: ["acme-support", "acme-*"]}
      globex: {api_key_sha256: "<64 hex>", adapters: ["globex-router", "base"]}

An entry is an adapter name, or a prefix ending in `*`; `base` lets a tenant use the bare base model. Keys are
compared as sha256 digests with `hmac.compare_digest` against every tenant (no early exit), so timing reveals
neither a key nor which tenant matched. A tenant asking for another tenant's adapter gets 404, exactly as for a
name that does not exist: the answer never reveals that the adapter exists. The admin key may do everything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from gemtune.errors import UserError

HEX64 = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_LEN = 16


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass
class Principal:
    """Who is calling: a named tenant with allowed adapter patterns, or the admin."""

    name: str
    patterns: tuple[str, ...] = ()
    admin: bool = False

    def allows(self, adapter: str) -> bool:
        """Whether this caller may see/use `adapter` (an adapter name, or `base`)."""
        if self.admin:
            return True
        for p in self.patterns:
            if p == "*" or p == adapter or (p.endswith("*") and adapter.startswith(p[:-1]) and adapter != "base"):
                return True
        return False


OPEN = Principal("local", ("*",), admin=True)


@dataclass
class Tenants:
    admin_digest: bytes | None
    tenants: dict[str, tuple[bytes, tuple[str, ...]]] = field(default_factory=dict)
    source: str = ""

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal owning `key`, or None; constant-time over all tenants."""
        if not key:
            return None
        d = key_digest(key)
        found: Principal | None = None
        if self.admin_digest is not None and hmac.compare_digest(d, self.admin_digest):
            found = Principal("admin", ("*",), admin=True)
        for name, (digest, patterns) in self.tenants.items():
            if hmac.compare_digest(d, digest) and found is None:
                found = Principal(name, patterns)
        return found


def _digest_from(entry: dict, plain: str, hashed: str, where: str, file: str) -> bytes:
    if plain in entry and hashed in entry:
        raise UserError(f"give {plain} or {hashed}, not both", file=file, field=where)
    if plain in entry:
        key = entry[plain]
        if not isinstance(key, str) or len(key) < MIN_KEY_LEN:
            raise UserError(f"{plain} must be a string of at least {MIN_KEY_LEN} characters", file=file,
                            field=f"{where}.{plain}" if where else plain)
        return key_digest(key)
    if hashed in entry:
        h = entry[hashed]
        if not isinstance(h, str) or not HEX64.match(h.lower()):
            raise UserError(f"{hashed} must be 64 hex characters (sha256 of the key)", file=file,
                            field=f"{where}.{hashed}" if where else hashed)
        return bytes.fromhex(h.lower())
    raise UserError(f"missing {plain} (or {hashed})", file=file, field=where or plain)


def _line_of(text: str, needle: str) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    return None


def load_tenants(path: str | Path) -> Tenants:
    """Parse and check a tenants file; every problem names the file, the line where it can, and the field."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("tenants file not found", file=str(p)) from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg}", file=str(p), line=e.lineno) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise UserError(f"invalid YAML: {getattr(e, 'problem', e)}", file=str(p),
                            line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise UserError("expected a mapping with admin_key and tenants", file=str(p))
    admin = None
    if "admin_key" in data or "admin_key_sha256" in data:
        admin = _digest_from(data, "admin_key", "admin_key_sha256", "", str(p))
    raw = data.get("tenants")
    if not isinstance(raw, dict) or not raw:
        raise UserError("tenants must be a non-empty mapping of tenant name → {api_key, adapters}", file=str(p),
                        line=_line_of(text, "tenants"), field="tenants")
    tenants: dict[str, tuple[bytes, tuple[str, ...]]] = {}
    seen: dict[bytes, str] = {}
    for name, entry in raw.items():
        where = f"tenants.{name}"
        line = _line_of(text, str(name))
        if not isinstance(entry, dict):
            raise UserError("expected {api_key, adapters}", file=str(p), line=line, field=where)
        digest = _digest_from(entry, "api_key", "api_key_sha256", where, str(p))
        if digest in seen or digest == admin:
            raise UserError(f"the same key is given to {seen.get(digest, 'admin')!r} too", file=str(p), line=line,
                            field=f"{where}.api_key")
        seen[digest] = name
        adapters = entry.get("adapters")
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            raise UserError("adapters must be a list of adapter names or prefixes ending in *", file=str(p),
                            line=line, field=f"{where}.adapters")
        tenants[str(name)] = (digest, tuple(adapters))
    return Tenants(admin, tenants, source=str(p))


def bearer_key(headers) -> str | None:
    """The API key from `Authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None
