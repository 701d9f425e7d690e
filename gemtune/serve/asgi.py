"""The HTTP plumbing under the handlers: request bodies read under a size cap and a time limit, answers counted by
endpoint and status, and streamed answers that always release what they hold.

Bodies are read by the handlers themselves (`read_body`), after the API key was checked, so an unauthenticated
client never makes the server wait for or buffer its body. The limits live on the app (`app.state.body_limits`,
set by `api.create_app`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from gemtune.serve.metrics import Metrics
from gemtune.serve.openai import HTTPError, parse_json, validation_error

MAX_BODY_BYTES = 2 * 1024 * 1024  # request bodies over this are refused (413) while being read
BODY_TIMEOUT_S = 30.0  # a request body must arrive within this once its headers have (else 408)
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
               "/v1/unload_lora_adapter", "/admin/routes", "/admin/routes/promote", "/admin/routes/split",
               "/admin/routes/rollback", "/healthz", "/metrics", "/openapi.json"}


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int = MAX_BODY_BYTES
    timeout_s: float = BODY_TIMEOUT_S


async def read_raw(request: Request) -> bytes:
    """The body, refused (413) as soon as it is known to exceed the cap, and within the time limit (408)."""
    limits: BodyLimits = getattr(request.app.state, "body_limits", BodyLimits())
    close = {"Connection": "close"}  # the rest of the body is not read: this connection cannot be reused
    too_big = HTTPError(413, f"request body over the limit of {limits.max_bytes} bytes", headers=close)
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or len(cl) > 15 or int(cl) > limits.max_bytes):
        raise too_big
    chunks, total = [], 0
    try:
        async with asyncio.timeout(limits.timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limits.max_bytes:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {limits.timeout_s:g} s",
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


class StatusCounter:
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


class GuardedStream(StreamingResponse):
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
