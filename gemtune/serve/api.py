"""The OpenAI-compatible server (DESIGN.md §5): routes, tenants, admin, metrics, over a backend.

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

Where each part lives: `create_app` (here) assembles the FastAPI app — lifespan, error handlers, middleware and the
route table; `openai.py` holds OpenAI's request/response/SSE shapes and the stop matcher; `gateway.py` the `Gateway`
(tenants, admission, verified loading) and `build_gateway`; `completions.py` the OpenAI endpoints and the one
generation path; `admin.py` adapter loading, routes, health and metrics; `asgi.py` body limits, the status counter
and guarded streams; `server.py` uvicorn (`ServerThread`, `uvicorn_config`).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gemtune.serve import admin, completions
from gemtune.serve.asgi import BODY_TIMEOUT_S, MAX_BODY_BYTES, BodyLimits, StatusCounter
from gemtune.serve.gateway import Gateway, build_gateway
from gemtune.serve.openai import ChatBody, CompletionBody, HTTPError, body_doc, openapi_errors, validation_error
from gemtune.serve.server import HEADER_TIMEOUT_S, ServerThread, uvicorn_config

__all__ = ["HEADER_TIMEOUT_S", "Gateway", "ServerThread", "build_gateway", "create_app", "uvicorn_config"]
log = logging.getLogger("gemtune.serve")

# (path, method, handler, body model): the whole HTTP surface. Handler names are the OpenAPI operation names.
ROUTES = [
    ("/v1/models", "GET", completions.models, None),
    ("/v1/chat/completions", "POST", completions.chat, ChatBody),
    ("/v1/completions", "POST", completions.completions, CompletionBody),
    ("/v1/load_lora_adapter", "POST", admin.load_lora, admin.LoadBody),
    ("/v1/unload_lora_adapter", "POST", admin.unload_lora, admin.UnloadBody),
    ("/admin/routes", "GET", admin.get_routes, None),
    ("/admin/routes/promote", "POST", admin.promote, admin.PromoteBody),
    ("/admin/routes/split", "POST", admin.split, admin.SplitBody),
    ("/admin/routes/rollback", "POST", admin.rollback, admin.RollbackBody),
    ("/healthz", "GET", admin.healthz, None),
    ("/metrics", "GET", admin.metrics, None),
]


def create_app(gateway: Gateway, *, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI app over `gateway`. Bodies over `max_body_bytes` are refused (413) as they are read, and a body
    that has not fully arrived `body_timeout_s` after its headers is refused (408)."""

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
    app.state.body_limits = BodyLimits(max_body_bytes, body_timeout_s)
    _openapi_document(app)
    _error_handlers(app)
    app.add_middleware(StatusCounter, metrics=gateway.metrics)
    for path, method, handler, body in ROUTES:
        app.add_api_route(path, handler, methods=[method], openapi_extra=body_doc(body) if body else None)
    return app


def _openapi_document(app: FastAPI) -> None:
    """/openapi.json with the bodies the handlers read themselves, bearer auth and the error shape."""
    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = openapi_errors(get_openapi(title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, FastAPI's and Starlette's own included; an unexpected one is a bare 500."""
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
