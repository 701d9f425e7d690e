"""Tenants: which API key may see and use which adapters.

tenants.yaml (or .json):

    admin_key: "…"                       # or admin_key_sha256: "<64 hex>"
    max_concurrent: 16                   # per tenant, unless its entry says otherwise (default 64)
    max_queued: 64                       # per tenant, waiting at the gateway for a slot (default 256)
    tenants:
      acme:   {api_key: "…", adapters: ["acme-support", "acme-*"], max_concurrent: 4}
      globex: {api_key_sha256: "<64 hex>", adapters: ["globex-router", "base"]}

An entry is an adapter name, or a prefix ending in `*`; `base` lets a tenant use the bare base model. Keys are
compared as sha256 digests with `hmac.compare_digest` against every tenant (no early exit), so timing reveals
neither a key nor which tenant matched. A tenant asking for another tenant's adapter gets 404, exactly as for a
name that does not exist: the answer never reveals that the adapter exists. The admin key may do everything.

Fair share: each tenant may have at most `max_concurrent` generation requests in the engine and `max_queued` more
waiting at the gateway for one of its own slots (first come, first served within the tenant); beyond that it gets
429 with Retry-After, while other tenants keep their own limits untouched. The admin key (an operator) and the
open loopback mode have no such limit.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from gemtune.errors import UserError

HEX64 = re.compile(r"^[0-9a-f]{64}$")
MIN_KEY_LEN = 16
DEFAULT_MAX_CONCURRENT = 64
DEFAULT_MAX_QUEUED = 256


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass
class Principal:
    """Who is calling: a named tenant with allowed adapter patterns, or the admin."""

    name: str
    patterns: tuple[str, ...] = ()
    admin: bool = False
    limits: "Limits | None" = None  # None: no per-tenant limit (admin, open mode)

    def allows(self, adapter: str) -> bool:
        """Whether this caller may see/use `adapter` (an adapter name, or `base`)."""
        if self.admin:
            return True
        for p in self.patterns:
            if p == "*" or p == adapter or (p.endswith("*") and adapter.startswith(p[:-1]) and adapter != "base"):
                return True
        return False


OPEN = Principal("local", ("*",), admin=True)


@dataclass(frozen=True)
class Limits:
    """A tenant's fair share: generation requests in the engine at once, and more waiting at the gateway."""

    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_queued: int = DEFAULT_MAX_QUEUED


@dataclass
class Tenants:
    admin_digest: bytes | None
    tenants: dict[str, tuple[bytes, tuple[str, ...]]] = field(default_factory=dict)
    source: str = ""
    limits: dict[str, Limits] = field(default_factory=dict)  # per tenant; absent: Limits()

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
                found = Principal(name, patterns, limits=self.limits.get(name, Limits()))
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


def _line_of(text: str, needle: str, start: int = 1) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if i >= start and needle in line:
            return i
    return None


def _limit(entry: dict, key: str, default: int, minimum: int, where: str, file: str, line: int | None) -> int:
    if key not in entry:
        return default
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, int) or not (minimum <= v <= 1_000_000):
        raise UserError(f"{key} must be an integer from {minimum} to 1000000, got {str(v)[:40]!r}", file=file,
                        line=line, field=f"{where}.{key}" if where else key)
    return v


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
        from gemtune.config import parse_yaml  # the one YAML reader: same file:line errors as every stage

        data = parse_yaml(text, str(p)).data
    if not isinstance(data, dict):
        raise UserError("expected a mapping with admin_key and tenants", file=str(p))
    admin = None
    if "admin_key" in data or "admin_key_sha256" in data:
        admin = _digest_from(data, "admin_key", "admin_key_sha256", "", str(p))
    raw = data.get("tenants")
    if not isinstance(raw, dict) or not raw:
        raise UserError("tenants must be a non-empty mapping of tenant name → {api_key, adapters}", file=str(p),
                        line=_line_of(text, "tenants"), field="tenants")
    top = [next((i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith((k, f'"{k}"', f'{{"{k}"'))),
                _line_of(text, k)) for k in ("max_concurrent", "max_queued")]
    default = Limits(_limit(data, "max_concurrent", DEFAULT_MAX_CONCURRENT, 1, "", str(p), top[0]),
                     _limit(data, "max_queued", DEFAULT_MAX_QUEUED, 0, "", str(p), top[1]))
    tenants: dict[str, tuple[bytes, tuple[str, ...]]] = {}
    limits: dict[str, Limits] = {}
    seen: dict[bytes, str] = {}
    for name, entry in raw.items():
        where = f"tenants.{name}"
        line = _line_of(text, str(name), _line_of(text, "tenants") or 1)
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
        limits[str(name)] = Limits(
            _limit(entry, "max_concurrent", default.max_concurrent, 1, where, str(p),
                   _line_of(text, "max_concurrent", line or 1) if "max_concurrent" in entry else line),
            _limit(entry, "max_queued", default.max_queued, 0, where, str(p),
                   _line_of(text, "max_queued", line or 1) if "max_queued" in entry else line))
    return Tenants(admin, tenants, source=str(p), limits=limits)


def bearer_key(headers) -> str | None:
    """The API key from `Authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (the open, key-less mode may listen only there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
