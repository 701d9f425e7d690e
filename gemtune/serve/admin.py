"""The operator's endpoints: vLLM-shaped adapter loading (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), the
route table (`/admin/routes`, promote, split, rollback), `/healthz` and `/metrics`.

All but `/healthz` need the admin key (`/metrics` only when tenants are configured). Route changes go through the
registry's own checks (sha256 of every arm): a corrupt version is 409 and the route is unchanged; an unknown name or
version is 404 (the registry's `NotFound`), any other refusal 400. A promote or split is also gated like `gemtune
registry promote`: a new arm needs a passing eval verdict against what the alias serves now, else 409 and the route
is unchanged; `"force": true` routes anyway and records it on the route and in its history.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from gemtune import errors
from gemtune.errors import UserError
from gemtune.registry.routes import DEFAULT_ALIAS, RouteTable, parse_model, validate_weights
from gemtune.registry.store import CorruptAdapter, Refused, normalize_version
from gemtune.serve.asgi import read_body
from gemtune.serve.backends import Overloaded
from gemtune.serve.completions import gateway_of
from gemtune.serve.gateway import Resolved
from gemtune.serve.metrics import CONTENT_TYPE
from gemtune.serve.openai import HTTPError

NotFound = getattr(errors, "NotFound", None)  # the registry's "no such adapter/version/alias" (gemtune.errors)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str | None = None


class UnloadBody(BaseModel):
    lora_name: str


class PromoteBody(BaseModel):
    name: str
    version: str
    alias: str = DEFAULT_ALIAS
    force: bool = False  # route a version without a passing verdict against the alias's current one (recorded)


class SplitBody(BaseModel):
    name: str
    alias: str = DEFAULT_ALIAS
    weights: dict[str, int]
    force: bool = False


class RollbackBody(BaseModel):
    name: str
    alias: str = DEFAULT_ALIAS


def is_not_found(e: UserError) -> bool:
    """Whether a registry refusal means "there is no such thing" (404) rather than "not like that" (400)."""
    if NotFound is not None:
        return isinstance(e, NotFound)
    return "not in the registry" in str(e) or "does not exist" in str(e)  # a registry without typed errors


def _parsed(lora_name: str):
    try:
        return parse_model(lora_name)
    except UserError as e:
        raise HTTPError(400, str(e), param="lora_name") from None


# ------------------------------------------------------------------------------------------------- adapters
async def load_lora(request: Request):
    """`name@vN`: load that registry version (sha256-verified). `name` + `lora_path`: push the directory as the
    next version (same checks as `gemtune registry push`), then load it. Routes are not changed."""
    gateway = gateway_of(request)
    gateway.admin(request)
    body = await read_body(request, LoadBody)
    ref = _parsed(body.lora_name)
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


async def unload_lora(request: Request):
    gateway = gateway_of(request)
    gateway.admin(request)
    body = await read_body(request, UnloadBody)
    ref = _parsed(body.lora_name)
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


# --------------------------------------------------------------------------------------------------- routes
async def change_route(request: Request, fn, *args):
    """Apply a route change under the registry's checks, then make the server serve it at once."""
    gateway = gateway_of(request)
    try:
        out = await asyncio.to_thread(fn, *args)
    except (CorruptAdapter, Refused) as e:
        raise HTTPError(409, f"refused, the route is unchanged: {e}", param=getattr(e, "field", None)) from None
    except UserError as e:
        raise HTTPError(404 if is_not_found(e) else 400, str(e), param=e.field) from None
    await asyncio.to_thread(gateway.watcher.refresh, True)
    gateway.note_route_changes()
    return out


def _gated(gateway, force: bool) -> RouteTable:
    """The gateway's route table with the registry's verdict check (`registry.route_check`), as the CLI has it."""
    rt = gateway.routes
    return RouteTable(gateway.registry, verify=rt.verify, source=rt.source,
                      check=gateway.registry.route_check(force=force))


async def get_routes(request: Request):
    gateway = gateway_of(request)
    gateway.admin(request)
    data = await asyncio.to_thread(gateway.routes.read)
    return {"routes": {n: {a: e["weights"] for a, e in al.items()} for n, al in data["routes"].items()},
            "serving": gateway.watcher.table,
            "rejected": {f"{n}@{a}": why for (n, a), why in gateway.watcher.rejected.items()}}


async def promote(request: Request):
    gateway = gateway_of(request)
    gateway.admin(request)
    body = await read_body(request, PromoteBody)
    try:
        version = normalize_version(body.version)
    except UserError as e:
        raise HTTPError(400, str(e), param="version") from None
    return await change_route(request, _gated(gateway, body.force).promote, body.name, version, body.alias)


async def split(request: Request):
    gateway = gateway_of(request)
    gateway.admin(request)
    body = await read_body(request, SplitBody)
    try:
        weights = validate_weights(body.weights)
    except UserError as e:
        raise HTTPError(400, str(e), param="weights") from None
    return await change_route(request, _gated(gateway, body.force).split, body.name, body.alias, weights)


async def rollback(request: Request):
    gateway = gateway_of(request)
    gateway.admin(request)
    body = await read_body(request, RollbackBody)
    return await change_route(request, gateway.routes.rollback, body.name, body.alias)


# ----------------------------------------------------------------------------------------------- operations
async def healthz(request: Request):
    backend = gateway_of(request).backend
    return {"status": "ok", "engine": backend.name, "loaded_adapters": len(backend.loaded()),
            "queue_depth": backend.queue_depth(), "running": backend.running()}


async def metrics(request: Request):
    gateway = gateway_of(request)
    if gateway.tenants is not None:
        gateway.admin(request)
    gateway.note_route_changes()
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)
