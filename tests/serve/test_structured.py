"""Structured outputs and tool calls (issue #15) on the real server over the embedded engine (tiny random Gemma 3).

The tiny model is random, so whatever it emits under a grammar is what the grammar alone guarantees: every
`json_schema` answer validates, `json_object` answers parse, required/named tool calls come back parsed with
arguments that validate against the tool's parameters. Free requests batched with constrained ones stay byte-identical
to the same requests run alone. The schemas are small (enums, bounded integers, short strings) so a random walk
through them ends well within max_tokens.

The tiny tokenizer here decodes by concatenating tokens (a `Fuse` decoder), as Gemma's real one does; the shared
tiny fixture's tokenizer joins tokens with spaces, which would turn valid JSON tokens into invalid JSON text.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from gemtune.registry.routes import RouteTable
from gemtune.registry.store import Registry
from gemtune.registry.synthetic import make_random_adapters

SCHEMA = {"type": "object",
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "size": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"},
                         "tag": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
          "required": ["color", "size", "ok", "tag"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
PROMPTS = ["hello there", "what is the weather", "describe a thing", "pick a colour", "tell me more",
           "one more time"]


@pytest.fixture(scope="module")
def server(tiny_fused, tmp_path_factory):
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    d = tmp_path_factory.mktemp("structured")
    srcs = make_random_adapters(tiny_fused, [d / "a", d / "b"], r=8, scale=4.0, seeds=[5, 6])
    reg = Registry(d / "registry")
    for name, src in zip(("alpha", "beta"), srcs):
        reg.push(name, src, require_verdict=False)
        RouteTable(reg).promote(name, "v1")
    gw = build_gateway(str(d / "registry"), base=str(tiny_fused), max_model_len=1024, max_batch=16, max_queue=64)
    srv = ServerThread(create_app(gw)).start()
    client = httpx.Client(base_url=srv.url, timeout=120)
    gw.backend.engine.load_adapter("alpha@v1", reg.verify("alpha", "v1").path)  # for the engine-level tests
    yield {"client": client, "gw": gw, "engine": gw.backend.engine}
    client.close()
    srv.stop()


def _chat(c, model="alpha", prompt=PROMPTS[0], **kw):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 120,
            "temperature": 0, **kw}
    return c.post("/v1/chat/completions", json=body)


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _wait_no_states(engine, what: str) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = engine.stats()
        if st["grammar_states"] == 0 and st["running"] == 0 and st["queue_depth"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: grammar states left: {engine.stats()['grammar_states']}")


# ------------------------------------------------------------------------------------------------ json_schema
def test_json_schema_outputs_validate_in_mixed_batches_and_free_rows_are_unchanged(server):
    c = server["client"]
    free = [dict(model=m, prompt=p, max_tokens=24) for m in ("alpha", "beta") for p in PROMPTS[:3]]
    alone = [_ok(_chat(c, **kw))["message"]["content"] for kw in free]
    constrained = [dict(model=m, prompt=p, response_format=FORMAT, temperature=t, seed=k)
                   for k, (m, p, t) in enumerate([(m, p, t) for m in ("alpha", "beta", "base")
                                                  for p in PROMPTS[:4] for t in (0, 1.0)])]
    jobs = [("free", kw) for kw in free] + [("constrained", kw) for kw in constrained]
    jobs = jobs[::2] + jobs[1::2]  # interleave
    with ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(lambda j: (j[0], j[1], _ok(_chat(c, **j[1]))), jobs))
    got_free = {}
    for kind, kw, ch in answers:
        if kind == "free":
            got_free[(kw["model"], kw["prompt"])] = ch["message"]["content"]
            continue
        assert ch["finish_reason"] == "stop", ch
        jsonschema.validate(json.loads(ch["message"]["content"]), SCHEMA)
    assert [got_free[(kw["model"], kw["prompt"])] for kw in free] == alone
    # the free answers are not JSON by accident: the grammar did the work
    assert not all(_is_json(t) for t in alone)
    _wait_no_states(server["engine"], "after the mixed batch")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_constrained_and_free_rows_share_steps_in_the_engine(server):
    """Submitted together (the engine's lock held, so one admission pass sees them all): the free rows' tokens equal
    the same requests alone, while constrained rows decode in the same steps."""
    from gemtune.serve.engine import GenRequest
    from gemtune.serve.engine_stream import GrammarSpec
    from gemtune.serve.structured import check_schema

    eng = server["engine"]
    tok = eng.tokenizer
    prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    spec = GrammarSpec("json_schema", check_schema(SCHEMA), "response_format.json_schema.schema")
    alone = [eng.submit(GenRequest(p, "alpha@v1", 30)).result(timeout=120)[1] for p in prompts[:3]]
    before = len(eng.step_log)
    with eng._cv:
        free = [eng.submit(GenRequest(p, "alpha@v1", 30)) for p in prompts[:3]]
        cons = [eng.submit(GenRequest(p, a, 120, temperature=t, seed=3, grammar=spec))
                for p in prompts for a, t in (("alpha@v1", 0.0), (None, 0.7))]
    assert [h.result(timeout=120)[1] for h in free] == alone
    for h in cons:
        text, _, reason = h.result(timeout=120)
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    steps = list(eng.step_log)[before:]
    assert max(d for d, _, _ in steps) >= len(free) + 1  # free and constrained rows decoded together
    assert eng.stats()["grammar_states"] == 0


def test_completions_endpoint_takes_response_format(server):
    c = server["client"]
    r = c.post("/v1/completions", json={"model": "beta", "prompt": "a thing:", "max_tokens": 120, "temperature": 0,
                                        "response_format": FORMAT})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)


def test_json_object_is_valid_json(server):
    c = server["client"]
    for m, p in (("alpha", PROMPTS[0]), ("beta", PROMPTS[1]), ("base", PROMPTS[2])):
        ch = _ok(_chat(c, model=m, prompt=p, max_tokens=300, response_format={"type": "json_object"}))
        assert ch["finish_reason"] == "stop", ch
        assert isinstance(json.loads(ch["message"]["content"]), dict)


def test_text_response_format_is_free_decoding(server):
    c = server["client"]
    assert _ok(_chat(c, max_tokens=16, response_format={"type": "text"})) == _ok(_chat(c, max_tokens=16))


# ------------------------------------------------------------------------------------------------------ tools
def _check_calls(ch: dict, tools: list, name: str | None = None) -> list:
    assert ch["finish_reason"] == "tool_calls", ch
    calls = ch["message"]["tool_calls"]
    assert calls, ch
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert set(call) == {"id", "type", "function"} and call["type"] == "function"
        assert call["id"].startswith("call_")
        assert isinstance(call["function"]["arguments"], str)
        if name:
            assert call["function"]["name"] == name
        jsonschema.validate(json.loads(call["function"]["arguments"]), params[call["function"]["name"]])
    return calls


def test_tool_choice_required_and_named_return_parsed_tool_calls(server):
    c = server["client"]
    tools = [WEATHER, TIME]
    for m, p in (("alpha", PROMPTS[1]), ("base", PROMPTS[0])):
        _check_calls(_ok(_chat(c, model=m, prompt=p, tools=tools, tool_choice="required")), tools)
        named = {"type": "function", "function": {"name": "get_time"}}
        _check_calls(_ok(_chat(c, model=m, prompt=p, tools=tools, tool_choice=named)), tools, "get_time")


def test_tool_calls_stream_as_openai_deltas(server):
    c = server["client"]
    body = {"model": "beta", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 120,
            "temperature": 0, "stream": True, "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    chunks = []
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    first = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert first["index"] == 0 and first["type"] == "function" and first["function"]["name"] == "get_weather"
    args = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in deltas if "tool_calls" in d)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = _ok(_chat(c, model="beta", prompt=PROMPTS[1], tools=[WEATHER], tool_choice=body["tool_choice"]))
    assert json.loads(whole["message"]["tool_calls"][0]["function"]["arguments"]) == json.loads(args)


def test_tool_conversation_with_results_renders_and_answers(server):
    c = server["client"]
    msgs = [{"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}]
    r = c.post("/v1/chat/completions", json={"model": "alpha", "messages": msgs, "tools": [WEATHER],
                                             "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_tool_errors_are_400_naming_the_field(server):
    c = server["client"]
    r = _chat(c, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name", r.text
    r = _chat(c, tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    r = _chat(c, tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools"), r.text


# --------------------------------------------------------------------------------------------- bad schemas, cost
@pytest.mark.parametrize("schema, why", [
    ({"type": "objectx"}, "invalid JSON Schema"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "cannot be compiled"),
    ({"type": "string", "minLength": "three"}, "invalid JSON Schema"),
])
def test_bad_schema_is_400_naming_the_field(server, schema, why):
    r = _chat(server["client"], response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                       "schema": schema}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and why in err["message"], err


def test_schema_size_and_shape_limits(server):
    c = server["client"]
    big = {"type": "object", "properties": {f"k{i:05d}": {"type": "string"} for i in range(2000)}}
    r = _chat(c, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": big}})
    assert r.status_code == 400 and "at most" in r.json()["error"]["message"], r.text
    r = _chat(c, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema", r.text
    r = _chat(c, response_format={"type": "xml"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type", r.text


def test_slow_compile_is_refused_and_stalls_nobody(server):
    """A compile that does not finish in time is a 400 for its request; other requests are served meanwhile.
    The compile is held on an event (not timed): it cannot finish before the limit, whatever the machine's speed."""
    backend, c = server["gw"].backend, server["client"]
    grammars = backend.engine.grammars
    release, entered = threading.Event(), threading.Event()
    real = grammars.compile

    def held(spec):
        entered.set()
        release.wait(120)
        return real(spec)

    old_timeout = backend.compile_timeout_s
    grammars.compile, backend.compile_timeout_s = held, 1.0
    try:
        schema = {"type": "object", "properties": {"slow": {"enum": [1, 2]}}, "required": ["slow"]}
        with ThreadPoolExecutor(1) as ex:
            slow = ex.submit(_chat, c, response_format={"type": "json_schema",
                                                        "json_schema": {"name": "s", "schema": schema}})
            assert entered.wait(60)
            assert _ok(_chat(c, max_tokens=4))["finish_reason"] in ("stop", "length")  # served while it compiles
            r = slow.result(timeout=120)
        assert r.status_code == 400, r.text
        assert "did not compile within" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "response_format.json_schema.schema"
    finally:
        release.set()
        grammars.compile, backend.compile_timeout_s = real, old_timeout


def test_compiled_grammars_are_cached_and_bounded(server):
    grammars = server["engine"].grammars
    c = server["client"]
    _ok(_chat(c, response_format=FORMAT))
    n = grammars.compiles
    _ok(_chat(c, response_format=FORMAT, prompt=PROMPTS[3]))
    assert grammars.compiles == n  # the same schema text compiles once
    from gemtune.serve.engine_stream import GrammarSpec
    from gemtune.serve.structured import check_schema

    old = grammars.cache_size
    grammars.cache_size = 2
    try:
        for k in range(4):
            grammars.compile(GrammarSpec("json_schema", check_schema({"enum": [k, k + 1]}), "f"))
        assert grammars.cached() == 2
    finally:
        grammars.cache_size = old


# ------------------------------------------------------------------------------------------------ state freed
def test_grammar_state_is_freed_on_cancel_and_disconnect(server):
    from gemtune.serve.engine import GenRequest
    from gemtune.serve.engine_stream import GrammarSpec
    from gemtune.serve.structured import check_schema

    eng = server["engine"]
    _wait_no_states(eng, "before")
    # a schema whose strings are long: the request is still decoding when cancelled
    spec = GrammarSpec("json_schema", check_schema({"type": "object", "properties": {"t": {"type": "string"}},
                                                    "required": ["t"]}), "f")
    prompt = eng.tokenizer(PROMPTS[0], add_special_tokens=True)["input_ids"]
    h = eng.submit(GenRequest(prompt, "alpha@v1", 400, temperature=1.0, seed=1, grammar=spec))
    assert eng.stats()["grammar_states"] == 1
    next(iter(h))  # it is running
    h.cancel()
    assert h.result(timeout=60)[2] in ("cancelled", "stop", "length")
    _wait_no_states(eng, "after cancel")
    # a queued request cancelled before it ran
    with eng._cv:
        h = eng.submit(GenRequest(prompt, None, 400, grammar=spec))
        assert eng.stats()["grammar_states"] == 1
        h.cancel()
    assert h.result(timeout=60)[2] == "cancelled"
    assert eng.stats()["grammar_states"] == 0
    # over HTTP: a streamed constrained request whose client goes away
    c = server["client"]
    body = {"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400,
            "temperature": 1.0, "seed": 2, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": json.loads(spec.schema)}}}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break
    _wait_no_states(eng, "after a disconnect")


@pytest.mark.parametrize("head", ["screened", "screened-masked", "fp32"])
def test_constrained_greedy_equals_the_masked_fp32_argmax(tiny_fused, head, monkeypatch):
    """The engine's constrained greedy tokens are the argmax of the fp32 logits over the tokens the grammar allows,
    whichever way it finds them (free argmax kept, few allowed ids computed exactly, masked bf16 screen, or the
    plain fp32 head): the eval's constrained decoder (HF forward + the same grammar) gives the same tokens."""
    from gemtune.base.loader import load_base
    from gemtune.evals.engine import make_generator
    from gemtune.serve.engine import Engine, GenRequest
    from gemtune.serve.engine_stream import GrammarSpec
    from gemtune.serve.structured import check_schema

    schemas = [SCHEMA, {"type": "object", "properties": {"t": {"type": "string", "maxLength": 30},
                                                        "n": {"type": "integer", "minimum": -5, "maximum": 5000}},
                                                   "required": ["t", "n"]}]
    if head == "screened-masked":  # every forbidden free argmax goes through the masked bf16 screen (as a row
        import gemtune.serve.engine_grammar as eg  # with many allowed tokens does at 262k)

        monkeypatch.setattr(eg, "EXPAND_WORDS", 0)
    with Engine(tiny_fused, max_model_len=512) as eng:
        if head == "fp32":
            eng.runner.screened_head = None
        elif eng.runner.screened_head is None:
            pytest.skip("this CPU has no native bf16: the engine runs the plain fp32 head only")
        prompts = [eng.tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
        jobs = [(p, schemas[k % 2]) for k, p in enumerate(prompts)]
        with eng._cv:
            hs = [eng.submit(GenRequest(p, None, 60, grammar=GrammarSpec("json_schema", check_schema(s), "f")))
                  for p, s in jobs]
        got = [h.result(timeout=120)[0] for h in hs]
    model, tok = load_base(tiny_fused)
    want = make_generator(model, tok, batch_size=3).generate_constrained([p for p, _ in jobs], [s for _, s in jobs], 60)
    assert got == want
    assert all(_is_json(t) for t in got)
