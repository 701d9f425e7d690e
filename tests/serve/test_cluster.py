"""Scale-out acceptance (#17): 3 Ray Serve replicas of a tiny random base and 2 `gemtune serve --cluster ray`
gateway processes sharing routes through Redis, under about a minute of streamed load over 6 adapters (Zipf-like
traffic, 12 versions, 3 adapter slots per replica) while routes flip through both gateways and one replica process
is SIGKILLed mid-load.

Checked: no 5xx and no transport error; every answer names the version routed for its alias at some moment between
sending and answer (a change counts from just before it was made until both gateways serve it), and its text is that
version's own greedy output; a stream that loses its replica after streaming ends with an SSE error event naming the
lost replica; requests the killed replica had not started are retried on another replica (the gateways' retry
counters) and answered in full; adapter loads, counted by each replica, are fewer than random placement of the same
request sequence over the same replicas and slots (simulated, mean of 50 draws), by at least half.

Nothing waits on the machine's speed: each step waits for progress (responses, a replica holding work), bounded by
generous deadlines that fail instead of hang. Ray, Redis and the gateways run in their own sessions and every
process of those sessions is killed at the end.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from gemtune.registry.routes import RouteTable
from gemtune.registry.store import Registry
from gemtune.registry.synthetic import make_random_adapters
from gemtune.serve.cluster import read_replica_stats

ADMIN = "cluster-admin-key-0123456789"
TENANT = "cluster-tenant-key-0123456789"
NAMES = ["n0", "n1", "n2", "n3", "n4", "n5"]
TRAFFIC = [8, 4, 2, 1, 1, 1]  # Zipf-like weights over NAMES
REPLICAS, SLOTS = 3, 3
CLIENTS = 12
LOAD_S = 60.0  # the load runs this long, or until the schedule below is done, whichever is later
DEADLINE_S = 600.0  # a hung cluster fails the test here; never reached by a working one
MAX_TOKENS = 6
MSG = [{"role": "user", "content": "tell me"}]
# A throwaway loopback cluster: no token auth, whatever ~/.ray/auth_token a local `ray.init()` may have left
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    """A port free on every interface: Ray resolves 127.0.0.1 to the node's address, where another Ray may listen."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is dead already (its parent reaps it)
                out.append(int(p.name))
    return out


def _kill_session(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM (when `grace_s`) then SIGKILL every process in `proc`'s session (started with start_new_session)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if wait <= 0:
            continue
        pids = _session_pids(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while proc.poll() is None or _session_pids(proc.pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _require(exe: str, why: str) -> str:
    path = shutil.which(exe) or (str(Path(sys.executable).parent / exe)
                                 if (Path(sys.executable).parent / exe).exists() else None)
    if path is None:
        if os.environ.get("GEMTUNE_REQUIRE_REDIS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def redis_url():
    exe = _require("redis-server", "redis-server is not installed (apt-get install redis-server)")
    d = tempfile.mkdtemp(prefix="gtredis")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    import redis

    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill_session(proc)
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    _kill_session(proc, grace_s=0)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of our own: loopback, 4 logical CPUs, no dashboard, a small object store, free ports."""
    ray = _require("ray", "ray is not installed (pip install 'gemtune[cluster]')")
    d = tempfile.mkdtemp(prefix="gtray")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    log = open(Path(d) / "head.log", "w")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
         "--num-cpus", "4", "--include-dashboard=false", "--disable-usage-stats",
         "--object-store-memory", str(80 * 1024 ** 2), "--temp-dir", d],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **RAY_ENV})
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while "ray start --address" not in (Path(d) / "head.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_session(proc)
            raise RuntimeError(f"ray head did not start: {(Path(d) / 'head.log').read_text()[-2000:]}")
        time.sleep(0.2)
    yield address
    _kill_session(proc, grace_s=0)  # a throwaway cluster: nothing to save
    shutil.rmtree(d, ignore_errors=True)


def _start_gateway(d: Path, i: int, base, address: str, redis_url: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(d / f"gateway{i}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemtune.cli", "serve", "--registry", str(d / "registry"), "--tenants",
         str(d / "tenants.yaml"), "--port", str(port), "--base", str(base), "--cluster", "ray", "--ray-address",
         address, "--replicas", str(REPLICAS), "--max-loras", str(SLOTS), "--max-batch", "2", "--max-queue", "64",
         "--max-model-len", "128", "--routes", redis_url, "--replica-stats", str(d / "stats")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", **RAY_ENV})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway {i} exited: {(d / f'gateway{i}.log').read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _kill_session(proc)
            raise TimeoutError(f"gateway {i} did not start: {(d / f'gateway{i}.log').read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tiny_gemma3, ray_head, redis_url, tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    srcs = make_random_adapters(tiny_gemma3, [d / f"s{i}" for i in range(2 * len(NAMES))], r=8, scale=4.0,
                                seeds=[300 + i for i in range(2 * len(NAMES))])
    reg = Registry(d / "registry")
    for i, name in enumerate(NAMES):
        reg.push(name, srcs[2 * i], require_verdict=False)
        reg.push(name, srcs[2 * i + 1], require_verdict=False)
        RouteTable(reg).promote(name, "v1")  # routes.json seeds Redis on the first gateway's start
    (d / "stats").mkdir()
    (d / "tenants.yaml").write_text(f"admin_key: {ADMIN}\ntenants:\n  t: {{api_key: {TENANT}, adapters: ['n*']}}\n")
    procs, urls = [], []
    try:
        for i in range(2):  # the first deploys the replicas, the second joins the running application
            p, u = _start_gateway(d, i, tiny_gemma3, ray_head, redis_url)
            procs.append(p)
            urls.append(u)
        yield {"urls": urls, "dir": d}
    finally:
        for p in procs:
            _kill_session(p)


class Timeline:
    """When each alias served which version: (made_at, live_at, version) as in test_load.py."""

    def __init__(self):
        self.events = {n: [(0.0, 0.0, "v1")] for n in NAMES}

    def allowed(self, name, t_from, t_to) -> set[str]:
        ev, out = self.events[name], set()
        for i, (start, _, v) in enumerate(ev):
            end = ev[i + 1][1] if i + 1 < len(ev) else float("inf")
            if start <= t_to and end >= t_from:
                out.add(v)
        return out


async def _until(what, cond, stop_at):
    while not cond():
        if time.monotonic() > stop_at:
            pytest.fail(f"no progress: still waiting for {what}")
        await asyncio.sleep(0.05)


async def _stream(client, model, user):
    """One streamed chat completion: (status, served model, text, error message or None, had streamed)."""
    body = {"model": model, "messages": MSG, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "user": user}
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {TENANT}"}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, r.text, None, False, r.headers
        parts, err, served = [], None, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                err = chunk["error"]["message"]
                continue
            served = chunk.get("model", served)
            for ch in chunk.get("choices", []):
                parts.append(ch.get("delta", {}).get("content") or "")
        return 200, served, "".join(parts), err, any(parts), r.headers


async def _client(client, gi, seed, done, results):
    rnd = random.Random(seed)
    while not done.is_set():
        name = rnd.choices(NAMES, TRAFFIC)[0]
        t0 = time.monotonic()
        try:
            status, model, text, err, streamed, headers = await _stream(client, name, f"u{rnd.randrange(1000)}")
        except httpx.HTTPError as e:
            results.append({"name": name, "status": f"error {type(e).__name__}", "t0": t0, "t1": time.monotonic()})
            continue
        results.append({"name": name, "gw": gi, "status": status, "t0": t0, "t1": time.monotonic(), "model": model,
                        "text": text, "error": err, "streamed": streamed,
                        "header": headers.get("x-gemtune-adapter"), "retry_after": headers.get("retry-after")})
        if status == 429:
            await asyncio.sleep(rnd.uniform(0.05, 0.3))


async def _serving_everywhere(admins, name, version, stop_at):
    h = {"Authorization": f"Bearer {ADMIN}"}
    for a in admins:
        while True:
            r = await a.get("/admin/routes", headers=h)
            assert r.status_code == 200, r.text
            if r.json()["serving"].get(name, {}).get("prod") == {version: 100}:
                break
            if time.monotonic() > stop_at:
                pytest.fail(f"{a.base_url} never served {name}@{version}")
            await asyncio.sleep(0.02)


async def _kill_a_busy_replica(stats_dir, stop_at) -> dict:
    """SIGKILL the replica process holding the most requests, once one holds at least 3 (max_batch is 2, so at
    least one of them has not started)."""
    while True:
        live = [s for s in read_replica_stats(stats_dir) if _alive(s["pid"])]
        busy = max(live, key=lambda s: s["inflight"], default=None)
        if busy and busy["inflight"] >= 3:
            os.kill(busy["pid"], signal.SIGKILL)
            return busy
        if time.monotonic() > stop_at:
            pytest.fail(f"no replica ever held 3 requests: {live}")
        await asyncio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


async def _schedule(admins, results, timeline, stats_dir, notes, stop_at):
    """Route flips through alternating gateways every 10 fresh responses; one replica killed after the third."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    t_start, last, step = time.monotonic(), time.monotonic(), 0
    while step < 8 or time.monotonic() - t_start < LOAD_S:
        await _until("10 responses after the last change",
                     lambda: sum(1 for r in results if r["t0"] > last and r["status"] == 200) >= 10, stop_at)
        if step == 3:
            notes["killed"] = await _kill_a_busy_replica(stats_dir, stop_at)
            notes["killed_at"] = time.monotonic()
        name = NAMES[step % 3]  # the busy aliases
        version = "v2" if timeline.events[name][-1][2] == "v1" else "v1"
        before = time.monotonic()
        r = await admins[step % 2].post("/admin/routes/promote", json={"name": name, "version": version, "force": True},
                                              headers=h)  # random test adapters: no eval verdicts
        assert r.status_code == 200, r.text
        await _serving_everywhere(admins, name, version, stop_at)
        last = time.monotonic()
        timeline.events[name].append((before, last, version))
        step += 1
    notes["changes"] = step
    await _until("10 responses after the last change",
                 lambda: sum(1 for r in results if r["t0"] > last and r["status"] == 200) >= 10, stop_at)


def _random_placement_loads(sequence: list[str], draws: int = 50) -> float:
    """Adapter loads if each request went to a uniformly random replica, each with an LRU of SLOTS adapters."""
    total = 0
    for seed in range(draws):
        rnd = random.Random(seed)
        caches = [collections.OrderedDict() for _ in range(REPLICAS)]
        for key in sequence:
            c = caches[rnd.randrange(REPLICAS)]
            if key in c:
                c.move_to_end(key)
                continue
            total += 1
            c[key] = None
            if len(c) > SLOTS:
                c.popitem(last=False)
    return total / draws


def _metric(text: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def test_replicas_gateways_route_flips_and_a_killed_replica(cluster):
    urls, stats_dir = cluster["urls"], cluster["dir"] / "stats"

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS + 8, keepalive_expiry=2.0)
        clients = [httpx.AsyncClient(base_url=u, timeout=DEADLINE_S, limits=limits) for u in urls]
        admins = [httpx.AsyncClient(base_url=u, timeout=DEADLINE_S) for u in urls]
        try:
            stop_at = time.monotonic() + DEADLINE_S
            expected = {}
            for ref in [f"{n}@{v}" for n in NAMES for v in ("v1", "v2")]:
                status, model, text, err, _, _ = await _stream(admins[0], ref, "x")
                assert status == 200 and model == ref and err is None, (status, text, err)
                expected[ref] = text
            assert len(set(expected.values())) == len(expected), "adapters must give distinguishable outputs"
            baseline = sum(s["loads"] for s in read_replica_stats(stats_dir))
            results, timeline, notes, done = [], Timeline(), {}, asyncio.Event()
            tasks = [asyncio.create_task(_client(clients[i % 2], i % 2, i, done, results)) for i in range(CLIENTS)]
            t0 = time.monotonic()
            try:
                await _schedule(admins, results, timeline, stats_dir, notes, stop_at)
            finally:
                done.set()
                await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t0
            metrics = [(await a.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})).text for a in admins]
            return expected, baseline, results, timeline, notes, elapsed, metrics
        finally:
            for c in clients + admins:
                await c.aclose()

    expected, baseline, results, timeline, notes, elapsed, metrics = asyncio.run(main())
    stats = read_replica_stats(stats_dir)
    loads = sum(s["loads"] for s in stats) - baseline
    sequence = [f"{r['name']}@{v}" for r in sorted(results, key=lambda r: r["t0"])
                for v in [(r.get("model") or "@?").split("@")[1]] if r["status"] == 200]
    random_loads = _random_placement_loads(sequence)
    retries = sum(_metric(m, "gemtune_cluster_retries_total") for m in metrics)
    lost = [r for r in results if r.get("error")]
    statuses = collections.Counter(str(r["status"]) for r in results)
    print(f"\ncluster: {len(results)} responses in {elapsed:.1f} s over 2 gateways and {REPLICAS} replicas "
          f"({dict(statuses)}), {notes['changes']} route flips, killed replica pid {notes['killed']['pid']} holding "
          f"{notes['killed']['inflight']} requests; retried before the first token: {retries:.0f}; ended after "
          f"streaming: {len(lost)}")
    print(f"adapter loads during the load: {loads} with Ray Serve multiplexing vs {random_loads:.1f} for random "
          f"placement of the same {len(sequence)} requests (mean of 50 draws); per replica: "
          f"{[(s['pid'], s['loads'], s['served']) for s in stats]}")
    assert all(s in ("200", "429") for s in statuses), f"unexpected answers: {dict(statuses)}"
    assert all(r["retry_after"] for r in results if r["status"] == 429)
    ok = [r for r in results if r["status"] == 200]
    assert len(ok) >= 10 * (notes["changes"] + 1)
    wrong_route = [r for r in ok if r["model"] is None or r["model"].split("@")[1]
                   not in timeline.allowed(r["name"], r["t0"], r["t1"])]
    assert not wrong_route, f"{len(wrong_route)} answers from a version not routed at admission: {wrong_route[:3]}"
    assert all(r["header"] == r["model"] and r["model"].split("@")[0] == r["name"] for r in ok)
    wrong_text = [r for r in ok if not r["error"] and r["text"] != expected[r["model"]]]
    assert not wrong_text, f"{len(wrong_text)} answers whose text is not their version's: {wrong_text[:3]}"
    for r in lost:  # a request that had streamed and lost its replica ends with a clear error event
        why = {k: r.get(k) for k in ("name", "model", "text", "error", "streamed", "t0", "t1")}
        assert r["streamed"] and "replica" in r["error"], f"lost before showing text, or a wrong error: {why}"
        assert r["t1"] >= notes["killed_at"], f"lost before the kill: {why}"
    assert retries >= 1, "the killed replica held unstarted requests: they must have been retried elsewhere"
    # Ray Serve's default (power-of-two-choices) routing without the multiplexed id loads about as often as random
    # (measured: 644 vs 654); with it, a small fraction (36 vs 640). Half is the line between the two.
    assert 2 * loads < random_loads, f"multiplexing loaded {loads} adapters, random placement {random_loads:.1f}"
