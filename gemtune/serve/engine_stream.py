"""Requests, events and handles of the serving engine: what callers of `Engine.submit` hold.

A `Handle` is filled by the engine's scheduler thread and read by anyone: `async for` from any asyncio loop (the
scheduler wakes the loop with `call_soon_threadsafe`, so no loop is tied to the engine), blocking iteration, or
`result()`. `Detokenizer` turns the growing token list into text deltas whose concatenation is exactly
`tokenizer.decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass


class QueueFull(Exception):
    """Too much work queued: answer 429 with Retry-After = `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(RuntimeError):
    """This one request failed inside the engine (its sampling or its numbers); other requests are unaffected.

    Raised from a Handle's iteration / `result()`. `reason` is "sampling" (the row's token could not be chosen),
    "numerics" (its activations became inf/NaN) or "engine" (the shared step itself failed: every running request
    gets it). A RuntimeError subclass, so callers that caught RuntimeError keep working.
    """

    def __init__(self, message: str, reason: str = "engine"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class GrammarSpec:
    """A request's output grammar, as text (hashable: the engine's compiled-grammar cache is keyed by it).

    kind: "json_schema" (`schema` is the JSON Schema's canonical JSON text), "json_object" (any JSON object;
    `schema` is "{}"), "tool_call" (`schema` is the JSON Schema of one call's `{"name", "arguments"}` object, and
    the call is wrapped in `open` ... `close`, the family's tool-call syntax), or "ebnf" (`schema` is a whole EBNF
    grammar: Gemma 4's calls, `g4_grammar`). `field` names the request field the
    grammar came from, for errors ("response_format.json_schema.schema", "tools").
    """

    kind: str
    schema: str
    field: str = "response_format"
    open: str = ""
    close: str = ""


@dataclass
class GenRequest:
    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: list[int] | None = None
    ignore_eos: bool = False
    tenant: str | None = None  # fair admission: round-robin across tenants; None = one shared bucket
    grammar: GrammarSpec | None = None  # constrained decoding (structured outputs); None = free


@dataclass
class TokenEvent:
    token_id: int | None
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


# ------------------------------------------------------------------------------------------------ detokenising
class Detokenizer:
    """Incremental text for a growing id list; holds back text while a multi-byte character is incomplete.

    Decodes a short window (as vLLM does) rather than the whole sequence each step; the final flush compares with
    the full decode so the concatenated deltas always equal `decode(ids)`.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids already turned into emitted text
        self.emitted = ""

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += delta
            return delta
        return ""

    def flush(self) -> str:
        full = self._decode(self.ids)
        if full.startswith(self.emitted):
            delta = full[len(self.emitted):]
        else:  # cannot happen with consistent tokenizers; keep the stream's own text
            delta = ""
        self.emitted += delta
        return delta


# ------------------------------------------------------------------------------------------------------- handle
class Handle:
    """A submitted request: iterate its TokenEvents (async or blocking), cancel it, or wait for the result."""

    def __init__(self, cancel):
        self._cancel_cb = cancel  # the engine's cancel for this request
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._events: list[TokenEvent] = []
        self._done = False
        self._error: BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._cursor = 0  # async iteration position
        self.finish_reason: str | None = None
        self.admitted: int | None = None  # the engine's admission counter when this request got a batch row

    # -- producer side (scheduler thread)
    def _push(self, ev: TokenEvent) -> None:
        with self._lock:
            self._events.append(ev)
            if ev.finish_reason is not None:
                self._done = True
                self.finish_reason = ev.finish_reason
            self._wake()

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            self._error, self._done = err, True
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # the consumer's loop is closed (client gone): nobody to wake
                pass

    # -- consumer side
    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop generating (client went away): the row is freed before the next step, a queued request at once."""
        self._cancel_cb()

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        while True:
            with self._lock:
                if self._cursor < len(self._events):
                    self._cursor += 1
                    return self._events[self._cursor - 1]
                if self._error is not None:
                    raise self._failure()
                if self._done:
                    raise StopAsyncIteration
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    def __iter__(self):
        i = 0
        while True:
            with self._lock:
                while i >= len(self._events) and not self._done:
                    self._cond.wait()
                if i < len(self._events):
                    ev = self._events[i]
                    i += 1
                elif self._error is not None:
                    raise self._failure()
                else:
                    return
            yield ev

    def _failure(self) -> RequestFailed:
        err = self._error
        reason = err.reason if isinstance(err, RequestFailed) else "engine"
        out = RequestFailed(f"generation failed: {err}", reason)
        out.__cause__ = err
        return out

    def result(self, timeout: float | None = None) -> tuple[str, list[int], str]:
        """Block until finished: (text, token_ids, finish_reason)."""
        with self._lock:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError("generation did not finish in time")
            if self._error is not None:
                raise self._failure()
            text = "".join(e.text for e in self._events)
            ids = [e.token_id for e in self._events if e.token_id is not None]
            return text, ids, self.finish_reason


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
