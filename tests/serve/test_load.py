"""Load test (slow, bounded, loopback only): `gemtune serve` in a subprocess, 120 concurrent clients over 4 adapters
while routes are promoted, split and rolled back (admin API and the registry files, as the CLI writes them) and a new
version is hot-loaded and promoted. The engine has 6 adapter slots for 9 versions, so LRU eviction and on-demand
reloading (with sha256 verification) run under load too.

Nothing here depends on the machine's speed: the clients run until a fixed schedule of route changes is done, and
each step of the schedule waits for progress (responses admitted after the previous change), not for a duration.
Checked for every response: no 5xx; overload, when it happens, is answered 429 with Retry-After (max_queue is
deliberately small; overload itself is asserted deterministically in the engine and API tests); the version named in
the response was routed for that alias at some moment between sending and answer — a change counts from just before
it was made until the server confirmed it live (the admin call returned, or GET /admin/routes shows a file change),
so a slow pickup on a busy machine widens the window instead of failing; and the text equals that version's own
greedy output, so the named version really produced it (each version's adapter gives a distinguishable output).
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

from gemtune.adapter import update_sidecar, weights_sha256
from gemtune.errors import UserError
from gemtune.registry.routes import DEFAULT_ALIAS, RouteTable
from gemtune.registry.store import Registry
from gemtune.registry.synthetic import make_random_adapters

pytestmark = pytest.mark.slow

ADMIN = "load-admin-key-0123456789"
TENANT = "load-tenant-key-0123456789"
CLIENTS = 120
CHANGES = 13  # route-change steps (one of them the hot-load); each waits for PER_STEP fresh responses
PER_STEP = 15
DEADLINE_S = 900.0  # a hung server fails the test instead of hanging it; never reached by a working one
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
        reg.push(name, srcs[2 * i], require_verdict=False)
        reg.push(name, srcs[2 * i + 1], require_verdict=False)
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
    # the hot-loaded adapter pushes through the registry: it carries a passing eval verdict (contract C1)
    update_sidecar(srcs[8], {"eval_verdicts": [{
        "adapter_sha256": weights_sha256(srcs[8]), "suite_sha256": "0" * 64, "baseline": "base",
        "baseline_id": "base:tiny", "passed": True, "regressed_share": 0.0, "gate": 0.02}]})
    yield {"url": url, "reg": reg, "extra": srcs[8], "dir": d}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


class Timeline:
    """When each alias served which weights. A change is (made_at, live_at, weights): the new weights may serve from
    made_at (just before the change was made) and the previous ones until live_at (when the server confirmed it)."""

    def __init__(self, names):
        self.events = {n: [(0.0, 0.0, {"v1": 100})] for n in names}

    def record(self, name, made_at, live_at, weights):
        self.events[name].append((made_at, live_at, dict(weights)))

    def allowed(self, name, t_from, t_to) -> set[str]:
        ev = self.events[name]
        out = set()
        for i, (start, _, w) in enumerate(ev):
            end = ev[i + 1][1] if i + 1 < len(ev) else float("inf")
            if start <= t_to and end >= t_from:
                out |= {v for v, x in w.items() if x > 0}
        return out


class Progress:
    """What the clients have seen so far, for the schedule's waits."""

    def __init__(self, results, stop_at):
        self.results, self.stop_at = results, stop_at

    async def until(self, what, cond):
        """Bounded polling: wait until cond() holds; fail (not hang) past the test's deadline."""
        while not cond():
            if time.monotonic() > self.stop_at:
                pytest.fail(f"no progress: still waiting for {what} at the test's {DEADLINE_S:.0f} s deadline")
            await asyncio.sleep(0.05)

    def ok_after(self, t, name=None, model=None):
        return [r for r in self.results if r["status"] == 200 and r["t0"] > t
                and (name is None or r["name"] == name) and (model is None or r["model"] == model)]


async def _post_retrying(client, progress, json, headers):
    """A request the test itself needs answered: 429 means "later", as for any client."""
    while True:
        r = await client.post("/v1/chat/completions", json=json, headers=headers)
        if r.status_code != 429:
            return r
        if time.monotonic() > progress.stop_at:
            pytest.fail("the server answered 429 until the test's deadline")
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))


async def _expected(client, progress, refs, key) -> dict[str, str]:
    out = {}
    for ref in refs:
        r = await _post_retrying(client, progress, {"model": ref, "messages": MSG, "max_tokens": MAX_TOKENS,
                                                    "temperature": 0}, {"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        out[ref] = r.json()["choices"][0]["message"]["content"]
    return out


async def _client_loop(client, i, done, results):
    rnd = random.Random(i)
    while not done.is_set():
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


async def _serving(admin, name) -> dict | None:
    r = await admin.get("/admin/routes", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return r.json()["serving"].get(name, {}).get(DEFAULT_ALIAS)


async def _route_changes(admin, reg, extra_src, progress, timeline, expected, notes):
    """A fixed schedule: promote, split and roll back through the admin API and through the registry files (what
    the CLI does); hot-load a new version of a0 in the middle and promote it. Each step first waits for PER_STEP
    responses admitted after the previous one."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    rt = RouteTable(reg)
    last = time.monotonic()
    await progress.until("every alias served at v1", lambda: all(progress.ok_after(0, name=n) for n in NAMES))
    for step in range(CHANGES):
        await progress.until(f"{PER_STEP} responses before change {step}",
                             lambda: len(progress.ok_after(last)) >= PER_STEP)
        name = NAMES[step % 4]
        kind = ["promote", "split", "rollback", "file-promote", "file-split", "file-rollback"][step % 6]
        before = time.monotonic()
        if step == CHANGES // 2:
            r = await admin.post("/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": str(extra_src)},
                                 headers=h)
            assert r.status_code == 200, r.text  # never refused because tenants keep the adapter slots busy
            ref = r.json()["model"]
            notes["hot_load_ms"] = r.json()["load_ms"]
            expected.update(await _expected(admin, progress, [ref], ADMIN))
            before = time.monotonic()
            r = await admin.post("/admin/routes/promote",  # random test adapters: no verdicts, so force
                                 json={"name": "a0", "version": ref.split("@")[1], "force": True}, headers=h)
            assert r.status_code == 200, r.text
            last = time.monotonic()
            timeline.record("a0", before, last, r.json()["weights"])
            notes["hot_loaded"] = ref
            await progress.until(f"a response from {ref}", lambda: progress.ok_after(last, model=ref))
            continue
        if kind in ("promote", "split", "rollback"):
            if kind == "promote":
                r = await admin.post("/admin/routes/promote", json={"name": name, "version": "v2", "force": True},
                                     headers=h)
            elif kind == "split":
                r = await admin.post("/admin/routes/split",
                                     json={"name": name, "weights": {"v1": 50, "v2": 50}, "force": True}, headers=h)
            else:
                r = await admin.post("/admin/routes/rollback", json={"name": name}, headers=h)
            if r.status_code == 400 and "no earlier route" in r.text:
                continue
            assert r.status_code == 200, r.text
            weights = r.json()["weights"]
            last = time.monotonic()  # the admin call returns once the server routes by the new weights
        else:
            op = kind.split("-")[1]
            if op == "promote":
                out = await asyncio.to_thread(rt.promote, name, "v2")
            elif op == "split":
                out = await asyncio.to_thread(rt.split, name, DEFAULT_ALIAS, {"v1": 30, "v2": 70})
            else:
                try:
                    out = await asyncio.to_thread(rt.rollback, name)
                except UserError:  # nothing left to roll back to on this alias
                    continue
            weights = out["weights"]
            while await _serving(admin, name) != weights:  # the server's file pickup, however long it takes
                if time.monotonic() > progress.stop_at:
                    pytest.fail(f"the server never picked up the file change to {name}: {weights}")
                await asyncio.sleep(0.05)
            last = time.monotonic()
        timeline.record(name, before, last, weights)
        if weights.get("v2"):  # the new version really takes traffic
            await progress.until(f"{name}@v2 served", lambda: progress.ok_after(last, model=f"{name}@v2"))
        notes["changes"] += 1
    await progress.until(f"{PER_STEP} responses after the last change", lambda: len(progress.ok_after(last)) >= PER_STEP)


def test_load_routes_flip_under_120_concurrent_clients(server):
    async def main():
        limits = httpx.Limits(max_connections=CLIENTS + 20, max_keepalive_connections=CLIENTS + 20,
                              keepalive_expiry=2.0)  # well under the server's keep-alive: no reuse race
        async with httpx.AsyncClient(base_url=server["url"], timeout=DEADLINE_S, limits=limits) as client, \
                httpx.AsyncClient(base_url=server["url"], timeout=DEADLINE_S) as admin:
            results: list[dict] = []
            t_start = time.monotonic()
            progress = Progress(results, t_start + DEADLINE_S)
            refs = [f"{n}@{v}" for n in NAMES for v in ("v1", "v2")]
            expected = await _expected(client, progress, refs, TENANT)
            assert len(set(expected.values())) == len(refs), "adapters must give distinguishable outputs"
            timeline = Timeline(NAMES)
            notes = {"changes": 0}
            done = asyncio.Event()
            tasks = [asyncio.create_task(_client_loop(client, i, done, results)) for i in range(CLIENTS)]
            try:
                await _route_changes(admin, server["reg"], server["extra"], progress, timeline, expected, notes)
            finally:
                done.set()
                await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t_start
            metrics = (await admin.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})).text
            return results, expected, timeline, notes, elapsed, metrics

    results, expected, timeline, notes, elapsed, metrics = asyncio.run(main())
    statuses = [r["status"] for r in results]
    ok = [r for r in results if r["status"] == 200]
    print(f"\nload: {len(results)} responses in {elapsed:.1f} s from {CLIENTS} clients: "
          f"{statuses.count(200)} ok, {statuses.count(429)} 429, route changes {notes['changes']}, "
          f"hot-loaded {notes.get('hot_loaded')} in {notes.get('hot_load_ms')} ms")
    bad = [s for s in statuses if not isinstance(s, int) or s >= 500 or s not in (200, 429)]
    assert not bad, f"unexpected answers: {sorted(set(map(str, bad)))}"
    assert all(r.get("retry_after") and int(r["retry_after"]) >= 1 for r in results if r["status"] == 429)
    if statuses.count(429):
        assert "gemtune_rejected_total" in metrics and 'reason="queue_full"' in metrics
    assert len(ok) >= (notes["changes"] + 2) * PER_STEP  # each wait counted responses sent after the last change
    assert notes["changes"] >= 8 and notes.get("hot_loaded")
    wrong_route, wrong_text = [], []
    for r in ok:
        name, version = r["model"].split("@")
        assert name == r["name"] and r["header"] == r["model"]
        if version not in timeline.allowed(name, r["t0"], r["t1"]):
            wrong_route.append(r)
        if r["text"] != expected[r["model"]]:
            wrong_text.append(r)
    assert not wrong_route, (f"{len(wrong_route)} responses from a version not routed at admission: {wrong_route[:3]}; "
                             f"timeline of {wrong_route[0]['name']} (made, live, weights): "
                             f"{timeline.events[wrong_route[0]['name']]}" if wrong_route else "")
    assert not wrong_text, f"{len(wrong_text)} responses whose text is not their version's: {wrong_text[:3]}"
    served = {r["model"] for r in ok}
    assert {f"{n}@v1" for n in NAMES} <= served and any(m.endswith("@v2") for m in served)
    assert notes["hot_loaded"] in served
    loads = re.search(r'^gemtune_adapter_loads_total\{result="ok"\} (\d+)', metrics, re.M)
    print(f"adapter loads into the engine (incl. reloads after LRU eviction): {loads and loads.group(1)}")
    assert loads and int(loads.group(1)) >= len(expected)
