"""Load test (slow, bounded, loopback only): `gemtune serve` in a subprocess, 120 concurrent clients for 30 s over
4 adapters while routes are promoted, split and rolled back (admin API and the registry files, as the CLI writes
them) and a new version is hot-loaded and promoted. The engine has 6 adapter slots for 9 versions, so LRU eviction
and on-demand reloading (with sha256 verification) run under load too.

Checked for every response: no 5xx; overload is answered 429 with Retry-After (max_queue is deliberately small);
the version named in the response was routed for that alias at some moment between admission and answer (plus the
server's documented ≤1 s pickup of file changes); and the text equals that version's own greedy output, so the
named version really produced it (each version's adapter gives a distinguishable greedy output).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from gemtune.errors import UserError
from gemtune.registry.routes import RouteTable
from gemtune.registry.store import Registry
from gemtune.registry.synthetic import make_random_adapters

pytestmark = pytest.mark.slow

ADMIN = "load-admin-key-0123456789"
TENANT = "load-tenant-key-0123456789"
CLIENTS = 120
DURATION_S = 30.0
FILE_PICKUP_S = 1.0  # routes.json changes are live within this (poll 0.2 s)
NAMES = ["a0", "a1", "a2", "a3"]
MAX_TOKENS = 8
MSG = [{"role": "user", "content": "tell me"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_gemma3, tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    srcs = make_random_adapters(tiny_gemma3, [d / f"s{i}" for i in range(9)], r=8, scale=4.0,
                                seeds=[100 + i for i in range(9)])
    reg = Registry(d / "registry")
    for i, name in enumerate(NAMES):
        reg.push(name, srcs[2 * i])
        reg.push(name, srcs[2 * i + 1])
        RouteTable(reg).promote(name, "v1")
    (d / "tenants.yaml").write_text(f"admin_key: {ADMIN}\ntenants:\n  t: {{api_key: {TENANT}, adapters: ['a*']}}\n")
    port = _free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemtune.cli", "serve", "--registry", str(d / "registry"), "--tenants",
         str(d / "tenants.yaml"), "--host", "127.0.0.1", "--port", str(port), "--base", str(tiny_gemma3),
         "--max-batch", "16", "--max-queue", "24", "--max-model-len", "256", "--max-loras", "6"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(d / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("server did not start")
        time.sleep(0.2)
    yield {"url": url, "reg": reg, "extra": srcs[8], "dir": d}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


class Timeline:
    """When each alias served which weights: (time the change became possible, weights)."""

    def __init__(self, names):
        self.events = {n: [(0.0, {"v1": 100})] for n in names}

    def record(self, name, t, weights):
        self.events[name].append((t, dict(weights)))

    def allowed(self, name, t_from, t_to) -> set[str]:
        ev = self.events[name]
        out = set()
        for i, (start, w) in enumerate(ev):
            end = ev[i + 1][0] if i + 1 < len(ev) else float("inf")
            if start <= t_to and end >= t_from:
                out |= {v for v, x in w.items() if x > 0}
        return out


async def _expected(client, refs) -> dict[str, str]:
    out = {}
    for ref in refs:
        r = await client.post("/v1/chat/completions", json={"model": ref, "messages": MSG, "max_tokens": MAX_TOKENS,
                                                            "temperature": 0},
                              headers={"Authorization": f"Bearer {TENANT}"})
        assert r.status_code == 200, r.text
        out[ref] = r.json()["choices"][0]["message"]["content"]
    return out


async def _client_loop(client, stop_at, results):
    rnd = random.Random()
    while time.monotonic() < stop_at:
        name = rnd.choice(NAMES)
        user = f"u{rnd.randrange(1000)}"
        t0 = time.monotonic()
        try:
            r = await client.post("/v1/chat/completions",
                                  json={"model": name, "messages": MSG, "max_tokens": MAX_TOKENS, "temperature": 0,
                                        "user": user},
                                  headers={"Authorization": f"Bearer {TENANT}"})
        except httpx.HTTPError as e:
            results.append({"name": name, "status": f"error {type(e).__name__}", "t0": t0, "t1": time.monotonic()})
            continue
        t1 = time.monotonic()
        row = {"name": name, "status": r.status_code, "t0": t0, "t1": t1}
        if r.status_code == 200:
            j = r.json()
            row.update(model=j["model"], text=j["choices"][0]["message"]["content"],
                       header=r.headers.get("x-gemtune-adapter"))
        elif r.status_code == 429:
            row["retry_after"] = r.headers.get("retry-after")
            await asyncio.sleep(rnd.uniform(0.05, 0.3))
        results.append(row)


async def _route_changes(admin, reg, extra_src, t_start, stop_at, timeline, expected, notes):
    """Promote, split and roll back through the admin API and through the registry files (what the CLI does);
    hot-load a new version of a0 in the middle and promote it."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    rt = RouteTable(reg)
    step = 0
    hot_loaded = False
    while time.monotonic() < stop_at - 2:
        await asyncio.sleep(1.5)
        name = NAMES[step % 4]
        kind = ["promote", "split", "rollback", "file-promote", "file-split", "file-rollback"][step % 6]
        step += 1
        before = time.monotonic()
        if not hot_loaded and time.monotonic() - t_start > 10:
            r = await admin.post("/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": str(extra_src)},
                                 headers=h)
            assert r.status_code == 200, r.text
            ref = r.json()["model"]
            notes["hot_load_ms"] = r.json()["load_ms"]
            expected.update(await _expected(admin, [ref]))
            r = await admin.post("/admin/routes/promote", json={"name": "a0", "version": ref.split("@")[1]},
                                 headers=h)
            assert r.status_code == 200, r.text
            timeline.record("a0", before, r.json()["weights"])
            notes["hot_loaded"] = ref
            hot_loaded = True
            continue
        if kind == "promote":
            r = await admin.post("/admin/routes/promote", json={"name": name, "version": "v2"}, headers=h)
        elif kind == "split":
            r = await admin.post("/admin/routes/split", json={"name": name, "weights": {"v1": 50, "v2": 50}},
                                 headers=h)
        elif kind == "rollback":
            r = await admin.post("/admin/routes/rollback", json={"name": name}, headers=h)
        if kind in ("promote", "split", "rollback"):
            if r.status_code == 400 and "no earlier route" in r.text:
                continue
            assert r.status_code == 200, r.text
            weights = r.json()["weights"]
            timeline.record(name, before, weights)
        else:
            op = kind.split("-")[1]
            if op == "promote":
                out = await asyncio.to_thread(rt.promote, name, "v2")
            elif op == "split":
                out = await asyncio.to_thread(rt.split, name, "prod", {"v1": 30, "v2": 70})
            else:
                try:
                    out = await asyncio.to_thread(rt.rollback, name)
                except UserError:  # nothing left to roll back to on this alias
                    continue
            # the server picks file changes up within FILE_PICKUP_S: both states are valid meanwhile
            timeline.record(name, before, out["weights"])
        notes["changes"] += 1


def test_load_routes_flip_under_120_concurrent_clients(server):
    async def main():
        limits = httpx.Limits(max_connections=CLIENTS + 20, max_keepalive_connections=CLIENTS + 20,
                              keepalive_expiry=2.0)  # well under the server's keep-alive: no reuse race
        async with httpx.AsyncClient(base_url=server["url"], timeout=60, limits=limits) as client, \
                httpx.AsyncClient(base_url=server["url"], timeout=60) as admin:
            refs = [f"{n}@{v}" for n in NAMES for v in ("v1", "v2")]
            expected = await _expected(client, refs)
            assert len(set(expected.values())) == len(refs), "adapters must give distinguishable outputs"
            timeline = Timeline(NAMES)
            notes = {"changes": 0}
            results: list[dict] = []
            t_start = time.monotonic()
            stop_at = t_start + DURATION_S
            tasks = [asyncio.create_task(_client_loop(client, stop_at, results)) for _ in range(CLIENTS)]
            changer = asyncio.create_task(_route_changes(admin, server["reg"], server["extra"], t_start, stop_at,
                                                         timeline, expected, notes))
            await asyncio.gather(*tasks, changer)
            elapsed = time.monotonic() - t_start
            metrics = (await admin.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})).text
            return results, expected, timeline, notes, elapsed, metrics

    results, expected, timeline, notes, elapsed, metrics = asyncio.run(main())
    statuses = [r["status"] for r in results]
    ok = [r for r in results if r["status"] == 200]
    print(f"\nload: {len(results)} responses in {elapsed:.1f} s from {CLIENTS} clients: "
          f"{statuses.count(200)} ok, {statuses.count(429)} 429, route changes {notes['changes']}, "
          f"hot-loaded {notes.get('hot_loaded')} in {notes.get('hot_load_ms')} ms")
    assert elapsed >= DURATION_S
    bad = [s for s in statuses if not isinstance(s, int) or s >= 500 or s not in (200, 429)]
    assert not bad, f"unexpected answers: {sorted(set(map(str, bad)))}"
    assert statuses.count(429) >= 1, "overload was never answered with 429"
    assert all(r.get("retry_after") and int(r["retry_after"]) >= 1 for r in results if r["status"] == 429)
    assert len(ok) >= 200
    assert notes["changes"] >= 8 and notes.get("hot_loaded")
    wrong_route, wrong_text = [], []
    for r in ok:
        name, version = r["model"].split("@")
        assert name == r["name"] and r["header"] == r["model"]
        if version not in timeline.allowed(name, r["t0"] - FILE_PICKUP_S, r["t1"]):
            wrong_route.append(r)
        if r["text"] != expected[r["model"]]:
            wrong_text.append(r)
    assert not wrong_route, (f"{len(wrong_route)} responses from a version not routed at admission: {wrong_route[:3]}; "
                             f"timeline of {wrong_route[0]['name']} (t, weights): "
                             f"{timeline.events[wrong_route[0]['name']]}" if wrong_route else "")
    assert not wrong_text, f"{len(wrong_text)} responses whose text is not their version's: {wrong_text[:3]}"
    served = {r["model"] for r in ok}
    assert {f"{n}@v1" for n in NAMES} <= served and any(m.endswith("@v2") for m in served)
    assert notes["hot_loaded"] in served
    assert "gemtune_rejected_total" in metrics and 'reason="queue_full"' in metrics
    loads = re.search(r'^gemtune_adapter_loads_total\{result="ok"\} (\d+)', metrics, re.M)
    print(f"adapter loads into the engine (incl. reloads after LRU eviction): {loads and loads.group(1)}")
    assert loads and int(loads.group(1)) >= len(expected)
