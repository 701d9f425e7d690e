"""OpenAI's wire format, as the gateway speaks it: request bodies, error bodies, response and SSE chunk shapes, the
`stop` matcher, and the checks that turn a hostile body into a 400 in OpenAI's error shape.

Nothing here knows about tenants, routes or backends (that is `gateway.py`), or about the event loop and the HTTP
server (`asgi.py`, `server.py`); `completions.py` strings these pieces into the one generation path.

Errors: every refusal is an `HTTPError`, answered as `{"error": {"message", "type", "param", "code"}}`; no message
is longer than `MAX_MESSAGE_CHARS` and none repeats more than `ECHO_CHARS` of what the client sent (`clip`).
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gemtune.errors import UserError
from gemtune.serve.backends import Gen

DEFAULT_MAX_TOKENS = 256
MAX_JSON_DEPTH = 32  # nesting levels of a request body (the deepest real request has 5)
ECHO_CHARS = 64  # at most this much of any value the client sent is repeated in an error
MAX_MESSAGE_CHARS = 1000
MIN_TEMPERATURE = 1e-5  # a temperature below this is greedy (vLLM's rule): dividing logits by 1e-50 gives infinities
INT64 = (-(2**63), 2**63 - 1)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


# ------------------------------------------------------------------------------------------------------ errors
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
        self.type = type_ or ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


def validation_error(errors: list) -> HTTPError:
    """Pydantic/FastAPI validation errors → one 400 naming the first field (clipped: keys are client input)."""
    first = errors[0] if errors else {}
    loc = [x for x in first.get("loc", ()) if x != "body"]
    path = ".".join(clip(x, 40).strip("'") if isinstance(x, str) else str(x) for x in loc) or None
    return HTTPError(400, f"invalid request: {path or 'body'}: {first.get('msg', 'invalid')}", param=path)


def generation_failed(e: Exception) -> HTTPError:
    """A request that failed while generating. The engine's `RequestFailed` says whose fault: `sampling` or
    `numerics` failed this request alone (500: the server could not compute *this* answer; others were served),
    `engine` failed the shared step (503: the engine is in trouble, retry). A backend that is down is 503 too."""
    reason = getattr(e, "reason", None)
    detail = str(e).removeprefix("generation failed: ")
    if reason in ("sampling", "numerics"):
        return HTTPError(500, f"generation failed for this request ({reason}): {detail}; other requests are "
                              "unaffected")
    return HTTPError(503, f"the engine failed: {detail}")


# ----------------------------------------------------------------------------------------------- request bodies
class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("schema", min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema", description="a JSON Schema; the answer is decoded under it")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class GenBody(BaseModel):
    """What chat and completion requests share: the model and the sampling parameters."""

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
    response_format: Optional[ResponseFormat] = Field(None, description="text, json_object (any JSON object) or "
                                                      "json_schema (decoded under the schema)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="only `text` is supported")
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    tool_calls: Optional[list[dict]] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None


class ChatBody(GenBody):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "base", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
        {"model": "base", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 64,
         "response_format": {"type": "json_schema", "json_schema": {"name": "greeting", "schema": {
             "type": "object", "properties": {"greeting": {"type": "string", "maxLength": 20}},
             "required": ["greeting"]}}}}]})

    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[dict]] = Field(None, description="OpenAI function tools, rendered into the prompt")
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict]] = Field(
        None, description='"none", "auto" (default with tools), "required", or {"type": "function", "function": '
        '{"name"}}; required and named decode under a grammar of the call')
    parallel_tool_calls: Optional[bool] = None


class CompletionBody(GenBody):
    prompt: Union[Annotated[str, Field(min_length=1)], Annotated[list[str], Field(min_length=1, max_length=1)],
                  Annotated[list[int], Field(min_length=1)]] = Field(
        description="one string, or a list of token ids (batched prompts are not supported)")
    echo: bool = False
    suffix: Optional[str] = None


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
    """`openapi_extra` describing a JSON body that the handler reads itself (`asgi.read_body`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline_schema(model)}}}}


def openapi_errors(schema: dict) -> dict:
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


# ------------------------------------------------------------------------------------------------- JSON checks
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


# ------------------------------------------------------------------------------------------- prompts, sampling
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
        content = m.get("content")
        if content is None and (m.get("tool_calls") or m.get("role") == "tool"):
            content = ""
        msg = {"role": m.get("role"), "content": _content_text(content, f"messages[{i}]")}
        for key in ("tool_calls", "tool_call_id", "name"):
            if m.get(key) is not None:
                msg[key] = m[key]
        msgs.append(msg)
    return msgs


def check_prompt_chars(n_chars: int, limit: int | None, param: str) -> None:
    if limit is not None and n_chars > limit:
        raise HTTPError(400, f"{param} is {n_chars} characters, more than can fit the context (at most {limit} "
                             "characters); shorten it", param=param)


def chat_prompt_ids(backend, messages: list, tools: list | None = None) -> list[int]:
    """Validate and render chat messages (and tool definitions) with the base's template (tokenises: call it off
    the event loop)."""
    from gemtune.base.templates import render_prompt, validate_messages

    msgs = chat_messages(messages)
    try:
        validate_messages(msgs, require_final_assistant=False, tools=tools)
        if msgs[-1]["role"] not in ("user", "tool"):
            raise UserError("the last message must be the user's (or a tool result)", field="messages")
        return render_prompt(msgs, backend.tokenizer, backend.family, tools=tools).input_ids
    except UserError as e:
        raise HTTPError(400, str(e), param=e.field if e.field and e.field != "messages" else "messages") from None


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


def gen_params(body: GenBody, adapter: str | None, tenant: str | None = None) -> Gen:
    """The body's sampling parameters as a backend `Gen` (prompt ids are filled in once tokenised)."""
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
    from gemtune.serve.structured import response_format_grammar

    try:
        grammar = response_format_grammar(body.response_format)
    except UserError as e:
        raise HTTPError(400, str(e), param=e.field) from None
    return Gen(prompt_ids=[], adapter=adapter, max_tokens=max_tokens, temperature=t,
               top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos, tenant=tenant, grammar=grammar)


def stop_strings(body: GenBody) -> list[str]:
    if body.stop is None:
        return []
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise HTTPError(400, "stop must be up to 4 non-empty strings", param="stop")
    return stops


class StopMatcher:
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


# -------------------------------------------------------------------------------------------------- responses
def new_usage() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def completion_response(rid: str, model: str, text: str | None, finish: str | None, usage: dict, *, chat: bool,
                        tool_calls: list | None = None) -> dict:
    """A whole (non-streamed) answer: `chat.completion` (with `tool_calls` when the answer made some) or
    `text_completion`."""
    if chat:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


class SSEFrames:
    """Server-sent events in OpenAI's chunk shape for one streamed answer (`chat.completion.chunk` for chat,
    `text_completion` chunks for completions); every frame is `data: <json>\\n\\n`, the last `data: [DONE]`."""

    DONE = "data: [DONE]\n\n"

    def __init__(self, rid: str, model: str, *, chat: bool):
        self.rid, self.model, self.chat = rid, model, chat
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    @staticmethod
    def frame(obj: dict) -> str:
        return "data: " + json.dumps(obj) + "\n\n"

    def _chunk(self, choices: list, **extra) -> str:
        return self.frame({"id": self.rid, "object": self.object, "created": self.created, "model": self.model,
                           "choices": choices, **extra})

    def role(self) -> str:
        """The first chat chunk: the assistant's role, no text yet."""
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta(self, text: str | None, finish: str | None = None, *, extra: dict | None = None) -> str:
        if self.chat:
            d = {"content": text} if text else {}
            ch = {"index": 0, "delta": {**d, **(extra or {})}, "finish_reason": finish}
        else:
            ch = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._chunk([ch])

    def usage(self, usage: dict) -> str:
        return self._chunk([], usage=usage)

    def error(self, err: HTTPError) -> str:
        """A failure after the 200 and the first chunks went out: an error event in OpenAI's shape."""
        return self.frame(err.body())
