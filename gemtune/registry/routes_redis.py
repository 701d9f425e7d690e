"""The route document in Redis, for several gateways: the same document as `routes.json` (history.py), shared, with
a watch.

Keys (under `prefix`, default `gemtune:routes`): `<prefix>:doc` (the JSON document), `<prefix>:version` (a counter
bumped by every change, in the same MULTI/EXEC transaction as the document, so a reader that sees version N sees
its document), `<prefix>:lock` (the writers' lock, Redis's own `SET NX PX` lock) and the pub/sub channel
`<prefix>:changed`, on which every change publishes its version. A gateway's `RouteWatcher` subscribes
(`listen`) and re-reads at once; it still polls the counter every `poll_s` in case a message was lost (a
reconnect), so a change reaches every gateway either way.

Consistency with the registry's sha-verified versions is unchanged: a writer (`RouteTable` over this store) verifies
every arm against the registry, under the lock, before it writes; every watcher verifies each new arm again before
it routes to it (`accept`), and keeps an alias's last good weights when one fails. The version directories stay in
the registry (a shared filesystem); only the routes live here. The first use seeds the document from the registry's
`routes.json` (`SET NX`), so switching an existing registry to Redis keeps its routes and history.

Use: `gemtune serve --routes redis://HOST:PORT/DB` (`?prefix=NAME` for several registries on one Redis).
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

from gemtune.errors import UserError
from gemtune.registry.history import FORMAT, read_routes
from gemtune.registry.names import validate_weights
from gemtune.registry.store import LOCK_TIMEOUT_S, Registry

log = logging.getLogger("gemtune.registry")
DEFAULT_PREFIX = "gemtune:routes"


def check_document(data, where: str) -> dict:
    """The checks `read_routes` makes on routes.json, on a document read from Redis."""
    if not isinstance(data, dict) or not isinstance(data.get("routes", {}), dict):
        raise UserError("expected an object with a 'routes' object", file=where, field="routes")
    data.setdefault("format", FORMAT)
    data.setdefault("routes", {})
    data.setdefault("log", [])
    for name, aliases in data["routes"].items():
        if not isinstance(aliases, dict):
            raise UserError(f"routes.{name} must be an object of aliases", file=where, field=f"routes.{name}")
        for alias, entry in aliases.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("weights"), dict):
                raise UserError("expected an object with 'weights'", file=where, field=f"routes.{name}.{alias}")
            try:
                entry["weights"] = validate_weights(entry["weights"])
            except UserError as e:
                raise UserError(str(e), file=where, field=f"routes.{name}.{alias}.weights") from None
            entry.setdefault("history", [])
    return data


class RedisRoutes:
    """A route store in Redis (see the module docstring); the same members as `routes.FileRoutes`, plus `listen`."""

    def __init__(self, url: str, registry: Registry, *, prefix: str | None = None):
        import redis

        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise UserError(f"expected redis://HOST:PORT/DB, got {url!r}", field="routes")
        query = parse_qs(parts.query)
        self.prefix = prefix or query.pop("prefix", [DEFAULT_PREFIX])[0]
        self.url = parts._replace(query="").geturl()
        self.registry = registry
        self.r = redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self.k_doc, self.k_version = f"{self.prefix}:doc", f"{self.prefix}:version"
        self.k_lock, self.channel = f"{self.prefix}:lock", f"{self.prefix}:changed"
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise UserError(f"Redis at {self.url} is not reachable ({type(e).__name__}: {e})", field="routes") from None
        self._seed()

    def __str__(self) -> str:
        return f"{self.url} {self.prefix}"

    def _seed(self) -> None:
        """The first gateway on an empty Redis copies the registry's routes.json there (SET NX: only once)."""
        if self.r.exists(self.k_doc):
            return
        data = read_routes(self.registry.routes_path)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.k_doc, json.dumps(data), nx=True)
        pipe.setnx(self.k_version, 0)
        pipe.execute()

    @contextmanager
    def locked(self):
        lock = self.r.lock(self.k_lock, timeout=LOCK_TIMEOUT_S, blocking_timeout=LOCK_TIMEOUT_S)
        if not lock.acquire():
            raise UserError(f"routes in {self} are locked by another writer for over {LOCK_TIMEOUT_S:.0f} s",
                            field="routes")
        try:
            yield
        finally:
            try:
                lock.release()
            except Exception:  # expired under a very slow writer: the next writer already took it
                log.warning("the routes lock in %s had expired before release", self)

    def read(self) -> dict:
        raw = self.r.get(self.k_doc)
        if raw is None:
            return check_document({}, str(self))
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg}", file=str(self), line=e.lineno) from None
        return check_document(data, str(self))

    def write(self, data: dict) -> None:
        """The document, its version and the change notice in one transaction."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.k_doc, json.dumps(data))
        pipe.incr(self.k_version)
        out = pipe.execute()
        self.r.publish(self.channel, out[1])

    def stamp(self):
        v = self.r.get(self.k_version)
        return None if v is None else int(v)

    def listen(self, on_change, stop: threading.Event) -> None:
        """Call `on_change()` for every change published, until `stop` is set; reconnect on a dropped connection."""
        import redis

        while not stop.is_set():
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                on_change()  # anything published while (re)subscribing
                while not stop.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        on_change()
            except redis.RedisError as e:
                log.warning("route notices from %s interrupted (%s); polling until resubscribed", self, e)
                stop.wait(0.5)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass


def route_source(spec: str | None, registry: Registry):
    """`--routes`: None or "file" → routes.json (the embedded default); redis://… → RedisRoutes."""
    if spec in (None, "", "file"):
        return None
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisRoutes(spec, registry)
    raise UserError(f"unknown routes store {spec!r}; expected 'file' or redis://HOST:PORT/DB", field="routes")
