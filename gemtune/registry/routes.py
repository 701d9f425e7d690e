"""Routes: aliases (`prod`, `canary`, …) that point at one version or at A/B weights, with a history to roll back.

`routes.json` in the registry root is the single source of truth (its shape and checks: history.py).

Every change is a read-modify-write under the registry lock, written atomically (temp, fsync, rename), so a reader
(the server polls the file's stat) sees the old table or the new one, never half of one. A promote or split pushes
the alias's current weights onto its history; `rollback` pops the last entry back, so repeated rollbacks walk the
history backwards. Every change (promote, split and rollback alike) sha256-verifies each version it would route to,
under the lock, before writing: a corrupt version is refused, routes.json is left as it was and the alias keeps
serving what it served before, so no command can make the table name a version that fails verification.

Imports go one way: names.py ← history.py ← store.py ← routes.py (this module also re-exports the names and
history helpers it used to define, e.g. `read_routes`, `validate_weights`, `validate_alias`).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from gemtune.errors import NotFound, UserError
from gemtune.registry.history import (FORMAT, HISTORY_KEEP, LOG_KEEP, append_log, now, public,  # noqa: F401
                                      read_routes, restore, set_weights)
from gemtune.registry.names import (NAME_RE, VERSION_RE, normalize_version, validate_alias,  # noqa: F401
                                    validate_name, validate_weights)
from gemtune.registry.store import Registry
from gemtune.utils import atomic_write_json

DEFAULT_ALIAS = "prod"


@dataclass(frozen=True)
class ModelRef:
    """What a request's `model` field asked for: the base, a pinned version, or an alias to resolve."""

    name: str  # adapter name, or "base"
    version: str | None = None
    alias: str | None = None

    @property
    def is_base(self) -> bool:
        return self.name == "base"


def parse_model(model: str) -> ModelRef:
    """`base`, `name` (alias prod), `name@vN` (pinned) or `name@alias`; anything else is a UserError (HTTP 400)."""
    if not isinstance(model, str) or not model:
        raise UserError("model must be a non-empty string: 'base', '<adapter>', '<adapter>@vN' or "
                        "'<adapter>@<alias>'", field="model")
    if model == "base":
        return ModelRef("base")
    parts = model.split("@")
    if len(parts) > 2:
        raise UserError(f"invalid model {model!r}: at most one '@' (name@vN or name@alias)", field="model")
    name = parts[0]
    if not NAME_RE.match(name) or ".." in name:
        raise UserError(f"invalid model {model!r}: adapter names use lower-case letters, digits, '.', '_', '-'",
                        field="model")
    if len(parts) == 1:
        return ModelRef(name, alias=DEFAULT_ALIAS)
    tail = parts[1]
    if VERSION_RE.match(tail):
        return ModelRef(name, version=tail)
    if NAME_RE.match(tail) and ".." not in tail:
        return ModelRef(name, alias=tail)
    raise UserError(f"invalid model {model!r}: after '@' expected a version vN or an alias name", field="model")


def parse_split(items: list[str]) -> dict[str, int]:
    """`["v3=90", "v4=10"]` → `{"v3": 90, "v4": 10}`; weights are non-negative integers, at least one positive."""
    weights: dict[str, int] = {}
    for it in items:
        m = re.fullmatch(r"\s*(v?\d+)\s*=\s*(\d+)\s*", it)
        if not m:
            raise UserError(f"invalid split {it!r}: expected VERSION=WEIGHT such as v3=90", field="split")
        v = normalize_version(m.group(1))
        if v in weights:
            raise UserError(f"version {v} given twice", field="split")
        weights[v] = int(m.group(2))
    return validate_weights(weights)


def pick_version(weights: dict[str, int], *, name: str, alias: str, user: str | None) -> str:
    """Choose an arm: sticky on `user` (same user → same arm while weights hold), random without one."""
    arms = [(v, w) for v, w in weights.items() if w > 0]
    if len(arms) == 1:
        return arms[0][0]
    total = sum(w for _, w in arms)
    if user:
        digest = hashlib.sha256(f"{name}\0{alias}\0{user}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") % total
    else:
        point = random.randrange(total)
    for v, w in arms:
        if point < w:
            return v
        point -= w
    return arms[-1][0]


class FileRoutes:
    """Where the route document lives, embedded default: `routes.json` in the registry root, changed under the
    registry lock, written atomically; its stat is the change stamp a watcher polls. Another store (Redis:
    routes_redis.py) offers the same members, and may add `listen(on_change, stop)` to push changes."""

    def __init__(self, registry: Registry):
        self.registry, self.path = registry, registry.routes_path

    def __str__(self) -> str:
        return "routes.json"

    def locked(self):
        return self.registry.locked()

    def read(self) -> dict:
        return read_routes(self.path)

    def write(self, data: dict) -> None:
        atomic_write_json(self.path, data)

    def stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


class RouteTable:
    """Reads and changes the route document of one registry (used by the CLI and the server's admin API): in
    `routes.json`, or in the shared store `source` (routes_redis.RedisRoutes)."""

    def __init__(self, registry: Registry, verify: Callable[[str, str], object] | None = None,
                 check: Callable[[dict, str, str, dict], dict] | None = None, source=None):
        self.registry = registry
        self.source = source or FileRoutes(registry)
        self.path = registry.routes_path
        self.verify = verify or registry.verify
        self.check = check  # under the lock before a promote/split: raises to refuse, or returns fields to record

    def read(self) -> dict:
        return self.source.read()

    def get(self, name: str, alias: str = DEFAULT_ALIAS) -> dict | None:
        return self.read()["routes"].get(name, {}).get(alias)

    def promote(self, name: str, version: str, alias: str = DEFAULT_ALIAS) -> dict:
        """Point `alias` at one version (100%); the previous weights go onto the alias history."""
        validate_name(name)
        validate_alias(alias)
        version = normalize_version(version)
        return self._change(name, alias, {version: 100}, "promote")

    def split(self, name: str, alias: str, weights: dict) -> dict:
        """A/B: route `alias` over several versions by integer weights, sticky per user."""
        validate_name(name)
        validate_alias(alias)
        weights = validate_weights(weights)
        return self._change(name, alias, weights, "split")

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS) -> dict:
        """Restore the alias's previous weights (pop its history); repeated calls walk further back."""
        validate_name(name)
        validate_alias(alias)
        with self.source.locked():
            data = self.read()
            entry = data["routes"].get(name, {}).get(alias)
            if not entry:
                raise NotFound(f"alias {name}@{alias} does not exist; nothing to roll back", field="alias")
            if not entry.get("history"):
                raise UserError(f"alias {name}@{alias} has no earlier route to roll back to "
                                f"(it serves {entry['weights']})", field="alias")
            prev = entry["history"].pop()
            before = entry["weights"]
            try:
                self._verify_all(name, prev["weights"])
            except UserError as e:
                raise type(e)(f"refusing to roll back {name}@{alias} from {before} to {prev['weights']}, routes.json "
                              f"is unchanged: {e}") from None
            restore(entry, prev)
            append_log(data, {"event": "rollback", "name": name, "alias": alias, "from": before,
                              "to": entry["weights"]})
            self.source.write(data)
            return public(name, alias, entry)

    def _verify_all(self, name: str, weights: dict[str, int]) -> None:
        """Every version the weights name must pass sha256 verification (the CorruptAdapter names the file)."""
        for v in weights:
            try:
                self.verify(name, v)
            except UserError as e:
                raise type(e)(f"{name}@{v} fails verification: {e}") from None

    def _change(self, name: str, alias: str, weights: dict[str, int], event: str) -> dict:
        with self.source.locked():
            self._verify_all(name, weights)
            data = self.read()
            extra = self.check(data, name, alias, weights) if self.check else {}
            entry, before = set_weights(data, name, alias, weights, **extra)
            append_log(data, {"event": event, "name": name, "alias": alias, "from": before, "to": weights, **extra})
            self.source.write(data)
            return public(name, alias, entry)

    def log_event_locked(self, event: dict) -> None:
        """Append to the audit log; the caller already holds the registry lock."""
        data = self.read()
        append_log(data, event)
        self.source.write(data)


class RouteWatcher:
    """The server's live view of the routes: re-read when the store's stamp changes (routes.json's stat, Redis's
    version counter), checked at most every `poll_s` (so a CLI change is live well within 1 s without a restart);
    a store that pushes changes (`listen`, Redis pub/sub) wakes it at once.

    New or changed arms are passed to `accept(name, version)` first (the server verifies sha256 there); an alias
    whose new weights name a version that fails is kept at its last good weights, so a corrupt push never takes
    traffic from a working version.
    """

    def __init__(self, registry: Registry, *, poll_s: float = 0.2,
                 accept: Callable[[str, str], None] | None = None, on_reject: Callable[[str, str, str], None] | None = None,
                 source=None):
        self.registry = registry
        self.source = source or FileRoutes(registry)
        self.path = registry.routes_path
        self.poll_s = poll_s
        self.accept = accept
        self.on_reject = on_reject
        self._lock = threading.Lock()
        self._stat: tuple | None = None
        self._checked = 0.0
        self.table: dict[str, dict[str, dict[str, int]]] = {}
        self.rejected: dict[tuple[str, str], str] = {}
        self.generation = 0
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self.refresh(force=True)

    def start(self) -> None:
        """Poll in a background thread, so request handlers never stat or hash on the event loop; a store that
        pushes changes gets a listener thread too (the poll stays as the fallback for a lost message)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gemtune-routes", daemon=True)
            self._thread.start()
        if self._listener is None and hasattr(self.source, "listen"):
            self._listener = threading.Thread(target=self.source.listen, args=(self._pushed, self._stop),
                                              name="gemtune-routes-listen", daemon=True)
            self._listener.start()

    def stop(self) -> None:
        self._stop.set()
        for t in (self._thread, self._listener):
            if t is not None:
                t.join(timeout=3)
        self._thread = self._listener = None

    def _pushed(self) -> None:
        try:
            self.refresh(throttle=False)
        except Exception as e:
            if self.on_reject:
                self.on_reject(str(self.source), "*", f"{type(e).__name__}: {e}")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh(throttle=False)
            except Exception as e:  # never let the poller die: the server would silently stop following routes
                if self.on_reject:
                    self.on_reject(str(self.source), "*", f"{type(e).__name__}: {e}")

    def refresh(self, force: bool = False, throttle: bool = True) -> bool:
        """Reload if routes.json changed (`force`: reload regardless); returns True when the table changed."""
        now = time.monotonic()
        if throttle and not force and now - self._checked < self.poll_s:
            return False
        with self._lock:
            self._checked = now
            st = self.source.stamp()
            if not force and st == self._stat:
                return False
            try:
                data = self.source.read()
            except UserError as e:  # a hand-broken file: keep serving the last good table
                if self.on_reject:
                    self.on_reject(str(self.source), "*", str(e))
                self._stat = st
                return False
            new = {n: {a: e["weights"] for a, e in aliases.items()} for n, aliases in data["routes"].items()}
            table = self._accept_changes(new)
            self._stat = st
            changed = table != self.table
            self.table = table
            if changed:
                self.generation += 1
            return changed

    def _accept_changes(self, new: dict) -> dict:
        table: dict[str, dict[str, dict[str, int]]] = {}
        for name, aliases in new.items():
            for alias, weights in aliases.items():
                old = self.table.get(name, {}).get(alias)
                if weights == old:
                    table.setdefault(name, {})[alias] = weights
                    continue
                bad = self._first_bad(name, weights, old)
                if bad is None:
                    table.setdefault(name, {})[alias] = weights
                    self.rejected.pop((name, alias), None)
                else:
                    self.rejected[(name, alias)] = bad
                    if self.on_reject:
                        self.on_reject(name, alias, bad)
                    if old is not None:
                        table.setdefault(name, {})[alias] = old
        return table

    def _first_bad(self, name: str, weights: dict, old: dict | None) -> str | None:
        if self.accept is None:
            return None
        for v, w in weights.items():
            if w <= 0 or (old and v in old):
                continue
            try:
                self.accept(name, v)
            except UserError as e:
                return str(e)
        return None

    def _maybe_refresh(self) -> None:
        if self._thread is None:
            self.refresh()

    def weights(self, name: str, alias: str) -> dict[str, int] | None:
        self._maybe_refresh()
        return self.table.get(name, {}).get(alias)

    def aliases(self, name: str) -> dict[str, dict[str, int]]:
        self._maybe_refresh()
        return dict(self.table.get(name, {}))

    def resolve(self, name: str, alias: str, user: str | None) -> str | None:
        if self._thread is not None and time.monotonic() - self._checked > 3 * self.poll_s:
            self.refresh(throttle=False)  # the poller thread is late (a starved CPU): never route on a stale table
        w = self.weights(name, alias)
        if not w:
            return None
        return pick_version(w, name=name, alias=alias, user=user)
