"""The gateway: everything between HTTP and the backend — tenants and their fair shares, model names resolved
through the live route table, adapters verified (sha256) before every load, and the metrics that say so.

Handlers (`completions.py`, `admin.py`) call a `Gateway`; it raises `HTTPError`s a client can act on. `build_gateway`
makes one from a registry directory, a tenants file and an engine choice (the CLI, the demo, tests and benchmarks
all start here).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from gemtune.errors import UserError
from gemtune.registry.routes import DEFAULT_ALIAS, RouteTable, RouteWatcher, parse_model
from gemtune.registry.store import CorruptAdapter, Registry
from gemtune.serve.auth import OPEN, Principal, Tenants, bearer_key
from gemtune.serve.backends import BackendError, Gen, NotLoaded, Overloaded
from gemtune.serve.metrics import Metrics
from gemtune.serve.openai import HTTPError, clip, generation_failed

log = logging.getLogger("gemtune.serve")
RECHECK_AFTER_S = 2.0  # an admin route change's own sha256 check stands in for the watcher's this long
MAX_MODEL_CHARS = 160  # the longest valid model string is 64 + 1 + 64 characters


@dataclass
class Resolved:
    """What admission decided: the backend key (None for base) and how it was chosen."""

    ref: str  # "name@vN" or "base"
    key: str | None
    path: Path | None
    route: str | None  # "name@alias" when resolved through an alias


class TenantBusy(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TenantGate:
    """One tenant's fair share: at most `max_concurrent` requests hold a slot, `max_queued` more wait for one in
    arrival order, the rest are refused (429). Lives on the server's event loop (no locks); `release` hands the slot
    straight to the next waiter, so a freed slot cannot be taken by a newcomer ahead of the queue."""

    def __init__(self, name: str, limits):
        self.name, self.limits = name, limits
        self.running = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self._hold_ema = 1.0  # seconds a slot is held, for Retry-After

    async def acquire(self) -> float:
        """Take a slot (waiting in line if the tenant is at its limit); returns the monotonic time it was taken."""
        if self.running < self.limits.max_concurrent and not self.waiters:
            self.running += 1
            return time.monotonic()
        if len(self.waiters) >= self.limits.max_queued:
            retry = max(1, math.ceil(self._hold_ema * (1 + len(self.waiters)) / self.limits.max_concurrent))
            raise TenantBusy(f"tenant {self.name!r} has {self.running} requests running and {len(self.waiters)} "
                             f"waiting, its limits (max_concurrent {self.limits.max_concurrent}, max_queued "
                             f"{self.limits.max_queued}); retry after {retry} s", retry)
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(None)  # the slot was handed over just as we gave up: pass it on
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise
        return time.monotonic()

    def release(self, since: float | None) -> None:
        if since is not None:
            self._hold_ema = 0.8 * self._hold_ema + 0.2 * (time.monotonic() - since)
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter; `running` is unchanged
                return
        self.running -= 1


class TenantSlot:
    """A slot held for one request; `release()` is idempotent (called from whichever path ends the request)."""

    def __init__(self, gate: TenantGate | None, since: float):
        self.gate, self.since, self.held = gate, since, gate is not None

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.release(self.since)


def max_prompt_chars(backend) -> int | None:
    """Characters beyond which a prompt cannot fit `max_model_len` tokens, whatever it says: no token covers more
    characters than the longest piece in the vocabulary. Lets a huge prompt be refused without tokenising it."""
    limit = getattr(backend, "max_model_len", None)
    tok = getattr(backend, "tokenizer", None)
    if not limit or tok is None:
        return None
    try:
        longest = max(len(p) for p in tok.get_vocab())
    except Exception:
        return None
    return limit * max(longest, 1) + 1024


# ----------------------------------------------------------------------------------------------------- gateway
class Gateway:
    """Everything between HTTP and the backend: tenants, routes, loading with verification, metrics."""

    def __init__(self, registry: Registry, backend, tenants: Tenants | None = None, *, poll_s: float = 0.1,
                 route_source=None):
        self.registry = registry
        self.backend = backend
        self.tenants = tenants
        self.gates: dict[str, TenantGate] = {}
        self.metrics = Metrics(queue_depth=backend.queue_depth, loaded=backend.loaded, running=backend.running,
                               tenants=lambda: [(n, g.running, len(g.waiters)) for n, g in sorted(self.gates.items())])
        if hasattr(backend, "attach_metrics"):
            backend.attach_metrics(self.metrics)
        self.max_prompt_chars = max_prompt_chars(backend)
        self._recently_verified: dict[tuple[str, str], float] = {}
        self.routes = RouteTable(registry, verify=self._verify_for_route, source=route_source)
        self.watcher = RouteWatcher(registry, poll_s=poll_s, accept=self._accept_version, on_reject=self._rejected,
                                    source=route_source)
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._last_generation = self.watcher.generation

    # -- routes
    def _verify_for_route(self, name: str, version: str):
        """Admin route changes verify the version, then the watcher would hash it again a millisecond later;
        remembering the first check for a moment keeps an admin alias flip to one sha256 pass."""
        out = self.registry.verify(name, version)
        self._recently_verified[(name, version)] = time.monotonic()
        return out

    def _accept_version(self, name: str, version: str) -> None:
        """Routes may only point at versions whose files still match their manifest."""
        t = self._recently_verified.pop((name, version), None)
        if t is not None and time.monotonic() - t < RECHECK_AFTER_S:
            return
        self.registry.verify(name, version)

    def _rejected(self, name: str, alias: str, why: str) -> None:
        self.metrics.route_rejections.inc(name, alias)
        log.error("route change for %s@%s refused, keeping the previous route: %s", name, alias, why)

    def note_route_changes(self) -> None:
        g = self.watcher.generation
        if g != self._last_generation:
            self.metrics.route_changes.inc(by=g - self._last_generation)
            self._last_generation = g

    # -- auth
    def principal(self, request: Request) -> Principal:
        if self.tenants is None:
            return OPEN
        p = self.tenants.authenticate(bearer_key(request.headers))
        if p is None:
            raise HTTPError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
        return p

    def admin(self, request: Request) -> Principal:
        p = self.principal(request)
        if not p.admin:
            raise HTTPError(403, "this endpoint needs the admin key")
        return p

    def gate(self, principal: Principal) -> "TenantGate | None":
        """The tenant's own share of the engine (None: unlimited, for the admin and the open mode)."""
        if principal.limits is None:
            return None
        g = self.gates.get(principal.name)
        if g is None or g.limits != principal.limits:
            g = self.gates[principal.name] = TenantGate(principal.name, principal.limits)
        return g

    # -- admission
    def resolve(self, principal: Principal, model: str, user: str | None) -> Resolved:
        if len(model) > MAX_MODEL_CHARS:
            raise HTTPError(400, f"invalid model ({len(model)} characters, starting {clip(model)}): a model is "
                                 "'base', '<adapter>', '<adapter>@vN' or '<adapter>@<alias>', names of at most 64 "
                                 "characters", param="model")
        try:
            ref = parse_model(model)
        except UserError as e:
            raise HTTPError(400, str(e), param="model") from None
        if ref.is_base:
            if not principal.allows("base"):
                raise self._not_found(model)
            return Resolved("base", None, None, None)
        if not principal.allows(ref.name):
            raise self._not_found(model)
        route = None
        version = ref.version
        if version is None:
            self.note_route_changes()
            version = self.watcher.resolve(ref.name, ref.alias, user)
            if version is None:
                if not self.registry.exists(ref.name):
                    raise self._not_found(model)
                raise HTTPError(404, f"model {model!r}: adapter {ref.name!r} has no alias {ref.alias!r}; promote a "
                                     f"version first (gemtune registry promote {ref.name} vN --alias {ref.alias}) "
                                     f"or pin one as {ref.name}@vN", param="model")
            route = f"{ref.name}@{ref.alias}"
        if not self.registry.exists(ref.name, version):
            raise self._not_found(model)
        key = f"{ref.name}@{version}"
        return Resolved(key, key, self.registry.adapters_dir / ref.name / version, route)

    @staticmethod
    def _not_found(model: str) -> HTTPError:
        return HTTPError(404, f"model {clip(model, MAX_MODEL_CHARS)} does not exist or you do not have access to "
                              "it", param="model")

    def _verify(self, key: str) -> None:
        """sha256-verify a version's files before every load into the backend (an evicted adapter that is loaded
        again is verified again: the bytes on disk may have changed since)."""
        name, version = key.split("@")
        self.registry.verify(name, version)

    async def ensure_loaded(self, res: Resolved, *, reload: bool = False) -> None:
        if res.key is None:
            return
        if res.key in self.backend.loaded() and not reload:
            return
        lock = self._load_locks.setdefault(res.key, asyncio.Lock())
        async with lock:
            if res.key in self.backend.loaded() and not reload:
                return
            try:
                await asyncio.to_thread(self._verify, res.key)
            except CorruptAdapter as e:
                self.metrics.adapter_loads.inc("corrupt")
                raise HTTPError(409, f"adapter {res.ref} refused: {e}", param="model") from None
            try:
                await self.backend.ensure_loaded(res.key, res.path)
            except UserError as e:
                self.metrics.adapter_loads.inc("error")
                raise HTTPError(400, f"adapter {res.ref} cannot be loaded: {e}", param="model") from None
            self.metrics.adapter_loads.inc("ok")

    async def submit(self, res: Resolved, gen: Gen):
        """Load if needed and submit; reload if the adapter was evicted in between (LRU race)."""
        for attempt in range(3):
            try:
                await self.ensure_loaded(res)
                return await self.backend.submit(gen)
            except NotLoaded:
                continue
            except Overloaded as e:
                self.metrics.rejected.inc("queue_full")
                raise HTTPError(429, f"server busy: {e}; retry after {e.retry_after} s",
                                headers={"Retry-After": str(e.retry_after)}) from None
            except UserError as e:
                self.metrics.rejected.inc("limits")
                raise HTTPError(400, str(e), param=e.field) from None
            except BackendError as e:  # the backend could not take it at all (replicas lost, vLLM down): 503
                raise self.failed(e) from None
        raise HTTPError(429, f"adapter {res.ref} keeps being evicted under load; retry", headers={"Retry-After": "1"})

    async def take_slot(self, request: Request, principal: Principal) -> "TenantSlot":
        """The tenant's own slot: at once, after waiting in its line, or 429 when its line is full too."""
        gate = self.gate(principal)
        if gate is None:
            return TenantSlot(None, 0.0)
        task = asyncio.ensure_future(gate.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return TenantSlot(gate, task.result())
                if await request.is_disconnected():
                    raise HTTPError(499, "client closed request")
        except TenantBusy as e:
            self.metrics.rejected.inc("tenant_limit")
            self.metrics.tenant_rejected.inc(principal.name)
            raise HTTPError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        finally:
            if not task.done():
                task.cancel()  # acquire() hands on a slot it got while being cancelled

    def account(self, res: Resolved, usage: dict, t0: float, endpoint: str) -> None:
        """A served request in the metrics: its adapter version, tokens and latency."""
        m = self.metrics
        m.adapter_requests.inc(res.ref)
        m.prompt_tokens.inc(res.ref, by=usage["prompt_tokens"])
        m.completion_tokens.inc(res.ref, by=usage["completion_tokens"])
        m.latency.observe(time.monotonic() - t0, endpoint)

    def failed(self, e: Exception) -> HTTPError:
        """A request that failed while generating, counted by reason and answered in OpenAI's shape."""
        self.metrics.failures.inc(getattr(e, "reason", None) or "backend")
        log.warning("generation failed (%s): %s", getattr(e, "reason", "backend"), e)
        return generation_failed(e)

    def models_for(self, principal: Principal) -> list[dict]:
        """What `principal` may call: base, each adapter name (prod alias), other aliases, pinned versions."""
        now = int(time.time())
        out = []
        if principal.allows("base"):
            out.append({"id": "base", "object": "model", "created": now, "owned_by": "gemtune",
                        "root": self.backend.base_name, "parent": None})
        for name in self.registry.names():
            if not principal.allows(name):
                continue
            aliases = self.watcher.aliases(name)
            for alias, weights in sorted(aliases.items()):
                mid = name if alias == DEFAULT_ALIAS else f"{name}@{alias}"
                out.append({"id": mid, "object": "model", "created": now, "owned_by": "gemtune", "parent": "base",
                            "route": {"alias": alias, "weights": weights}})
            for v in self.registry.versions(name):
                out.append({"id": f"{name}@{v}", "object": "model", "created": now, "owned_by": "gemtune",
                            "parent": "base"})
        return out




def build_gateway(registry_dir: str, *, tenants: str | None = None, engine: str = "embedded",
                  vllm_url: str | None = None, base: str | None = None, dtype: str = "float32",
                  max_batch: int = 32, max_loras: int = 8, max_lora_rank: int = 64, max_queue: int = 256,
                  max_model_len: int = 2048, poll_s: float = 0.1, routes: str | None = None,
                  cluster=None, ray_address: str | None = None) -> Gateway:
    """Registry + tenants + backend → Gateway (`gemtune serve`, the demo, tests and benchmarks all call this).

    `routes`: None/"file" (routes.json) or redis://HOST:PORT/DB, shared by several gateways. `cluster`: a
    `cluster.ClusterConfig` to serve through Ray Serve replicas (joining `ray_address`, or a local Ray)."""
    from gemtune.base.provision import DEFAULT_MODEL, pull
    from gemtune.registry.routes_redis import route_source
    from gemtune.serve.auth import load_tenants
    from gemtune.serve.backends import EmbeddedBackend, VllmBackend

    reg = Registry(registry_dir, create=True)
    ten = load_tenants(tenants) if tenants else None
    source = route_source(routes, reg)
    base_dir = pull(base or DEFAULT_MODEL)
    if cluster is not None:
        from gemtune.serve.cluster import ClusterBackend

        backend = ClusterBackend(base_dir, reg.root, cluster, ray_address=ray_address, max_queue=max_queue)
    elif engine == "embedded":
        backend = EmbeddedBackend(base_dir, dtype=dtype, max_batch=max_batch, max_loras=max_loras,
                                  max_lora_rank=max_lora_rank, max_queue=max_queue, max_model_len=max_model_len)
    elif engine == "vllm":
        if not vllm_url:
            raise UserError("--engine vllm needs --vllm-url (print the vLLM command with --print-vllm-command)",
                            field="vllm_url")
        backend = VllmBackend(vllm_url, base_dir, max_queue=max_queue, max_model_len=max_model_len,
                              max_lora_rank=max_lora_rank)
    else:
        raise UserError(f"unknown engine {engine!r}; expected embedded or vllm", field="engine")
    return Gateway(reg, backend, ten, poll_s=poll_s, route_source=source)
