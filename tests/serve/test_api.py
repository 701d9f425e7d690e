"""Acceptance of the serving gateway: a real uvicorn server on 127.0.0.1 over the real embedded engine (tiny model).

Two tenants, three adapter versions with distinguishable greedy outputs: isolation (list + use), 401 without a key,
pinned versions differ, promote then rollback changes what the alias serves within 2 s without a restart, bad names
answer 4xx, /metrics has gemtune_ series; plus streaming, hot load, corrupt adapters, 429, disconnects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import httpx
import pytest

from gemtune.registry.routes import RouteTable
from gemtune.registry.store import Registry
from gemtune.registry.synthetic import make_random_adapters

ADMIN = "admin-key-0123456789abcdef"
ACME = "acme-key-0123456789abcdef"
GLOBEX = "globex-key-0123456789abcdef"
MSG = [{"role": "user", "content": "hello there"}]


def _cli(*args) -> int:
    from gemtune.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def setup(tiny_gemma3, tmp_path_factory):
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.commands import build_gateway

    d = tmp_path_factory.mktemp("serve")
    srcs = make_random_adapters(tiny_gemma3, [d / "src1", d / "src2", d / "src3", d / "src4"], r=8, scale=4.0,
                                seeds=[11, 22, 33, 44])
    root = d / "registry"
    reg = Registry(root)
    reg.push("acme-support", srcs[0])
    reg.push("acme-support", srcs[1])
    reg.push("globex-router", srcs[2])
    RouteTable(reg).promote("acme-support", "v1")
    RouteTable(reg).promote("globex-router", "v1")
    tenants = d / "tenants.yaml"
    tenants.write_text(
        f"admin_key: {ADMIN}\n"
        "tenants:\n"
        f"  acme: {{api_key: {ACME}, adapters: ['acme-*']}}\n"
        f"  globex:\n    api_key_sha256: {__import__('hashlib').sha256(GLOBEX.encode()).hexdigest()}\n"
        "    adapters: [globex-router, base]\n")
    gw = build_gateway(str(root), tenants=str(tenants), base=str(tiny_gemma3), max_model_len=256, max_batch=8,
                       max_queue=64, poll_s=0.1)
    server = ServerThread(create_app(gw)).start()
    client = httpx.Client(base_url=server.url, timeout=60)
    yield {"url": server.url, "client": client, "root": root, "reg": reg, "gw": gw, "srcs": srcs, "dir": d}
    client.close()
    server.stop()


def _chat(client, key, model, *, user=None, max_tokens=12, **kw):
    body = {"model": model, "messages": MSG, "max_tokens": max_tokens, "temperature": 0, **kw}
    if user:
        body["user"] = user
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"} if key else {})


def _text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_no_key_or_wrong_key_is_401(setup):
    c = setup["client"]
    r = c.post("/v1/chat/completions", json={"model": "acme-support", "messages": MSG})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert _chat(c, "wrong-key-0123456789abcdef", "acme-support").status_code == 401
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"x-api-key": ACME}).status_code == 200


def test_tenants_list_only_their_own_adapters(setup):
    c = setup["client"]
    acme = {m["id"] for m in c.get("/v1/models", headers={"Authorization": f"Bearer {ACME}"}).json()["data"]}
    globex = {m["id"] for m in c.get("/v1/models", headers={"Authorization": f"Bearer {GLOBEX}"}).json()["data"]}
    assert {"acme-support", "acme-support@v1", "acme-support@v2"} <= acme
    assert not any(m.startswith("globex") for m in acme) and "base" not in acme
    assert globex == {"base", "globex-router", "globex-router@v1"}


def test_foreign_adapter_is_404_exactly_like_a_missing_one(setup):
    c = setup["client"]
    foreign = _chat(c, ACME, "globex-router")
    missing = _chat(c, ACME, "acme-nothing")
    assert foreign.status_code == missing.status_code == 404
    assert "does not exist or you do not have access" in foreign.json()["error"]["message"]
    assert _chat(c, ACME, "globex-router@v1").status_code == 404
    assert _chat(c, ACME, "base").status_code == 404  # acme did not list base
    assert _chat(c, GLOBEX, "acme-support@v2").status_code == 404
    assert _chat(c, GLOBEX, "base").status_code == 200
    assert _chat(c, ADMIN, "globex-router").status_code == 200  # the admin key may use everything


def test_pinned_versions_differ_and_responses_name_the_version(setup):
    c = setup["client"]
    r1, r2 = _chat(c, ACME, "acme-support@v1"), _chat(c, ACME, "acme-support@v2")
    t1, t2 = _text(r1), _text(r2)
    assert t1 != t2
    assert r1.json()["model"] == "acme-support@v1" and r1.headers["x-gemtune-adapter"] == "acme-support@v1"
    assert r2.json()["model"] == "acme-support@v2"
    base = _text(_chat(c, GLOBEX, "base"))
    assert base not in (t1, t2)
    # greedy is deterministic, and the alias serves exactly what its version serves
    alias = _chat(c, ACME, "acme-support")
    assert _text(alias) == t1 and alias.headers["x-gemtune-route"] == "acme-support@prod"
    assert alias.json()["model"] == "acme-support@v1"
    u = r1.json()["usage"]
    assert u["prompt_tokens"] > 0 and 0 < u["completion_tokens"] <= 12
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def _wait_alias(c, want: str, timeout: float = 2.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _chat(c, ACME, "acme-support", max_tokens=1).json()["model"] == want:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"alias did not switch to {want} within {timeout} s")


def test_cli_promote_then_rollback_changes_alias_within_2s(setup):
    c, root = setup["client"], str(setup["root"])
    assert _chat(c, ACME, "acme-support").json()["model"] == "acme-support@v1"
    assert _cli("registry", "--root", root, "promote", "acme-support", "v2") == 0
    _wait_alias(c, "acme-support@v2")
    v2_text = _text(_chat(c, ACME, "acme-support"))
    assert v2_text == _text(_chat(c, ACME, "acme-support@v2"))
    assert _cli("registry", "--root", root, "rollback", "acme-support") == 0
    _wait_alias(c, "acme-support@v1")


def test_admin_routes_promote_split_rollback(setup):
    c = setup["client"]
    h = {"Authorization": f"Bearer {ADMIN}"}
    assert c.post("/admin/routes/promote", json={"name": "acme-support", "version": "v2"},
                  headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    assert c.post("/admin/routes/promote", json={"name": "acme-support", "version": "v2"}).status_code == 401
    r = c.post("/admin/routes/promote", json={"name": "acme-support", "version": "v2"}, headers=h)
    assert r.status_code == 200 and r.json()["weights"] == {"v2": 100}
    assert _chat(c, ACME, "acme-support").json()["model"] == "acme-support@v2"  # admin changes are immediate
    r = c.post("/admin/routes/split", json={"name": "acme-support", "weights": {"v1": 50, "v2": 50}}, headers=h)
    assert r.status_code == 200
    served = {u: _chat(c, ACME, "acme-support", user=u, max_tokens=1).json()["model"] for u in map(str, range(24))}
    assert set(served.values()) == {"acme-support@v1", "acme-support@v2"}
    again = {u: _chat(c, ACME, "acme-support", user=u, max_tokens=1).json()["model"] for u in list(served)[:8]}
    assert all(again[u] == served[u] for u in again)  # sticky per user
    assert c.post("/admin/routes/rollback", json={"name": "acme-support"}, headers=h).json()["weights"] == {"v2": 100}
    assert c.post("/admin/routes/rollback", json={"name": "acme-support"}, headers=h).json()["weights"] == {"v1": 100}
    assert c.post("/admin/routes/promote", json={"name": "acme-support", "version": "v9"}, headers=h).status_code == 404
    assert c.post("/admin/routes/split", json={"name": "acme-support", "weights": {"v1": -1}},
                  headers=h).status_code == 400
    assert c.post("/admin/routes/promote", json={"name": "../x", "version": "v1"}, headers=h).status_code == 400


@pytest.mark.parametrize("model,status", [
    ("../x", 400), ("a@b@c", 400), ("", 400), ("Acme", 400), ("acme-support@", 400), ("acme-support@v9", 404),
    ("acme-support@canary", 404), ("acme-nothing", 404), ("acme-x@v1", 404), (123, 400),
])
def test_bad_model_names_are_4xx_never_5xx(setup, model, status):
    r = _chat(setup["client"], ACME, model)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == "model"


def test_malformed_requests_are_400(setup):
    c = setup["client"]
    h = {"Authorization": f"Bearer {ACME}"}
    assert c.post("/v1/chat/completions", json={"messages": MSG}, headers=h).status_code == 400
    assert c.post("/v1/chat/completions", content=b"{not json", headers=h).status_code == 400
    r = c.post("/v1/chat/completions", json={"model": "acme-support", "messages": [{"role": "robot", "content": "x"}]},
               headers=h)
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    assert _chat(c, ACME, "acme-support", n=2).status_code == 400
    assert _chat(c, ACME, "acme-support", temperature=-1).status_code == 400


def test_oversize_prompt_and_max_tokens_are_400_with_the_limit(setup):
    c = setup["client"]
    r = _chat(c, ACME, "acme-support", max_tokens=5000)
    assert r.status_code == 400 and "256" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={"model": "acme-support", "max_tokens": 4,
                                             "messages": [{"role": "user", "content": "x" * 600}]},
               headers={"Authorization": f"Bearer {ACME}"})
    assert r.status_code == 400 and "limit is 255" in r.json()["error"]["message"]


def test_streaming_matches_non_streaming(setup):
    c = setup["client"]
    want = _text(_chat(c, ACME, "acme-support@v2", max_tokens=16))
    body = {"model": "acme-support@v2", "messages": MSG, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = []
    with c.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ACME}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-gemtune-adapter"] == "acme-support@v2"
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    objs = [json.loads(x) for x in chunks[:-1]]
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(o["choices"][0]["delta"].get("content", "") for o in objs if o["choices"])
    assert text == want
    assert all(o["model"] == "acme-support@v2" for o in objs)
    assert [o for o in objs if o["choices"] and o["choices"][0]["finish_reason"]]
    assert objs[-1]["usage"]["completion_tokens"] > 0


def test_completions_endpoint_and_stop_strings(setup):
    c = setup["client"]
    h = {"Authorization": f"Bearer {GLOBEX}"}
    r = c.post("/v1/completions", json={"model": "globex-router", "prompt": "abc", "max_tokens": 10,
                                        "temperature": 0}, headers=h)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    full = r.json()["choices"][0]["text"]
    assert r.json()["model"] == "globex-router@v1"
    if len(full) >= 4:
        stop = full[2:4]
        r2 = c.post("/v1/completions", json={"model": "globex-router", "prompt": "abc", "max_tokens": 10,
                                             "temperature": 0, "stop": stop}, headers=h)
        cut = r2.json()["choices"][0]
        assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


def test_metrics_have_gemtune_series(setup):
    c = setup["client"]
    _chat(c, ACME, "acme-support@v1")
    assert c.get("/metrics", headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    r = c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    body = r.text
    for series in ("gemtune_requests_total", "gemtune_request_latency_seconds_bucket",
                   "gemtune_completion_tokens_total", "gemtune_adapter_requests_total", "gemtune_queue_depth",
                   "gemtune_loaded_adapters"):
        assert re.search(rf"^{series}[{{ ]", body, re.M), series
    m = re.search(r'^gemtune_adapter_requests_total\{adapter="acme-support@v1"\} (\d+)', body, re.M)
    assert m and int(m.group(1)) >= 1
    assert re.search(r'^gemtune_requests_total\{endpoint="/v1/chat/completions",status="401"\} [1-9]', body, re.M)
    assert c.get("/healthz").json()["status"] == "ok"


def test_hot_load_pushes_and_loads_without_restart(setup):
    c = setup["client"]
    h = {"Authorization": f"Bearer {ADMIN}"}
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "acme-support", "lora_path": str(setup["srcs"][3])},
                  headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "acme-support", "lora_path": str(setup["srcs"][3])},
               headers=h)
    assert r.status_code == 200, r.text
    ref = r.json()["model"]
    assert re.fullmatch(r"acme-support@v\d+", ref)
    assert ref in setup["gw"].backend.loaded()
    assert ref in {m["id"] for m in c.get("/v1/models", headers={"Authorization": f"Bearer {ACME}"}).json()["data"]}
    assert _chat(c, ACME, ref).json()["model"] == ref
    r = c.post("/v1/unload_lora_adapter", json={"lora_name": ref}, headers=h)
    assert r.status_code == 200 and ref not in setup["gw"].backend.loaded()
    assert _chat(c, ACME, ref).status_code == 200  # loaded again on demand
    bad = setup["dir"] / "dora"
    shutil.copytree(setup["srcs"][0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "acme-support", "lora_path": str(bad)}, headers=h)
    assert r.status_code == 400 and "DoRA" in r.json()["error"]["message"]
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "acme-support@v99"}, headers=h).status_code == 404
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "nope@v1"}, headers=h).status_code == 404


def test_corrupt_version_is_refused_and_alias_keeps_serving(setup):
    c, reg = setup["client"], setup["reg"]
    h = {"Authorization": f"Bearer {ADMIN}"}
    vi = reg.push("acme-support", setup["srcs"][2])
    w = vi.path / "adapter_model.safetensors"
    os.chmod(w, 0o644)
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x55
    w.write_bytes(bytes(data))
    before = _chat(c, ACME, "acme-support").json()["model"]
    r = c.post("/admin/routes/promote", json={"name": "acme-support", "version": vi.version}, headers=h)
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"]
    pinned = _chat(c, ACME, vi.ref)
    assert pinned.status_code == 409 and "sha256" in pinned.json()["error"]["message"]
    # a hand-edit of routes.json that points prod at the corrupt version is refused by the server too
    routes = json.loads(reg.routes_path.read_text())
    routes["routes"]["acme-support"]["prod"]["weights"] = {vi.version: 100}
    from gemtune.utils import atomic_write_json
    atomic_write_json(reg.routes_path, routes)
    time.sleep(0.6)
    assert _chat(c, ACME, "acme-support").json()["model"] == before
    metrics = c.get("/metrics", headers=h).text
    assert re.search(r'^gemtune_route_rejections_total\{name="acme-support",alias="prod"\} [1-9]', metrics, re.M)
    RouteTable(reg).promote("acme-support", before.split("@")[1])  # restore a clean file for later tests


def test_client_disconnect_cancels_the_request(setup):
    gw = setup["gw"]
    before = gw.backend.stats()["requests_finished"].get("cancelled", 0)
    body = {"model": "acme-support@v1", "messages": MSG, "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=setup["url"], timeout=30) as c2:
        with c2.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ACME}"}) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break  # got a token; now walk away
    deadline = time.monotonic() + 10
    while gw.backend.stats()["requests_finished"].get("cancelled", 0) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.backend.stats()["requests_finished"].get("cancelled", 0) > before


def test_client_disconnect_cancels_a_non_streamed_request(setup):
    gw = setup["gw"]
    before = gw.backend.stats()["requests_finished"].get("cancelled", 0)
    with httpx.Client(base_url=setup["url"], timeout=httpx.Timeout(60, read=0.05)) as c2:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            _chat(c2, ACME, "acme-support@v1", max_tokens=200, ignore_eos=True)
    deadline = time.monotonic() + 10
    while gw.backend.stats()["requests_finished"].get("cancelled", 0) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.backend.stats()["requests_finished"].get("cancelled", 0) > before


def test_overload_answers_429_with_retry_after(tiny_gemma3, tmp_path, setup):
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.commands import build_gateway

    shutil.copytree(setup["root"], tmp_path / "reg", ignore=shutil.ignore_patterns(".registry.lock"))
    gw = build_gateway(str(tmp_path / "reg"), base=str(tiny_gemma3), max_model_len=512, max_batch=1, max_queue=1)
    with ServerThread(create_app(gw)) as server:
        statuses, retry = [], []

        def one():
            with httpx.Client(base_url=server.url, timeout=60) as c:
                r = _chat(c, "", "acme-support@v1", max_tokens=300, ignore_eos=True)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    retry.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1
    assert set(statuses) <= {200, 429}
    assert all(r and int(r) >= 1 for r in retry)


def test_open_mode_without_tenants_refuses_public_bind(tmp_path):
    assert _cli("serve", "--registry", str(tmp_path / "r"), "--host", "0.0.0.0") == 2


def test_vllm_engine_with_unreachable_url_exits_2(tmp_path, tiny_gemma3):
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()  # nothing listens there
    assert _cli("serve", "--registry", str(tmp_path / "r"), "--base", str(tiny_gemma3), "--engine", "vllm",
                "--vllm-url", url) == 2
    assert _cli("serve", "--registry", str(tmp_path / "r"), "--base", str(tiny_gemma3), "--engine", "vllm") == 2
    assert _cli("serve", "--registry", str(tmp_path / "r"), "--base", str(tiny_gemma3), "--engine", "tgi") == 2


def test_print_vllm_command(setup, tiny_gemma3, capsys):
    assert _cli("serve", "--registry", str(setup["root"]), "--base", str(tiny_gemma3), "--print-vllm-command") == 0
    out = capsys.readouterr().out
    assert "vllm serve" in out and "--enable-lora" in out and "--max-lora-rank 8" in out
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in out


def test_gemma4_base_serves_through_the_gateway(tiny_gemma4, tmp_path):
    """The gateway renders prompts with the base's own family template (Gemma 4 turns here)."""
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.commands import build_gateway

    src = make_random_adapters(tiny_gemma4, [tmp_path / "a"], r=8, scale=4.0, seeds=[7])[0]
    reg = Registry(tmp_path / "reg")
    reg.push("g4", src)
    RouteTable(reg).promote("g4", "v1")
    gw = build_gateway(str(tmp_path / "reg"), base=str(tiny_gemma4), max_model_len=256)
    assert gw.backend.family.name == "gemma4"
    with ServerThread(create_app(gw)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        a = c.post("/v1/chat/completions", json={"model": "g4", "messages": MSG, "max_tokens": 8, "temperature": 0})
        b = c.post("/v1/chat/completions", json={"model": "base", "messages": MSG, "max_tokens": 8, "temperature": 0})
    assert a.status_code == b.status_code == 200
    assert a.json()["model"] == "g4@v1" and a.json()["usage"]["completion_tokens"] >= 1
    assert a.json()["choices"][0]["message"]["content"] != b.json()["choices"][0]["message"]["content"]


def test_embedded_engine_says_where_the_gpu_path_is(monkeypatch):
    import torch

    from gemtune.serve.commands import embedded_engine_note

    assert embedded_engine_note("embedded") is None  # this host has no GPU: nothing to say
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    note = embedded_engine_note("embedded")
    assert "runs on the CPU" in note and "H100" in note and "--engine vllm" in note
    assert embedded_engine_note("vllm") is None
