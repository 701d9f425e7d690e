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

from gemtune.errors import UserError
from gemtune.registry.routes import RouteTable, read_routes
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
    from gemtune.serve.gateway import build_gateway

    d = tmp_path_factory.mktemp("serve")
    srcs = make_random_adapters(tiny_gemma3, [d / "src1", d / "src2", d / "src3", d / "src4"], r=8, scale=4.0,
                                seeds=[11, 22, 33, 44])
    root = d / "registry"
    reg = Registry(root)
    reg.push("acme-support", srcs[0], require_verdict=False)
    reg.push("acme-support", srcs[1], require_verdict=False)
    reg.push("globex-router", srcs[2], require_verdict=False)
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
    assert _cli("registry", "--root", root, "promote", "acme-support", "v2") == 1  # v2 has no verdict vs v1
    assert _chat(c, ACME, "acme-support").json()["model"] == "acme-support@v1"
    assert _cli("registry", "--root", root, "promote", "acme-support", "v2", "--force") == 0
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
    # gated like the CLI: v2 has no passing verdict against v1, the alias's current version
    r = c.post("/admin/routes/promote", json={"name": "acme-support", "version": "v2"}, headers=h)
    assert r.status_code == 409 and "no passing eval verdict" in r.json()["error"]["message"], r.text
    r = c.post("/admin/routes/split", json={"name": "acme-support", "weights": {"v1": 50, "v2": 50}}, headers=h)
    assert r.status_code == 409
    assert _chat(c, ACME, "acme-support").json()["model"] == "acme-support@v1"  # unchanged
    r = c.post("/admin/routes/promote", json={"name": "acme-support", "version": "v2", "force": True}, headers=h)
    assert r.status_code == 200 and r.json()["weights"] == {"v2": 100}
    assert read_routes(setup["root"] / "routes.json")["routes"]["acme-support"]["prod"]["forced"] is True  # recorded
    assert _chat(c, ACME, "acme-support").json()["model"] == "acme-support@v2"  # admin changes are immediate
    r = c.post("/admin/routes/split", json={"name": "acme-support", "weights": {"v1": 50, "v2": 50}, "force": True},
               headers=h)
    assert r.status_code == 200
    served = {u: _chat(c, ACME, "acme-support", user=u, max_tokens=1).json()["model"] for u in map(str, range(24))}
    assert set(served.values()) == {"acme-support@v1", "acme-support@v2"}
    again = {u: _chat(c, ACME, "acme-support", user=u, max_tokens=1).json()["model"] for u in list(served)[:8]}
    assert all(again[u] == served[u] for u in again)  # sticky per user
    assert c.post("/admin/routes/rollback", json={"name": "acme-support"}, headers=h).json()["weights"] == {"v2": 100}
    assert c.post("/admin/routes/rollback", json={"name": "acme-support"}, headers=h).json()["weights"] == {"v1": 100}
    assert c.post("/admin/routes/promote", json={"name": "acme-support", "version": "v9"}, headers=h).status_code == 404
    assert c.post("/admin/routes/promote", json={"name": "acme-none", "version": "v1"}, headers=h).status_code == 404
    assert c.post("/admin/routes/rollback", json={"name": "acme-support", "alias": "nope"},
                  headers=h).status_code == 404  # the registry's NotFound, not its message, makes it a 404
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


def _passing_verdict(adapter_dir) -> None:
    """A passing eval verdict (contract C1) for the adapter's current weights, as `gemtune eval --record` writes."""
    from gemtune.adapter import update_sidecar, weights_sha256

    update_sidecar(adapter_dir, {"eval_verdicts": [{
        "adapter_sha256": weights_sha256(adapter_dir), "suite_sha256": "0" * 64, "baseline": "base",
        "baseline_id": "base:tiny", "passed": True, "regressed_share": 0.0, "gate": 0.02}]})


def test_hot_load_pushes_and_loads_without_restart(setup):
    c = setup["client"]
    h = {"Authorization": f"Bearer {ADMIN}"}
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "acme-support", "lora_path": str(setup["srcs"][3])},
                  headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "acme-support", "lora_path": str(setup["srcs"][3])},
               headers=h)
    assert r.status_code == 400 and "no eval verdict" in r.json()["error"]["message"]  # an unevaluated adapter
    _passing_verdict(setup["srcs"][3])
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
    vi = reg.push("acme-support", setup["srcs"][2], require_verdict=False)
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
    # prometheus_client writes labels in name order
    assert re.search(r'^gemtune_route_rejections_total\{alias="prod",name="acme-support"\} [1-9]', metrics, re.M)
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
    from gemtune.serve.gateway import build_gateway

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
    assert "--gpu-memory-utilization" not in out  # vLLM's own default unless asked
    assert _cli("serve", "--registry", str(setup["root"]), "--base", str(tiny_gemma3), "--print-vllm-command",
                "--gpu-memory-utilization", "0.35") == 0
    assert "--gpu-memory-utilization 0.35" in capsys.readouterr().out
    for bad in ("0", "1.5", "-0.2"):
        assert _cli("serve", "--registry", str(setup["root"]), "--base", str(tiny_gemma3), "--print-vllm-command",
                    "--gpu-memory-utilization", bad) == 2
        assert 'field "gpu_memory_utilization"' in capsys.readouterr().err
    # a flag that would do nothing is refused: the embedded engine, or a vLLM server gemtune did not start
    for engine in (["--engine", "embedded"], ["--engine", "vllm", "--vllm-url", "http://127.0.0.1:9"]):
        assert _cli("serve", "--registry", str(setup["root"]), "--base", str(tiny_gemma3), *engine,
                    "--gpu-memory-utilization", "0.5") == 2
        assert "--print-vllm-command" in capsys.readouterr().err


def test_cluster_flags_reach_the_replicas_config(tmp_path):
    """`--cluster ray`'s flags, as the replicas get them (ClusterConfig, checked before Ray is touched)."""
    from gemtune.serve.commands import _cluster_config

    cfg = _cluster_config("ray", replicas=3, engine="vllm", vllm_python="/x/python", gpu_memory_utilization=0.3,
                          max_loras=2, stats_dir=str(tmp_path))
    assert (cfg.replicas, cfg.engine, cfg.gpu_memory_utilization, cfg.max_loras) == (3, "vllm", 0.3, 2)
    with pytest.raises(UserError, match="expected ray") as e:
        _cluster_config("k8s", replicas=1)
    assert e.value.field == "cluster"
    with pytest.raises(UserError) as e:
        _cluster_config("ray", engine="vllm")  # no vllm_python
    assert e.value.field == "vllm_python"
    with pytest.raises(UserError) as e:
        _cluster_config("ray", engine="vllm", vllm_python="/x/python", gpu_memory_utilization=1.2)
    assert e.value.field == "gpu_memory_utilization"


def test_gemma4_base_serves_through_the_gateway(tiny_gemma4, tmp_path):
    """The gateway renders prompts with the base's own family template (Gemma 4 turns here)."""
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    src = make_random_adapters(tiny_gemma4, [tmp_path / "a"], r=8, scale=4.0, seeds=[7])[0]
    reg = Registry(tmp_path / "reg")
    reg.push("g4", src, require_verdict=False)
    RouteTable(reg).promote("g4", "v1")
    gw = build_gateway(str(tmp_path / "reg"), base=str(tiny_gemma4), max_model_len=256)
    assert gw.backend.family.name == "gemma4"
    with ServerThread(create_app(gw)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        a = c.post("/v1/chat/completions", json={"model": "g4", "messages": MSG, "max_tokens": 8, "temperature": 0})
        b = c.post("/v1/chat/completions", json={"model": "base", "messages": MSG, "max_tokens": 8, "temperature": 0})
    assert a.status_code == b.status_code == 200
    assert a.json()["model"] == "g4@v1" and a.json()["usage"]["completion_tokens"] >= 1
    assert a.json()["choices"][0]["message"]["content"] != b.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("has_gpu", [False, True])
def test_embedded_engine_says_where_the_gpu_path_is(monkeypatch, has_gpu):
    """With a GPU the note points at the vLLM path; without one there is nothing to say. CUDA availability is set
    both ways here, so the test means the same on a CPU host and on a GPU host."""
    import torch

    from gemtune.serve.backends import embedded_engine_note

    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    note = embedded_engine_note("embedded")
    if has_gpu:
        assert "runs on the CPU" in note and "H100" in note and "--engine vllm" in note
    else:
        assert note is None
    assert embedded_engine_note("vllm") is None


def test_a_request_whose_numbers_fail_is_500_for_it_alone(setup):
    """An adapter whose deltas overflow float32 (finite weights: it passes every check) fails its own request inside
    the engine (RequestFailed "numerics"): a 500 in OpenAI's shape that says so, streamed as an error event, and
    counted; requests for other adapters are served as before."""
    from safetensors.torch import load_file, save_file

    c, h = setup["client"], {"Authorization": f"Bearer {ACME}"}
    hot = setup["dir"] / "hot"
    shutil.copytree(setup["srcs"][0], hot)
    w = hot / "adapter_model.safetensors"
    save_file({k: t * 1e24 for k, t in load_file(str(w)).items()}, str(w))
    ref = setup["reg"].push("acme-hot", hot, require_verdict=False).ref
    want = _text(_chat(c, ACME, "acme-support@v1"))
    err = _shape(_chat(c, ACME, ref), 500)
    assert err["type"] == "server_error" and "numerics" in err["message"] and "this request" in err["message"]
    body = {"model": ref, "messages": MSG, "max_tokens": 8, "temperature": 0, "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=body, headers=h) as r:
        assert r.status_code == 200  # the headers went out before the engine failed
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = json.loads(events[-2])["error"]
    assert streamed["code"] == 500 and "numerics" in streamed["message"]
    assert _text(_chat(c, ACME, "acme-support@v1")) == want
    metrics = c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert re.search(r'^gemtune_generation_failures_total\{reason="numerics"\} 2\.0', metrics, re.M)


def test_engine_failures_map_to_500_for_one_request_and_503_for_the_engine():
    from gemtune.serve.backends import BackendError
    from gemtune.serve.engine import RequestFailed
    from gemtune.serve.openai import generation_failed

    for reason in ("sampling", "numerics"):
        e = generation_failed(RequestFailed("bad row", reason))
        assert (e.status, e.type) == (500, "server_error") and reason in e.message and "bad row" in e.message
    assert generation_failed(RequestFailed("step raised", "engine")).status == 503
    assert generation_failed(BackendError("vLLM is down")).status == 503
    assert generation_failed(RuntimeError("anything else")).status == 503


# --------------------------------------------------------------------------------- hostile input (issue #12)
def _shape(r, status: int) -> dict:
    """The answer is `status` with OpenAI's error shape and nothing else."""
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert isinstance(err["message"], str) and len(err["message"]) <= 1000
    assert "detail" not in r.json()
    return err


@pytest.mark.parametrize("raw,needle", [
    (b"{not json", "invalid JSON"),
    (b"[" * 5000 + b"]" * 5000, "nest"),  # json.loads: RecursionError
    (b'{"model": "acme-support", "messages": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper"),
    (b'{"model": "acme-support", "max_tokens": ' + b"9" * 5000 + b', "messages": []}', "too many digits"),
    (b'{"model": "acme-support", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone surrogate"),
    (b'{"model": "acme-support", "messages": [{"role": "user", "content": "ok"}], "\\udc80": 1}', "lone surrogate"),
    (b'\xff\xfe{"model"', "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "empty"),
    (b'{"model": "acme-support", "messages": "hello"}', "messages"),
    (b'{"model": "acme-support", "messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
    (b'{"model": "acme-support", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
     "temperature"),
    (b'{"model": "acme-support", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     "temperature"),
    (b'{"model": "acme-support", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}',
     "max_tokens"),
])
def test_hostile_bodies_are_400_in_openai_shape(setup, raw, needle):
    r = setup["client"].post("/v1/chat/completions", content=raw,
                             headers={"Authorization": f"Bearer {ACME}", "content-type": "application/json"})
    err = _shape(r, 400)
    assert needle in err["message"], err


@pytest.mark.parametrize("extra,param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -1e-50}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"seed": 2**63}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 10**40}, "max_tokens"),
])
def test_sampling_parameters_out_of_range_are_400(setup, extra, param):
    err = _shape(_chat(setup["client"], ACME, "acme-support", **extra), 400)
    assert err["param"] == param, err


def test_tiny_temperatures_are_greedy(setup):
    """vLLM's rule: 0 < temperature < 1e-5 is greedy (a sampler would divide the logits into infinities)."""
    c = setup["client"]
    greedy = _text(_chat(c, ACME, "acme-support@v1", max_tokens=8))
    for t in (1e-50, 5e-324, 9.9e-6):
        assert _text(_chat(c, ACME, "acme-support@v1", max_tokens=8, temperature=t, seed=1)) == greedy


def test_seed_edges_of_int64_are_served(setup):
    c = setup["client"]
    for seed in (2**63 - 1, -(2**63), 0):
        r = _chat(c, ACME, "acme-support@v1", temperature=1.0, seed=seed, max_tokens=4)
        assert r.status_code == 200, r.text
    a = _chat(c, ACME, "acme-support@v1", temperature=1.0, seed=2**63 - 1, max_tokens=6)
    assert _text(a) == _text(_chat(c, ACME, "acme-support@v1", temperature=1.0, seed=2**63 - 1, max_tokens=6))


def test_huge_model_name_is_not_echoed(setup):
    model = "q" * 100_000
    err = _shape(_chat(setup["client"], ACME, model), 400)
    assert err["param"] == "model" and "q" * 100 not in err["message"] and "100000 characters" in err["message"]
    err = _shape(_chat(setup["client"], ACME, "acme-" + "z" * 50), 404)  # valid-looking, missing: clipped echo
    assert len(err["message"]) < 300


def test_unknown_paths_and_methods_answer_in_openai_shape(setup):
    c = setup["client"]
    assert _shape(c.get("/v1/nothing"), 404)["type"] == "not_found_error"
    r = c.get("/v1/chat/completions")
    _shape(r, 405)
    assert "POST" in r.headers["allow"]


def test_key_is_checked_before_the_body_is_read(setup):
    """No key: 401 even for a body that would be refused as too large (it is never read)."""
    r = setup["client"].post("/v1/chat/completions", content=b"x" * (3 * 1024 * 1024),
                             headers={"content-type": "application/json"})
    _shape(r, 401)


def test_body_over_the_cap_is_413(setup):
    c = setup["client"]
    h = {"Authorization": f"Bearer {ACME}", "content-type": "application/json"}
    big = json.dumps({"model": "acme-support", "messages": [{"role": "user", "content": "x" * (3 << 20)}]})
    _shape(c.post("/v1/chat/completions", content=big, headers=h), 413)

    def chunks():  # no Content-Length: chunked, so the cap is enforced while reading
        yield b'{"model": "acme-support", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"y" * 65536
        yield b'"}]}'

    _shape(c.post("/v1/chat/completions", content=chunks(), headers=h), 413)
    assert c.get("/healthz").status_code == 200


def test_prompt_beyond_any_tokenisation_of_the_context_is_refused_by_length(setup):
    """A prompt with more characters than max_model_len tokens can hold is refused before tokenising."""
    gw = setup["gw"]
    n = gw.max_prompt_chars + 1
    r = setup["client"].post("/v1/completions", json={"model": "acme-support", "prompt": "x" * n},
                             headers={"Authorization": f"Bearer {ACME}"})
    err = _shape(r, 400)
    assert err["param"] == "prompt" and f"{n} characters" in err["message"]
    r = _chat(setup["client"], ACME, "acme-support", messages=[{"role": "user", "content": "y" * n}])
    assert _shape(r, 400)["param"] == "messages"


def test_tokenisation_runs_off_the_event_loop(setup):
    """While one prompt is being tokenised (held here on an event), the server still answers /healthz."""
    gw = setup["gw"]
    real = gw.backend.tokenizer
    entered, release = threading.Event(), threading.Event()

    class Slow:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *a, **kw):
            entered.set()
            release.wait(60)
            return real(*a, **kw)

    gw.backend.tokenizer = Slow()
    out = {}
    try:
        def one():
            with httpx.Client(base_url=setup["url"], timeout=120) as c2:
                out["r"] = c2.post("/v1/completions", json={"model": "acme-support@v1", "prompt": "abc",
                                                            "max_tokens": 3, "temperature": 0},
                                   headers={"Authorization": f"Bearer {ACME}"})

        t = threading.Thread(target=one)
        t.start()
        assert entered.wait(60), "the prompt was never tokenised"
        with httpx.Client(base_url=setup["url"], timeout=30) as c3:
            assert c3.get("/healthz").json()["status"] == "ok"  # the loop is free while tokenising
    finally:
        release.set()
        gw.backend.tokenizer = real
    t.join(120)
    assert out["r"].status_code == 200, out["r"].text


def test_openapi_schema_describes_the_bodies(setup):
    doc = setup["client"].get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(body["required"]) and "temperature" in body["properties"]
    assert "$ref" not in json.dumps(body)
    assert chat["security"] == [{"bearer": []}]
    for path in ("/v1/completions", "/v1/load_lora_adapter", "/admin/routes/promote", "/admin/routes/split"):
        assert "requestBody" in doc["paths"][path]["post"], path


# ------------------------------------------------------- timeouts and per-tenant limits (a second, strict server)
HOG = "hog-key-0123456789abcdef"


@pytest.fixture(scope="module")
def strict(tiny_gemma3, setup, tmp_path_factory):
    """A server with short header/body timeouts, a small body cap and a tenant limited to 1 running + 1 queued."""
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    d = tmp_path_factory.mktemp("strict")
    shutil.copytree(setup["root"], d / "reg", ignore=shutil.ignore_patterns(".registry.lock"))
    (d / "tenants.yaml").write_text(
        f"admin_key: {ADMIN}\n"
        "tenants:\n"
        f"  acme: {{api_key: {ACME}, adapters: ['acme-*']}}\n"
        f"  hog: {{api_key: {HOG}, adapters: ['acme-*'], max_concurrent: 1, max_queued: 1}}\n")
    gw = build_gateway(str(d / "reg"), tenants=str(d / "tenants.yaml"), base=str(tiny_gemma3), max_model_len=256,
                       max_batch=8, max_queue=64)
    server = ServerThread(create_app(gw, max_body_bytes=64 * 1024, body_timeout_s=1.0), header_timeout_s=1.0)
    server.start()
    yield {"url": server.url, "gw": gw}
    server.stop()


def _recv_all(sock) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = b""
    while True:
        try:
            b = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not b:
            return out
        out += b


@pytest.mark.parametrize("keep_alive_first", [False, True])
def test_partial_request_headers_are_closed(strict, keep_alive_first):
    """Slowloris: half a request line or half the headers, then nothing; the server closes the connection (after
    its 1 s header timeout; 60 s here is only the test's own bound on waiting)."""
    import socket

    host, port = strict["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        if keep_alive_first:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b"\r\n\r\n" not in first or not first.rstrip().endswith(b"}"):
                first += s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
        try:
            rest = _recv_all(s)
        except socket.timeout:
            raise AssertionError("the server kept a partial request open for 60 s") from None
    assert rest == b""  # closed without an answer
    with httpx.Client(base_url=strict["url"], timeout=30) as c:
        assert c.get("/healthz").status_code == 200


def test_slow_body_is_408_and_unauthenticated_body_is_never_waited_for(strict):
    import socket

    host, port = strict["url"].removeprefix("http://").split(":")
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n{auth}\r\n")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.format(auth=f"Authorization: Bearer {ACME}\r\n").encode() + b'{"model": ')
        try:
            answer = _recv_all(s)
        except socket.timeout:
            raise AssertionError("the server waited 60 s for a body") from None
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 408
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head.format(auth="").encode() + b'{"model": ')
        first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 401"), first[:200]


def test_unparseable_request_is_400_in_openai_shape(strict):
    import socket

    host, port = strict["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        answer = _recv_all(s)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


class _HeldTokenizer:
    """The gateway's tokenizer, except that a prompt containing HOLD waits for `release` (so a request holds its
    tenant slot for as long as a test needs, whatever the machine's speed)."""

    def __init__(self, real):
        self.real, self.entered, self.release = real, threading.Semaphore(0), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, text, *a, **kw):
        if isinstance(text, str) and "HOLD" in text:
            self.entered.release()
            self.release.wait(120)
        return self.real(text, *a, **kw)


def test_tenant_over_its_own_limit_gets_429_others_do_not(strict):
    """hog may run 1 request and queue 1: with its slot held, a second queues, a third is refused with
    Retry-After, and acme is served meanwhile; released, both hog requests complete."""
    url, gw = strict["url"], strict["gw"]
    held = _HeldTokenizer(gw.backend.tokenizer)
    gw.backend.tokenizer = held
    out: dict = {}

    def hog(i: int, prompt: str):
        with httpx.Client(base_url=url, timeout=180) as c:
            out[i] = c.post("/v1/completions", json={"model": "acme-support@v1", "prompt": prompt, "max_tokens": 4,
                                                     "temperature": 0}, headers={"Authorization": f"Bearer {HOG}"})

    def queued() -> float:
        with httpx.Client(base_url=url, timeout=30) as c:
            text = c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        m = re.search(r'^gemtune_tenant_queued\{tenant="hog"\} (\S+)', text, re.M)
        return float(m.group(1)) if m else -1

    threads = [threading.Thread(target=hog, args=(1, "HOLD this"))]
    try:
        threads[0].start()
        assert held.entered.acquire(timeout=60), "the first hog request never reached tokenising"
        threads.append(threading.Thread(target=hog, args=(2, "second")))
        threads[1].start()
        deadline = time.monotonic() + 60
        while queued() != 1:
            assert time.monotonic() < deadline, "the second hog request never queued"
            time.sleep(0.05)
        with httpx.Client(base_url=url, timeout=120) as c:
            third = c.post("/v1/completions", json={"model": "acme-support@v1", "prompt": "third", "max_tokens": 4},
                           headers={"Authorization": f"Bearer {HOG}"})
            err = _shape(third, 429)
            assert "hog" in err["message"] and int(third.headers["retry-after"]) >= 1
            victim = _chat(c, ACME, "acme-support@v1", max_tokens=4)
            assert victim.status_code == 200, victim.text
            metrics = c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        assert re.search(r'^gemtune_tenant_rejected_total\{tenant="hog"\} 1\.0', metrics, re.M)
    finally:
        held.release.set()
        for t in threads:
            t.join(120)
        gw.backend.tokenizer = held.real
    assert out[1].status_code == 200 and out[2].status_code == 200, (out[1].text, out[2].text)
    assert queued() == 0


def test_gemtune_serve_applies_header_timeout_and_body_cap(setup, tiny_gemma3, tmp_path):
    """The CLI server (not only ServerThread) closes partial requests and caps bodies."""
    import socket
    import subprocess
    import sys

    assert _cli("serve", "--registry", str(tmp_path / "r"), "--header-timeout", "0") == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gemtune.cli", "serve", "--registry", str(setup["root"]),
                             "--base", str(tiny_gemma3), "--port", str(port), "--max-model-len", "256",
                             "--header-timeout", "1", "--max-body-mib", "0.01"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            try:
                assert _recv_all(s) == b""
            except socket.timeout:
                raise AssertionError("gemtune serve kept a partial request open for 60 s") from None
        r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "x" * 20_000}, timeout=60)
        _shape(r, 413)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
