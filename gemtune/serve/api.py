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

Hostile input is a 4xx in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`, never a 5xx or
FastAPI's `{"detail": …}`: the key is checked before the body is read; the body is read under a size cap (413) and
a time limit (408); JSON that nests too deep, holds a number of over 4,300 digits, or strings that are not valid
Unicode (lone surrogates) is a 400; no error echoes more than a short prefix of what the client sent. Prompts are
measured in characters before they are tokenised, and tokenised off the event loop, so one huge prompt cannot stall
other requests. Each tenant has its own share of the engine (`auth.Limits`); over it, 429 for that tenant alone.
Partial requests that never finish their headers are closed by the server (`header_timeout_s`, see `ServerThread`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gemtune.errors import UserError
from gemtune.registry.routes import DEFAULT_ALIAS, RouteTable, RouteWatcher, parse_model, validate_weights
from gemtune.registry.store import CorruptAdapter, Registry, normalize_version
from gemtune.serve.auth import OPEN, Principal, Tenants, bearer_key
from gemtune.serve.backends import BackendError, Gen, NotLoaded, Overloaded
from gemtune.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("gemtune.serve")
DEFAULT_MAX_TOKENS = 256
RECHECK_AFTER_S = 2.0  # an admin route change's own sha256 check stands in for the watcher's this long
MAX_BODY_BYTES = 2 * 1024 * 1024  # request bodies over this are refused (413) while being read
BODY_TIMEOUT_S = 30.0  # a request body must arrive within this once its headers have (else 408)
HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this (else the connection is closed)
MAX_JSON_DEPTH = 32  # nesting levels of a request body (the deepest real request has 5)
MAX_MODEL_CHARS = 160  # the longest valid model string is 64 + 1 + 64 characters
ECHO_CHARS = 64  # at most this much of any value the client sent is repeated in an error
MAX_MESSAGE_CHARS = 1000
MIN_TEMPERATURE = 1e-5  # a temperature below this is greedy (vLLM's rule): dividing logits by 1e-50 gives infinities
INT64 = (-(2**63), 2**63 - 1)


def clip(value: Any, n: int = ECHO_CHARS) -> str:
    """`repr` of a client-sent value cut to `n` characters, safe to put in an error message."""
    r = repr(value) if not isinstance(value, str) else repr(value[: n + 1])
    return r if len(r) <= n else r[: n - 1] + "…"


class HTTPError(Exception):
    """An answer with a status code and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                              404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                              409: "conflict_error", 413: "invalid_request_error",
                              429: "rate_limit_error"}.get(status, "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.status), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, type_: str, param: str | None, code: int) -> dict:
    """OpenAI's error shape; the message is bounded and always encodable (a lone surrogate becomes `\\udXXX`)."""
    def safe(s: str | None, n: int) -> str | None:
        if s is None:
            return None
        s = str(s)
        s = s if len(s) <= n else s[: n - 1] + "…"
        return s.encode("utf-8", "backslashreplace").decode("utf-8")

    return {"error": {"message": safe(message, MAX_MESSAGE_CHARS), "type": type_, "param": safe(param, ECHO_CHARS),
                      "code": code}}


# ------------------------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="`base`, `NAME` (its prod alias), `NAME@vN` or `NAME@ALIAS`")
    max_tokens: Optional[int] = Field(None, ge=1, le=2**31, description="default: what fits the context, at most "
                                      f"{DEFAULT_MAX_TOKENS}")
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2**31)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False,
                               description=f"0 (or below {MIN_TEMPERATURE:g}) is greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=INT64[0], le=INT64[1])
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    user: Optional[str] = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    logprobs: Optional[Any] = None
    ignore_eos: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="only `text` is supported")
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list] = None


class CompletionBody(_Body):
    prompt: Union[Annotated[str, Field(min_length=1)], Annotated[list[str], Field(min_length=1, max_length=1)],
                  Annotated[list[int], Field(min_length=1)]] = Field(
        description="one string, or a list of token ids (batched prompts are not supported)")
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


def _inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with `$defs` inlined (the OpenAPI document has no `$defs` to point into)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(x):
        if isinstance(x, dict):
            if "$ref" in x and x["$ref"].startswith("#/$defs/"):
                return walk(defs[x["$ref"].split("/")[-1]])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(schema)


def body_doc(model: type[BaseModel]) -> dict:
    """`openapi_extra` describing a JSON body that the handler reads itself (`read_body`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline_schema(model)}}}}


def parse_json(raw: bytes) -> Any:
    """Bytes → JSON value, or an HTTPError 400 naming what is wrong (without echoing the body)."""
    if not raw.strip():
        raise HTTPError(400, "the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise HTTPError(400, f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid JSON: the body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:  # int() over sys.get_int_max_str_digits() (4,300) digits
        why = "a number has too many digits" if "digits" in str(e) else "unreadable value"
        raise HTTPError(400, f"invalid JSON: {why}") from None
    check_json(data)
    return data


def check_json(data: Any) -> None:
    """Depth and Unicode checks over a parsed body, iteratively (no recursion for an attacker to exhaust)."""
    stack = [(data, 1, "")]
    while stack:
        x, depth, path = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise HTTPError(400, f"invalid request: the body nests deeper than {MAX_JSON_DEPTH} levels")
            items = x.items() if isinstance(x, dict) else enumerate(x)
            for k, v in items:
                if isinstance(k, str):
                    _check_text(k, path or "body")
                sub = f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"
                stack.append((v, depth + 1, sub.lstrip(".")))
        elif isinstance(x, str):
            _check_text(x, path or "body")


def _check_text(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HTTPError(400, f"invalid request: {clip(path)}: the string holds a lone surrogate "
                             f"(U+{ord(s[e.start]):04X}), which is not valid Unicode", param=path) from None


def validation_error(errors: list) -> HTTPError:
    """Pydantic/FastAPI validation errors → one 400 naming the first field (clipped: keys are client input)."""
    first = errors[0] if errors else {}
    loc = [x for x in first.get("loc", ()) if x != "body"]
    path = ".".join(clip(x, 40).strip("'") if isinstance(x, str) else str(x) for x in loc) or None
    return HTTPError(400, f"invalid request: {path or 'body'}: {first.get('msg', 'invalid')}", param=path)


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

    def __init__(self, registry: Registry, backend, tenants: Tenants | None = None, *, poll_s: float = 0.1):
        self.registry = registry
        self.backend = backend
        self.tenants = tenants
        self.gates: dict[str, TenantGate] = {}
        self.metrics = Metrics(queue_depth=backend.queue_depth, loaded=backend.loaded, running=backend.running,
                               tenants=lambda: [(n, g.running, len(g.waiters)) for n, g in sorted(self.gates.items())])
        self.max_prompt_chars = max_prompt_chars(backend)
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
            if isinstance(p, BaseModel):
                p = p.model_dump()
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise HTTPError(400, f"{where}.content[{i}]: only text parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise HTTPError(400, f"{where}.content must be a string or a list of text parts", param="messages")


def chat_messages(messages: list) -> list[dict]:
    """Request messages → [{"role", "content": str}] (text parts joined); cheap, runs before tokenising."""
    msgs = []
    for i, m in enumerate(messages):
        if isinstance(m, BaseModel):
            m = m.model_dump()
        if not isinstance(m, dict):
            raise HTTPError(400, f"messages[{i}] must be an object", param="messages")
        msgs.append({"role": m.get("role"), "content": _content_text(m.get("content"), f"messages[{i}]")})
    return msgs


def check_prompt_chars(n_chars: int, limit: int | None, param: str) -> None:
    if limit is not None and n_chars > limit:
        raise HTTPError(400, f"{param} is {n_chars} characters, more than can fit the context (at most {limit} "
                             "characters); shorten it", param=param)


def chat_prompt_ids(backend, messages: list) -> list[int]:
    """Validate and render chat messages with the base's template (tokenises: call it off the event loop)."""
    from gemtune.base.templates import render_prompt, validate_messages

    msgs = chat_messages(messages)
    try:
        validate_messages(msgs, require_final_assistant=False)
        if msgs[-1]["role"] != "user":
            raise UserError("the last message must be the user's", field="messages")
        return render_prompt(msgs, backend.tokenizer, backend.family).input_ids
    except UserError as e:
        raise HTTPError(400, str(e), param="messages") from None


def completion_prompt(prompt) -> str | list[int]:
    """The prompt as one string or a list of token ids (cheap checks, before tokenising)."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise HTTPError(400, "prompt must be one string (batched prompts are not supported)", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise HTTPError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")
    return prompt


def completion_prompt_ids(backend, prompt) -> list[int]:
    """Token ids for a completion prompt (tokenises: call it off the event loop)."""
    prompt = completion_prompt(prompt)
    if isinstance(prompt, list):
        return prompt
    return backend.tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _gen_params(body: _Body, prompt_ids: list[int], res: Resolved, tenant: str | None = None) -> Gen:
    if body.n != 1:
        raise HTTPError(400, "n must be 1", param="n")
    if body.logprobs:
        raise HTTPError(400, "logprobs are not supported", param="logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS  # cut to what fits the context once the prompt is tokenised
    if not (1 <= max_tokens <= 2**31):
        raise HTTPError(400, f"max_tokens must be from 1 to {2**31}, got {clip(max_tokens)}", param="max_tokens")
    t = body.temperature
    if not (math.isfinite(t) and 0 <= t <= 2):
        raise HTTPError(400, f"temperature must be in [0, 2], got {clip(t)}", param="temperature")
    if t < MIN_TEMPERATURE:
        t = 0.0  # greedy, whatever the backend would make of dividing by 1e-50
    if not (math.isfinite(body.top_p) and 0 < body.top_p <= 1):
        raise HTTPError(400, f"top_p must be in (0, 1], got {clip(body.top_p)}", param="top_p")
    if body.seed is not None and not (INT64[0] <= body.seed <= INT64[1]):
        raise HTTPError(400, f"seed must be a 64-bit signed integer, from {INT64[0]} to {INT64[1]}", param="seed")
    return Gen(prompt_ids=prompt_ids, adapter=res.key, max_tokens=max_tokens, temperature=t,
               top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos, tenant=tenant)


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
               "/admin/routes/rollback", "/healthz", "/metrics", "/openapi.json"}


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


class _GuardedStream(StreamingResponse):
    """A streamed answer whose `on_close` runs however the response ends (finished, client gone, or never started:
    an async generator that never ran would not run its own `finally`), so the tenant slot and the engine request
    are always released."""

    def __init__(self, content, *, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _openapi_errors(schema: dict) -> dict:
    """Bearer auth and the error shape in the OpenAPI document."""
    comp = schema.setdefault("components", {})
    comp.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    comp.setdefault("schemas", {})["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "code": {"type": "integer"}}}}}
    err = {"description": "Error (OpenAI shape)",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            if path != "/healthz":
                op["security"] = [{"bearer": []}]
            op.setdefault("responses", {})["4XX"] = err
    return schema


def create_app(gateway: Gateway, *, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app over `gateway`. Bodies over `max_body_bytes` are refused (413) as they are read, and a body
    that has not fully arrived `body_timeout_s` after its headers is refused (408)."""
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

    app = FastAPI(title="gemtune", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.gateway = gateway
    m = gateway.metrics

    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = _openapi_errors(get_openapi(title=app.title, version=app.version,
                                                             routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException):  # unknown path 404, wrong method 405
        return HTTPError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return HTTPError(500, f"internal error: {type(exc).__name__}").response()

    app.add_middleware(_StatusCounter, metrics=m)

    # -- bodies
    async def read_raw(request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to exceed the cap, and within the time limit (408)."""
        close = {"Connection": "close"}  # the rest of the body is not read: this connection cannot be reused
        too_big = HTTPError(413, f"request body over the limit of {max_body_bytes} bytes", headers=close)
        cl = request.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or len(cl) > 15 or int(cl) > max_body_bytes):
            raise too_big
        chunks, total = [], 0
        try:
            async with asyncio.timeout(body_timeout_s):
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > max_body_bytes:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPError(408, f"the request body did not arrive within {body_timeout_s:g} s",
                            headers=close) from None
        except ClientDisconnect:
            raise HTTPError(499, "client closed request") from None
        return b"".join(chunks)

    def parse_as(raw: bytes, model: type[BaseModel]):
        data = parse_json(raw)
        if not isinstance(data, dict):
            raise HTTPError(400, f"the body must be a JSON object, got {type(data).__name__}")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e.errors(include_input=False, include_url=False)) from None

    async def read_body(request: Request, model: type[BaseModel]):
        """Read, parse and validate a JSON body off the event loop (a 2 MiB body takes milliseconds to parse)."""
        return await asyncio.to_thread(parse_as, await read_raw(request), model)

    # -- OpenAI-compatible
    @app.get("/v1/models")
    async def models(request: Request):
        p = gateway.principal(request)
        return {"object": "list", "data": gateway.models_for(p)}

    @app.post("/v1/chat/completions", openapi_extra=body_doc(ChatBody))
    async def chat(request: Request):
        p = gateway.principal(request)
        body = await read_body(request, ChatBody)
        if body.tools:
            raise HTTPError(400, "tools are not supported", param="tools")
        res = gateway.resolve(p, body.model, body.user)
        gen = _gen_params(body, [], res, tenant=None if p.limits is None else p.name)
        limit = getattr(gateway.backend, "max_model_len", None)
        if limit and len(body.messages) >= limit:  # every message takes at least one token
            raise HTTPError(400, f"{len(body.messages)} messages cannot fit max_model_len {limit} tokens",
                            param="messages")
        msgs = chat_messages(body.messages)
        check_prompt_chars(sum(len(mm["content"]) for mm in msgs), gateway.max_prompt_chars, "messages")
        return await _generate(request, p, body, res, gen, lambda: chat_prompt_ids(gateway.backend, msgs), chat=True)

    @app.post("/v1/completions", openapi_extra=body_doc(CompletionBody))
    async def completions(request: Request):
        p = gateway.principal(request)
        body = await read_body(request, CompletionBody)
        if body.echo or body.suffix:
            raise HTTPError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        res = gateway.resolve(p, body.model, body.user)
        gen = _gen_params(body, [], res, tenant=None if p.limits is None else p.name)
        prompt = completion_prompt(body.prompt)
        if isinstance(prompt, str):
            check_prompt_chars(len(prompt), gateway.max_prompt_chars, "prompt")
        elif getattr(gateway.backend, "max_model_len", None) and len(prompt) >= gateway.backend.max_model_len:
            raise HTTPError(400, f"prompt is {len(prompt)} tokens; max_model_len is {gateway.backend.max_model_len}",
                            param="prompt")
        return await _generate(request, p, body, res, gen, lambda: completion_prompt_ids(gateway.backend, prompt),
                               chat=False)

    async def _take_slot(request: Request, p: Principal) -> TenantSlot:
        """The tenant's own slot: at once, after waiting in its line, or 429 when its line is full too."""
        gate = gateway.gate(p)
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
            m.rejected.inc("tenant_limit")
            m.tenant_rejected.inc(p.name)
            raise HTTPError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        finally:
            if not task.done():
                task.cancel()  # acquire() hands on a slot it got while being cancelled

    async def _generate(request: Request, p: Principal, body: _Body, res: Resolved, gen: Gen, tokenise, *,
                        chat: bool):
        """Take the tenant's slot, tokenise (off the loop: under the slot, so a tenant's tokenising is within its
        share too), submit, and answer (streamed or whole); the slot is released on every path."""
        stops = _stops(body)
        slot = await _take_slot(request, p)
        try:
            t0 = time.monotonic()
            gen.prompt_ids = await asyncio.to_thread(tokenise)
            limit = getattr(gateway.backend, "max_model_len", None)
            if body.max_tokens is None and body.max_completion_tokens is None and limit:
                gen.max_tokens = max(1, min(gen.max_tokens, limit - len(gen.prompt_ids)))  # as vLLM does
            handle = await gateway.submit(res, gen)
        except BaseException:
            slot.release()
            raise
        endpoint = "chat" if chat else "completions"
        headers = {"x-gemtune-adapter": res.ref}
        if res.route:
            headers["x-gemtune-route"] = res.route
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            def on_close():
                handle.cancel()  # a no-op for a request that finished
                slot.release()

            try:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                return _GuardedStream(_sse(handle, res, rid, chat, stops, include_usage, t0, endpoint),
                                      on_close=on_close, media_type="text/event-stream", headers=headers)
            except BaseException:
                on_close()
                raise
        try:
            text, finish, usage = await _collect(request, handle, stops)
        finally:
            slot.release()
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
    @app.post("/v1/load_lora_adapter", openapi_extra=body_doc(LoadBody))
    async def load_lora(request: Request):
        """`name@vN`: load that registry version (sha256-verified). `name` + `lora_path`: push the directory as the
        next version (same checks as `gemtune registry push`), then load it. Routes are not changed."""
        gateway.admin(request)
        body = await read_body(request, LoadBody)
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

    @app.post("/v1/unload_lora_adapter", openapi_extra=body_doc(UnloadBody))
    async def unload_lora(request: Request):
        gateway.admin(request)
        body = await read_body(request, UnloadBody)
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

    @app.post("/admin/routes/promote", openapi_extra=body_doc(PromoteBody))
    async def promote(request: Request):
        gateway.admin(request)
        body = await read_body(request, PromoteBody)
        try:
            version = normalize_version(body.version)
        except UserError as e:
            raise HTTPError(400, str(e), param="version") from None
        return await _route_change(gateway.routes.promote, body.name, version, body.alias)

    @app.post("/admin/routes/split", openapi_extra=body_doc(SplitBody))
    async def split(request: Request):
        gateway.admin(request)
        body = await read_body(request, SplitBody)
        try:
            weights = validate_weights(body.weights)
        except UserError as e:
            raise HTTPError(400, str(e), param="weights") from None
        return await _route_change(gateway.routes.split, body.name, body.alias, weights)

    @app.post("/admin/routes/rollback", openapi_extra=body_doc(RollbackBody))
    async def rollback(request: Request):
        gateway.admin(request)
        body = await read_body(request, RollbackBody)
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
        return Response(m.render(), media_type=CONTENT_TYPE)

    return app


# ---------------------------------------------------------------------------------------------- running it
def header_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol with a header timeout, which uvicorn lacks (its `timeout_keep_alive` stops counting
    at the first byte): a connection whose request headers are not complete `seconds` after the request's first
    byte (or after the connection opened) is closed. Without it, a client that sends half a request line and then
    nothing holds a connection, before any authentication, for ever (slowloris). Bodies have their own limit in
    the app (`create_app(body_timeout_s=...)`). Requests the HTTP parser refuses are answered in OpenAI's error
    shape rather than uvicorn's plain text."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._hdr_timer = None
            self._arm()

        def _arm(self) -> None:
            self._hdr_cycle = self.cycle  # a new cycle appears when the next request's headers are complete
            self._hdr_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm(self) -> None:
            if self._hdr_timer is not None:
                self._hdr_timer.cancel()
                self._hdr_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._hdr_timer is not None:
                if self.cycle is not self._hdr_cycle:
                    self._disarm()
            elif (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self._arm()  # the first bytes of a next request on a kept-alive connection

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refuses (headers over 16 KiB, bad syntax) in OpenAI's shape too."""
            body = json.dumps(error_body(f"invalid HTTP request: {msg}", "invalid_request_error", None,
                                         400)).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
                                 + body)
            self.transport.close()

        def _header_timeout(self) -> None:
            self._hdr_timer = None
            if self.cycle is self._hdr_cycle and not self.transport.is_closing():
                log.info("closing a connection whose request headers did not arrive within %g s", seconds)
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_config(app, *, host: str, port: int, log_level: str = "warning",
                   header_timeout_s: float = HEADER_TIMEOUT_S, **kw):
    """The uvicorn settings `gemtune serve` and `ServerThread` share. Keep-alive is longer than clients' pools
    (httpx: 5 s) so a reused idle connection is never closed under them."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, backlog=2048, timeout_keep_alive=30,
                          http=header_timeout_protocol(header_timeout_s), **kw)


class ServerThread:
    """uvicorn in a background thread (tests, benchmarks, notebooks): `with ServerThread(app, port=0) as s:`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", *,
                 header_timeout_s: float = HEADER_TIMEOUT_S):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level,
                                                    header_timeout_s=header_timeout_s, timeout_graceful_shutdown=5))
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
