"""The OpenAI-compatible endpoints and the one generation path behind them.

`/v1/chat/completions` and `/v1/completions` differ only in how the prompt becomes token ids; both then go through
`generate`: take the tenant's slot → tokenise off the event loop (under the slot, so a tenant's tokenising is within
its share) → submit through the gateway → answer whole (`collect`) or streamed (`stream`). The slot and the engine
request are released on every path, and a client that goes away cancels its request.

Handlers are plain functions of the request; the gateway is `request.app.state.gateway` (`api.create_app`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from gemtune.errors import UserError
from gemtune.serve.asgi import GuardedStream, read_body
from gemtune.serve.auth import Principal
from gemtune.serve.backends import BackendError, Gen
from gemtune.serve.gateway import Gateway, Resolved, TenantSlot
from gemtune.serve.openai import (ChatBody, CompletionBody, GenBody, HTTPError, SSEFrames, StopMatcher, chat_messages,
                                  chat_prompt_ids, check_prompt_chars, completion_prompt, completion_prompt_ids,
                                  completion_response, gen_params, new_usage, stop_strings)
from gemtune.serve.structured import tool_call_deltas, tool_calls_of, tool_plan

# What a generating request can fail with once admitted: the backend (vLLM gone) or the engine (RequestFailed, a
# RuntimeError subclass whose `.reason` says whether it was this request alone).
GENERATION_ERRORS = (BackendError, RuntimeError)


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


# ------------------------------------------------------------------------------------------------- endpoints
async def models(request: Request):
    gateway = gateway_of(request)
    p = gateway.principal(request)
    return {"object": "list", "data": gateway.models_for(p)}


async def chat(request: Request):
    gateway = gateway_of(request)
    p = gateway.principal(request)
    body = await read_body(request, ChatBody)
    res = gateway.resolve(p, body.model, body.user)
    gen = gen_params(body, res.key, tenant=_tenant(p))
    family = gateway.backend.family
    try:
        plan = tool_plan(body.tools, body.tool_choice, family)
    except UserError as e:
        raise HTTPError(400, str(e), param=e.field or "tools") from None
    if plan is not None and plan.grammar is not None:
        if gen.grammar is not None:
            raise HTTPError(400, "response_format json_object/json_schema cannot be combined with tool_choice "
                                 "required or a named tool (each decodes under its own grammar)", param="tool_choice")
        gen.grammar = plan.grammar
    limit = getattr(gateway.backend, "max_model_len", None)
    if limit and len(body.messages) >= limit:  # every message takes at least one token
        raise HTTPError(400, f"{len(body.messages)} messages cannot fit max_model_len {limit} tokens",
                        param="messages")
    msgs = chat_messages(body.messages)
    tools = plan.tools if plan is not None else None
    n_chars = sum(len(m["content"]) for m in msgs) + (len(json.dumps(tools)) if tools else 0)
    check_prompt_chars(n_chars, gateway.max_prompt_chars, "messages")
    return await generate(request, p, body, res, gen, lambda: chat_prompt_ids(gateway.backend, msgs, tools),
                          chat=True, tools_family=family if plan is not None and plan.parse else None)


async def completions(request: Request):
    gateway = gateway_of(request)
    p = gateway.principal(request)
    body = await read_body(request, CompletionBody)
    if body.echo or body.suffix:
        raise HTTPError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
    res = gateway.resolve(p, body.model, body.user)
    gen = gen_params(body, res.key, tenant=_tenant(p))
    prompt = completion_prompt(body.prompt)
    limit = getattr(gateway.backend, "max_model_len", None)
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), gateway.max_prompt_chars, "prompt")
    elif limit and len(prompt) >= limit:
        raise HTTPError(400, f"prompt is {len(prompt)} tokens; max_model_len is {limit}", param="prompt")
    return await generate(request, p, body, res, gen, lambda: completion_prompt_ids(gateway.backend, prompt),
                          chat=False)


def _tenant(p: Principal) -> str | None:
    return None if p.limits is None else p.name


# ------------------------------------------------------------------------------------------- generation path
async def generate(request: Request, p: Principal, body: GenBody, res: Resolved, gen: Gen, tokenise, *,
                   chat: bool, tools_family=None):
    """Take the tenant's slot, tokenise, submit, and answer (streamed or whole); the slot is released on every
    path. With `tools_family` (a chat request with tools), tool calls are parsed out of the answer in that
    family's syntax and returned as `tool_calls` (finish_reason "tool_calls")."""
    gateway = gateway_of(request)
    stops = stop_strings(body)
    slot = await gateway.take_slot(request, p)
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
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return _stream_response(gateway, handle, slot, SSEFrames(rid, res.ref, chat=chat), res, stops,
                                include_usage, t0, endpoint, headers, tools_family)
    try:
        text, finish, usage = await collect(gateway, request, handle, stops)
    finally:
        slot.release()
    gateway.account(res, usage, t0, endpoint)
    if finish == "cancelled":
        raise HTTPError(499, "client closed request")
    calls = None
    if tools_family is not None:
        text, calls = tool_calls_of(text, tools_family)
        finish = _tool_finish(finish, calls)
    return JSONResponse(completion_response(rid, res.ref, text, finish, usage, chat=chat, tool_calls=calls),
                        headers=headers)


def _tool_finish(finish: str | None, calls: list) -> str | None:
    """OpenAI's finish reason for an answer that called tools: "tool_calls" (unless it was cut by length)."""
    return "tool_calls" if calls and finish in ("stop", None) else finish


def _stream_response(gateway: Gateway, handle, slot: TenantSlot, frames: SSEFrames, res: Resolved, stops: list[str],
                     include_usage: bool, t0: float, endpoint: str, headers: dict, tools_family=None) -> GuardedStream:
    def on_close():
        handle.cancel()  # a no-op for a request that finished
        slot.release()

    try:
        return GuardedStream(stream(gateway, handle, frames, res, stops, include_usage, t0, endpoint, tools_family),
                             on_close=on_close, media_type="text/event-stream", headers=headers)
    except BaseException:
        on_close()
        raise


class Answer:
    """One request's text as the backend produces it: events through the `stop` matcher (a hit cancels the
    request), with the usage and the finish reason kept as they arrive."""

    def __init__(self, handle, stops: list[str]):
        self.handle, self.matcher = handle, StopMatcher(stops)
        self.usage, self.finish = new_usage(), None

    async def texts(self):
        """The non-empty pieces of text, in order, none of them containing (or ending in the start of) a stop."""
        async for ev in self.handle:
            text = self.matcher.feed(ev.text)
            self.usage["prompt_tokens"], self.usage["completion_tokens"] = ev.prompt_tokens, ev.completion_tokens
            if text:
                yield text
            if self.matcher.hit:
                self.handle.cancel()
                self.finish = "stop"
                break
            if ev.finish_reason:
                self.finish = ev.finish_reason
        tail = self.matcher.flush()
        if tail:
            yield tail
        self.usage["total_tokens"] = self.usage["prompt_tokens"] + self.usage["completion_tokens"]


async def collect(gateway: Gateway, request: Request, handle, stops: list[str]):
    """Gather a non-streamed answer; a client that disconnects meanwhile cancels the handle."""
    answer, parts = Answer(handle, stops), []

    async def consume():
        async for text in answer.texts():
            parts.append(text)

    async def watch():
        while True:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(0.1)

    task, watcher = asyncio.create_task(consume()), asyncio.create_task(watch())
    try:
        await task
    except GENERATION_ERRORS as e:
        raise gateway.failed(e) from None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            handle.cancel()
    return "".join(parts), answer.finish, answer.usage


async def stream(gateway: Gateway, handle, frames: SSEFrames, res: Resolved, stops: list[str], include_usage: bool,
                 t0: float, endpoint: str, tools_family=None):
    """Server-sent events; on disconnect Starlette cancels us and we cancel the handle. A failure after the first
    chunk is an error event in OpenAI's shape, then `[DONE]`.

    With `tools_family` the text is held until the answer is complete (a call is only known once its closing
    marker arrives), then sent as content and tool-call deltas in OpenAI's shape (per call: index, id, type and
    name, then its arguments), finish_reason "tool_calls"."""
    answer = Answer(handle, stops)
    finished, first = False, True
    held: list[str] = []
    try:
        if frames.chat:
            yield frames.role()
        async for text in answer.texts():
            if first:
                gateway.metrics.ttft.observe(time.monotonic() - t0, endpoint)
                first = False
            if tools_family is not None:
                held.append(text)
            else:
                yield frames.delta(text)
        finish = answer.finish or "stop"
        if tools_family is not None:
            content, calls = tool_calls_of("".join(held), tools_family)
            if content:
                yield frames.delta(content)
            for d in tool_call_deltas(calls):
                yield frames.delta(None, extra=d)
            finish = _tool_finish(finish, calls)
        yield frames.delta(None, finish)
        if include_usage:
            yield frames.usage(answer.usage)
        yield frames.DONE
        finished = True
        gateway.account(res, answer.usage, t0, endpoint)
    except GENERATION_ERRORS as e:
        yield frames.error(gateway.failed(e))
        yield frames.DONE
        finished = True
    finally:
        if not finished:
            handle.cancel()
