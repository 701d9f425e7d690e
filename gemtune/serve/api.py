"""The OpenAI-compatible gateway (DESIGN.md §5): routes, tenants, admin, metrics, over a backend.

Request path: authenticate (tenant key, constant time) → parse `model` (`base`, `name`, `name@vN`,
`name@alias`) → check the tenant may use it (else 404, the same answer as for a name that does not exist) →
resolve the alias through the live route table (A/B sticky on `user`) to one version, *at admission* → verify and
load that version if needed → render the prompt with the Gemma template → submit to the backend. The version chosen
at admission serves the whole request, and every response names it: `model` is `name@vN` and the header
`x-gemtune-adapter` carries it (plus `x-gemtune-route` when an alias was resolved).

Faults map to status codes a client can act on: malformed model 400, unknown/foreign model 404, no key 401, over the
length limits 400 with the limit, queue full 429 with Retry-After, corrupt adapter 409 (the alias keeps its last
good version), backend down 503. A client that disconnects cancels its request, freeing the batch slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from gemtune.errors import UserError
from gemtune.registry.routes import DEFAULT_ALIAS, RouteTable, RouteWatcher, parse_model, validate_weights
from gemtune.registry.store import CorruptAdapter, Registry, normalize_version
from gemtune.serve.auth import OPEN, Principal, Tenants, bearer_key
from gemtune.serve.backends import BackendError, Gen, NotLoaded, Overloaded
from gemtune.serve.metrics import Metrics

log = logging.getLogger("gemtune.serve")
DEFAULT_MAX_TOKENS = 256
RECHECK_AFTER_S = 2.0  # an admin route change's own sha256 check stands in for the watcher's this long


class HTTPError(Exception):
    """An answer with a status code and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                              404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error"}.get(
            status, "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.status}}, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    user: Optional[str] = None
    n: int = 1
    logprobs: Optional[Any] = None
    ignore_eos: bool = False


class ChatBody(_Body):
    messages: list[dict]
    tools: Optional[list] = None


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    suffix: Optional[str] = None


class LoadBody(BaseModel):
    lora_name: str
    lora_path: Optional[str] = None


class UnloadBody(BaseModel):
    lora_name: str


class PromoteBody(BaseModel):
    name: str
    version: str
    alias: str = DEFAULT_ALIAS


class SplitBody(BaseModel):
    name: str
    alias: str = DEFAULT_ALIAS
    weights: dict[str, int]


class RollbackBody(BaseModel):
    name: str
    alias: str = DEFAULT_ALIAS


@dataclass
class Resolved:
    """What admission decided: the backend key (None for base) and how it was chosen."""

    ref: str  # "name@vN" or "base"
    key: str | None
    path: Path | None
    route: str | None  # "name@alias" when resolved through an alias


# ----------------------------------------------------------------------------------------------------- gateway
class Gateway:
    """Everything between HTTP and the backend: tenants, routes, loading with verification, metrics."""

    def __init__(self, registry: Registry, backend, tenants: Tenants | None = None, *, poll_s: float = 0.1):
        self.registry = registry
        self.backend = backend
        self.tenants = tenants
        self.metrics = Metrics(queue_depth=backend.queue_depth, loaded=backend.loaded, running=backend.running)
        self._recently_verified: dict[tuple[str, str], float] = {}
        self.routes = RouteTable(registry, verify=self._verify_for_route)
        self.watcher = RouteWatcher(registry, poll_s=poll_s, accept=self._accept_version, on_reject=self._rejected)
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

    def _note_route_changes(self) -> None:
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

    # -- admission
    def resolve(self, principal: Principal, model: str, user: str | None) -> Resolved:
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
            self._note_route_changes()
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
        return HTTPError(404, f"model {model!r} does not exist or you do not have access to it", param="model")

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
        """Load if needed and submit; reload once if the adapter was evicted in between (LRU race)."""
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
        raise HTTPError(429, f"adapter {res.ref} keeps being evicted under load; retry", headers={"Retry-After": "1"})

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


# ------------------------------------------------------------------------------------------------- rendering
def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise HTTPError(400, f"{where}.content[{i}]: only text parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise HTTPError(400, f"{where}.content must be a string or a list of text parts", param="messages")


def chat_prompt_ids(backend, messages: list[dict]) -> list[int]:
    from gemtune.base.templates import render_prompt, validate_messages

    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise HTTPError(400, f"messages[{i}] must be an object", param="messages")
        msgs.append({"role": m.get("role"), "content": _content_text(m.get("content"), f"messages[{i}]")})
    try:
        validate_messages(msgs, require_final_assistant=False)
        if msgs[-1]["role"] != "user":
            raise UserError("the last message must be the user's", field="messages")
        return render_prompt(msgs, backend.tokenizer, backend.family).input_ids
    except UserError as e:
        raise HTTPError(400, str(e), param="messages") from None


def completion_prompt_ids(backend, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise HTTPError(400, "prompt must be one string (batched prompts are not supported)", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise HTTPError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")
    return backend.tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _gen_params(body: _Body, prompt_ids: list[int], res: Resolved) -> Gen:
    if body.n != 1:
        raise HTTPError(400, "n must be 1", param="n")
    if body.logprobs:
        raise HTTPError(400, "logprobs are not supported", param="logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise HTTPError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    if not (0 <= body.temperature <= 2):
        raise HTTPError(400, f"temperature must be in [0, 2], got {body.temperature}", param="temperature")
    if not (0 < body.top_p <= 1):
        raise HTTPError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
    return Gen(prompt_ids=prompt_ids, adapter=res.key, max_tokens=max_tokens, temperature=body.temperature,
               top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos)


def _stops(body: _Body) -> list[str]:
    if body.stop is None:
        return []
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise HTTPError(400, "stop must be up to 4 non-empty strings", param="stop")
    return stops


class _StopMatcher:
    """OpenAI `stop` strings: cut the text at the first match and end the request (the backend is cancelled).

    Text that could be the start of a stop string is held back until it cannot, so a stream never shows it.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buf = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.hit = self.buf[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


# ------------------------------------------------------------------------------------------------------- app
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
               "/v1/unload_lora_adapter", "/admin/routes", "/admin/routes/promote", "/admin/routes/split",
               "/admin/routes/rollback", "/healthz", "/metrics"}


class _StatusCounter:
    """Pure ASGI middleware counting answers by endpoint and status. (Starlette's BaseHTTPMiddleware would wrap
    streamed bodies and hide client disconnects from the SSE generator, which must cancel its request.)"""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        path = scope.get("path", "")
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.inc(path if path in KNOWN_PATHS else "other", str(status["code"]))


def create_app(gateway: Gateway) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await gateway.backend.start()
        gateway.watcher.start()
        try:
            yield
        finally:
            gateway.watcher.stop()
            await gateway.backend.close()

    app = FastAPI(title="gemtune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    m = gateway.metrics

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return HTTPError(400, f"invalid request: {loc or 'body'}: {first.get('msg', 'invalid')}",
                         param=loc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return HTTPError(500, f"internal error: {type(exc).__name__}").response()

    app.add_middleware(_StatusCounter, metrics=m)

    # -- OpenAI-compatible
    @app.get("/v1/models")
    async def models(request: Request):
        p = gateway.principal(request)
        return {"object": "list", "data": gateway.models_for(p)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        p = gateway.principal(request)
        if body.tools:
            raise HTTPError(400, "tools are not supported", param="tools")
        res = gateway.resolve(p, body.model, body.user)
        ids = chat_prompt_ids(gateway.backend, body.messages)
        return await _generate(request, body, res, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        p = gateway.principal(request)
        if body.echo or body.suffix:
            raise HTTPError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        res = gateway.resolve(p, body.model, body.user)
        ids = completion_prompt_ids(gateway.backend, body.prompt)
        return await _generate(request, body, res, ids, chat=False)

    async def _generate(request: Request, body: _Body, res: Resolved, ids: list[int], *, chat: bool):
        gen = _gen_params(body, ids, res)
        stops = _stops(body)
        t0 = time.monotonic()
        handle = await gateway.submit(res, gen)
        endpoint = "chat" if chat else "completions"
        headers = {"x-gemtune-adapter": res.ref}
        if res.route:
            headers["x-gemtune-route"] = res.route
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(handle, res, rid, chat, stops, include_usage, t0, endpoint),
                                     media_type="text/event-stream", headers=headers)
        text, finish, usage = await _collect(request, handle, stops)
        _account(res, usage, t0, endpoint)
        if finish == "cancelled":
            raise HTTPError(499, "client closed request")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": res.ref, "choices": [choice], "usage": usage},
                            headers=headers)

    def _account(res: Resolved, usage: dict, t0: float, endpoint: str) -> None:
        m.adapter_requests.inc(res.ref)
        m.prompt_tokens.inc(res.ref, by=usage["prompt_tokens"])
        m.completion_tokens.inc(res.ref, by=usage["completion_tokens"])
        m.latency.observe(time.monotonic() - t0, endpoint)

    async def _collect(request: Request, handle, stops: list[str]):
        """Gather a non-streamed answer; a client that disconnects meanwhile cancels the handle."""
        matcher = _StopMatcher(stops)
        parts, finish, usage = [], None, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

        async def consume():
            nonlocal finish
            async for ev in handle:
                parts.append(matcher.feed(ev.text))
                usage["prompt_tokens"], usage["completion_tokens"] = ev.prompt_tokens, ev.completion_tokens
                if matcher.hit:
                    handle.cancel()
                    finish = "stop"
                    return
                if ev.finish_reason:
                    finish = ev.finish_reason
            parts.append(matcher.flush())

        async def watch():
            while True:
                if await request.is_disconnected():
                    handle.cancel()
                    return
                await asyncio.sleep(0.1)

        task, watcher = asyncio.create_task(consume()), asyncio.create_task(watch())
        try:
            await task
        except BackendError as e:
            raise HTTPError(503, str(e)) from None
        except RuntimeError as e:  # the engine failed this request
            raise HTTPError(503, str(e)) from None
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                handle.cancel()
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return "".join(parts), finish, usage

    async def _sse(handle, res: Resolved, rid: str, chat: bool, stops: list[str], include_usage: bool, t0: float,
                   endpoint: str):
        """Server-sent events in OpenAI's chunk shape; on disconnect Starlette cancels us and we cancel the handle."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        matcher = _StopMatcher(stops)
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

        def chunk(delta_text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else (
                    {"content": delta_text} if delta_text else {})
                ch = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                ch = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": res.ref,
                                          "choices": [ch]}) + "\n\n"

        finished = False
        first = True
        try:
            if chat:
                yield chunk(None, None, role=True)
            finish = None
            async for ev in handle:
                text = matcher.feed(ev.text)
                usage["prompt_tokens"], usage["completion_tokens"] = ev.prompt_tokens, ev.completion_tokens
                if text:
                    if first:
                        m.ttft.observe(time.monotonic() - t0, endpoint)
                        first = False
                    yield chunk(text, None)
                if matcher.hit:
                    handle.cancel()
                    finish = "stop"
                    break
                if ev.finish_reason:
                    finish = ev.finish_reason
            tail = matcher.flush()
            if tail:
                yield chunk(tail, None)
            yield chunk(None, finish or "stop")
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if include_usage:
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": res.ref,
                                             "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
            finished = True
            _account(res, usage, t0, endpoint)
        except (BackendError, RuntimeError) as e:
            yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error", "code": 503}}) + "\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                handle.cancel()

    # -- vLLM-shaped adapter management (admin)
    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadBody, request: Request):
        """`name@vN`: load that registry version (sha256-verified). `name` + `lora_path`: push the directory as the
        next version (same checks as `gemtune registry push`), then load it. Routes are not changed."""
        gateway.admin(request)
        try:
            ref = parse_model(body.lora_name)
        except UserError as e:
            raise HTTPError(400, str(e), param="lora_name") from None
        if ref.is_base:
            raise HTTPError(400, "'base' is not an adapter", param="lora_name")
        if ref.version is None:
            if ref.alias != DEFAULT_ALIAS or "@" in body.lora_name:
                raise HTTPError(400, "lora_name must be NAME (with lora_path, to push) or NAME@vN", param="lora_name")
            if not body.lora_path:
                raise HTTPError(400, "give lora_path to push a new version, or load a version as NAME@vN",
                                param="lora_path")
            try:
                vi = await asyncio.to_thread(gateway.registry.push, ref.name, body.lora_path)
            except UserError as e:
                raise HTTPError(400, str(e), param="lora_path") from None
            version = vi.version
        else:
            version = ref.version
            if not gateway.registry.exists(ref.name, version):
                raise HTTPError(404, f"adapter {ref.name}@{version} is not in the registry", param="lora_name")
        key = f"{ref.name}@{version}"
        res = Resolved(key, key, gateway.registry.adapters_dir / ref.name / version, None)
        t0 = time.monotonic()
        try:
            await gateway.ensure_loaded(res, reload=True)
        except Overloaded as e:
            raise HTTPError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        return {"status": "loaded", "model": key, "version": version,
                "load_ms": round((time.monotonic() - t0) * 1000, 1)}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadBody, request: Request):
        gateway.admin(request)
        try:
            ref = parse_model(body.lora_name)
        except UserError as e:
            raise HTTPError(400, str(e), param="lora_name") from None
        loaded = gateway.backend.loaded()
        keys = [body.lora_name] if ref.version else [k for k in loaded if k.split("@")[0] == ref.name]
        keys = [k for k in keys if k in loaded]
        if not keys:
            raise HTTPError(404, f"{body.lora_name!r} is not loaded", param="lora_name")
        for k in keys:
            try:
                await gateway.backend.unload(k)
            except UserError:
                pass  # evicted meanwhile: it is unloaded either way
        return {"status": "unloaded", "models": keys}

    # -- routes (admin)
    async def _route_change(fn, *args):
        try:
            out = await asyncio.to_thread(fn, *args)
        except CorruptAdapter as e:
            raise HTTPError(409, f"refused, the route is unchanged: {e}") from None
        except UserError as e:
            status = 404 if "not in the registry" in str(e) or "does not exist" in str(e) else 400
            raise HTTPError(status, str(e), param=e.field) from None
        await asyncio.to_thread(gateway.watcher.refresh, True)
        gateway._note_route_changes()
        return out

    @app.get("/admin/routes")
    async def get_routes(request: Request):
        gateway.admin(request)
        data = await asyncio.to_thread(gateway.routes.read)
        return {"routes": {n: {a: e["weights"] for a, e in al.items()} for n, al in data["routes"].items()},
                "serving": gateway.watcher.table,
                "rejected": {f"{n}@{a}": why for (n, a), why in gateway.watcher.rejected.items()}}

    @app.post("/admin/routes/promote")
    async def promote(body: PromoteBody, request: Request):
        gateway.admin(request)
        try:
            version = normalize_version(body.version)
        except UserError as e:
            raise HTTPError(400, str(e), param="version") from None
        return await _route_change(gateway.routes.promote, body.name, version, body.alias)

    @app.post("/admin/routes/split")
    async def split(body: SplitBody, request: Request):
        gateway.admin(request)
        try:
            weights = validate_weights(body.weights)
        except UserError as e:
            raise HTTPError(400, str(e), param="weights") from None
        return await _route_change(gateway.routes.split, body.name, body.alias, weights)

    @app.post("/admin/routes/rollback")
    async def rollback(body: RollbackBody, request: Request):
        gateway.admin(request)
        return await _route_change(gateway.routes.rollback, body.name, body.alias)

    # -- operations
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "engine": gateway.backend.name, "loaded_adapters": len(gateway.backend.loaded()),
                "queue_depth": gateway.backend.queue_depth(), "running": gateway.backend.running()}

    @app.get("/metrics")
    async def metrics(request: Request):
        if gateway.tenants is not None:
            gateway.admin(request)
        gateway._note_route_changes()
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    return app


# ---------------------------------------------------------------------------------------------- running it
class ServerThread:
    """uvicorn in a background thread (tests, benchmarks, notebooks): `with ServerThread(app, port=0) as s:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5, backlog=2048,
                                                    timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, name="gemtune-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start (see log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in time")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
