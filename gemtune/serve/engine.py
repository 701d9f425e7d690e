"""The embedded serving engine: one base model, many LoRA adapters, mixed in every batch.

Interface (the API and the benchmarks code against exactly this):

```python
class QueueFull(Exception): retry_after: float        # submit() with max_queue requests waiting (never load_adapter)
class AdapterError(UserError)                         # bad/incompatible adapter dir, or an adapter key not loaded
class RequestFailed(RuntimeError): reason: str        # raised by a Handle: this request failed ("sampling",
                                                      # "numerics"), or the shared step did ("engine"); others go on
@dataclass class GenRequest: prompt_ids: list[int]; adapter: str | None; max_tokens: int; temperature: float = 0.0
    top_p: float = 1.0; seed: int | None = None; stop_ids: list[int] | None = None  (None: the family's stop tokens)
    ignore_eos: bool = False                          # True: only explicit stop_ids stop generation (benchmarks)
    tenant: str | None = None                         # admission is round-robin across tenants (None: one bucket)
    grammar: GrammarSpec | None = None                # decode under a grammar (JSON Schema, any JSON object, a
                                                      # tool call; engine_grammar); GrammarError (400) if it cannot
@dataclass class TokenEvent: token_id: int | None; text: str (incremental detokenised text);
    finish_reason: "stop" | "length" | "cancelled" | None; prompt_tokens: int; completion_tokens: int
class Engine(base, *, dtype="float32", max_batch=32, max_loras=8, max_lora_rank=64, max_queue=256,
             max_model_len=2048, seed=0, max_cpu_loras=None (= max_loras),
             prefill_chunk=256, prefill_budget=1024, prefix_share_min=8)   # tuning; defaults are fine
    .tokenizer .family .model_name
    .start() / .shutdown()                            # the background scheduler thread
    .load_adapter(key, path)                          # PEFT dir into host memory; hot; never refused for being busy
    .unload_adapter(key)                              # queued/in-flight requests for it finish first, new are refused
    .loaded_adapters() -> list[str]                   # host-resident keys: what submit() accepts
    .submit(GenRequest) -> Handle                     # thread-safe; UserError for bad limits/sampling values,
                                                      # AdapterError (not loaded), QueueFull when max_queue are waiting
    .generate(prompts, adapters, max_tokens, **kw) -> list[str]     # synchronous batch helper (starts the engine)
    .stats() -> dict                                  # queue_depth, running, loaded_adapters, slot_adapters,
                                                      # adapter_refs{key: n}, tenants{t: {queued, running}},
                                                      # requests_total, requests_finished{reason}, token totals,
                                                      # prefix_shared_tokens_total, per_adapter{key: counts} (/metrics),
                                                      # compute{dtype, lm_head path, cpu, cpu_capability, native_bf16},
                                                      # grammar_states (live matchers), grammars_cached
Handle: `async for ev in handle` (from any asyncio loop, in any thread), `for ev in handle` (blocking),
        .cancel() (client disconnect: frees the batch slot at the next step), .result() -> (text, token_ids, reason)
        .admitted: the engine's admission counter when it got a batch row (None while queued)
```

Adapters live in two tiers, as vLLM's CPU LoRA cache (max_cpu_loras) and GPU slots (max_loras): `load_adapter` reads,
validates and hashes an adapter into host memory at once (LRU-evicting idle host adapters beyond max_cpu_loras; when
every one is pinned by queued or running requests the cache holds one more, trimmed as they drain — an operator's
load is never refused because tenants are busy). An adapter takes one of `max_loras` engine slots (its columns in the
batched LoRA pack) when a request for it is admitted: a free slot, else the least recently used slot no running row
uses. When every slot has running rows the request waits in the (bounded) queue, and that slot is reserved for it:
no new rows are admitted into the reserved slot, so it drains within its rows' max_tokens and the waiting adapter
takes it — no adapter waits forever behind busy ones.

Admission is fair across tenants: waiting requests sit in one FIFO per `tenant`, and each free row goes to the first
tenant in turn order that has an admissible request, which then goes to the back of the turn. One tenant flooding the
queue gets one row in turn with everyone else, not all of them.

Isolation: sampling parameters are validated at submit (finite temperature >= 0, below 1e-5 greedy; top_p in (0, 1];
seed an integer in [-2^63, 2^64)), every resource a request takes is taken last and released on every path, and a row
whose token cannot be chosen (non-finite activations, a sampling error) fails alone with RequestFailed while the rest
of the batch continues with the same tokens it would have had without it.

Event semantics: one event per generated token (`token_id`, its text delta); the last event has `finish_reason`.
A stop token ends generation without being emitted (final event: token_id None, text = any held-back text) and
is not part of `token_ids`/`text`, but it is counted in `completion_tokens` (it was computed, as vLLM counts it).
The concatenated `text` of all events equals `tokenizer.decode(token_ids, skip_special_tokens=True)`.

How it works: a scheduler thread repeatedly (1) admits waiting requests into free batch rows, (2) builds one
flat step out of every running row's next token plus prefill chunks of newly admitted prompts (continuous
batching: requests join and leave between steps), (3) runs one forward for all of them — one base GEMM per linear
layer with per-row LoRA deltas for whichever adapter each row uses (`lora_batch`), attention over our own
preallocated KV cache (`kv_cache`), the LM head only on rows that need a next token (`engine_model`), then
(4) picks tokens (greedy, or sampled with the request's own generator so a seeded request does not depend on its
batch-mates) and streams events. Greedy outputs equal PEFT's greedy outputs for the same adapter alone.

Prefix sharing: a new request whose prompt starts like a running request's (same adapter) copies those positions'
keys/values from that row instead of recomputing them (a shared system prompt is computed once per adapter).
Exact: the copied values are what the new row would compute. Where bf16 is native (AVX512-BF16/AMX, a GPU) the fp32
LM head's greedy argmax is screened in bf16 and confirmed in fp32 with a proven error bound (`engine_sampling`), so
it too stays exact; where the CPU only emulates bf16 (AVX2-only) the screen is FBGEMM's fp16-weight GEMM with fp32
FMAs, equally exact — no stage leans on emulated math (`engine_model`, head paths; `stats()["compute"]` says which
one runs).

CPU note: on a machine shared with other busy processes, set OMP_WAIT_POLICY=PASSIVE before torch is imported:
OpenMP's default spin-waiting then makes multi-threaded GEMMs many times slower (bench/serve.py does this).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

import torch

from gemtune.errors import UserError
from gemtune.serve.engine_grammar import Grammars
from gemtune.serve.engine_stream import Detokenizer, GenRequest, Handle, QueueFull, RequestFailed, TokenEvent
from gemtune.serve.lora_batch import AdapterError, LoadedAdapter, LoRAPack, read_adapter

__all__ = ["AdapterError", "Engine", "GenRequest", "Handle", "QueueFull", "RequestFailed", "TokenEvent"]

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes (int64 and uint64)


def _short(x) -> str:
    if isinstance(x, int) and x.bit_length() > 128:  # repr of a huge int is slow, or refused past 4300 digits
        return f"{'-' if x < 0 else ''}an integer of {x.bit_length()} bits"
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."


# --------------------------------------------------------------------------------------------------- sequences
class _Seq:
    """Scheduler-side state of one request."""

    __slots__ = ("req", "handle", "adapter_key", "uid", "prompt", "out", "n_cached", "stop", "gen", "detok",
                 "cancelled", "finished", "completion", "tenant", "grammar")

    def __init__(self, req: GenRequest, uid: str | None, stop: set[int], gen: torch.Generator | None, detok):
        self.req = req
        self.adapter_key = req.adapter
        self.uid = uid  # the loaded adapter instance (survives an unload/replace while in flight)
        self.prompt = list(req.prompt_ids)
        self.out: list[int] = []
        self.n_cached = 0  # positions written to the KV cache
        self.stop = stop
        self.gen = gen
        self.detok = detok
        self.cancelled = False
        self.finished = False
        self.completion = 0
        self.handle: Handle | None = None
        self.tenant = req.tenant
        self.grammar = None  # its grammar matcher while a constrained request is in the engine


# ------------------------------------------------------------------------------------------------------ engine
class Engine:
    """One base model; adapters hot-loaded into an LRU; a scheduler thread doing continuous mixed-adapter batching."""

    def __init__(self, base: str | Path, *, dtype: str = "float32", max_batch: int = 32, max_loras: int = 8,
                 max_lora_rank: int = 64, max_queue: int = 256, max_model_len: int = 2048, seed: int = 0,
                 max_cpu_loras: int | None = None,
                 prefill_chunk: int = 256, prefill_budget: int = 1024, prefix_share_min: int = 8):
        from gemtune.base.families import family_of
        from gemtune.base.loader import load_base
        from gemtune.base.templates import stop_token_ids
        from gemtune.serve.engine_model import ModelRunner

        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        for name, val in (("max_batch", max_batch), ("max_loras", max_loras), ("max_lora_rank", max_lora_rank),
                          ("max_queue", max_queue), ("max_model_len", max_model_len), ("max_cpu_loras", max_cpu_loras)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise UserError(f"{name} must be a positive integer, got {val!r}", field=name)
        if max_cpu_loras < max_loras:
            raise UserError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})",
                            field="max_cpu_loras")
        model, tok = load_base(base, dtype=dtype)
        self.tokenizer = tok
        self.family = family_of(model)
        self.model_name = getattr(model.config, "_name_or_path", None) or Path(str(base)).name
        self.model_name = Path(str(self.model_name)).name or str(base)
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit and max_model_len > limit:
            raise UserError(f"max_model_len {max_model_len} exceeds the model's {limit} positions", field="max_model_len")
        self.max_batch, self.max_loras, self.max_lora_rank = max_batch, max_loras, max_lora_rank
        self.max_queue, self.max_model_len, self.max_cpu_loras = max_queue, max_model_len, max_cpu_loras
        self.prefill_budget = max(prefill_budget, 1)
        self.prefix_share_min = max(int(prefix_share_min), 0)  # 0 disables prefix sharing
        self.runner = ModelRunner(model, max_batch=max_batch, max_model_len=max_model_len, prefill_chunk=prefill_chunk)
        self.vocab_size = self.runner.lm_head.out_features
        self.default_stop = set(stop_token_ids(tok, self.family))
        self.grammars = Grammars(tok, self.vocab_size, stop_token_ids(tok, self.family))
        self._grammar_states = 0  # live matchers: constrained requests queued or running
        self._seed_rng = torch.Generator().manual_seed(seed)
        # state shared with the scheduler thread, guarded by _cv's lock (re-entrant: whoever holds it can submit
        # several requests that the scheduler then sees together, in one admission pass)
        self._cv = threading.Condition(threading.RLock())
        self._queues: dict[str | None, deque[_Seq]] = {}  # tenant -> its waiting requests, FIFO
        self._turn: deque[str | None] = deque()  # tenants with waiting requests, whose turn first
        self._n_waiting = 0
        self._rows: list[_Seq] = []  # running rows; [0, _n_decode) decoding, the rest prefilling
        self._n_decode = 0
        self._adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()  # key -> adapter in host memory, LRU order
        self._uid: dict[str, str] = {}  # key -> uid of its live instance
        self._instances: dict[str, LoadedAdapter] = {}  # uid -> adapter (live and draining)
        self._refs: dict[str, int] = {}  # uid -> queued + running requests
        self._slots: OrderedDict[str, None] = OrderedDict()  # uids holding an engine slot (the pack), LRU order
        self._reserved: dict[str, str] = {}  # slot uid -> uid of the waiting adapter it drains for
        self._pack: LoRAPack = LoRAPack.build([], self.runner.linears, self.runner.dtype)
        self._pack_dirty = False
        self._uids = itertools.count(1)
        self._admissions = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats = {"requests": 0, "finished": {"stop": 0, "length": 0, "cancelled": 0, "error": 0},
                       "prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "forward_seconds": 0.0,
                       "prefix_shared_tokens": 0}
        self._per_adapter: dict[str, dict[str, int]] = {}
        self.step_log: deque[tuple[int, int, float]] = deque(maxlen=4096)  # (decode rows, prefill tokens, seconds)
        self._finish_times: deque[float] = deque(maxlen=256)  # recent completions, for Retry-After

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Engine":
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="gemtune-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the scheduler; requests still queued or running finish as cancelled."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cv:
            seqs = [s for q in self._queues.values() for s in q] + list(self._rows)
            self._queues.clear()
            self._turn.clear()
            self._n_waiting = 0
            self._rows, self._n_decode = [], 0
            self._thread = None
        for s in seqs:
            self._finish(s, "cancelled")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # -------------------------------------------------------------------------------------------- adapters
    def load_adapter(self, key: str, path: str | Path) -> None:
        """Load (or replace) adapter `key` from a PEFT directory into host memory, without pausing generation.

        Never refused because requests are running: the adapter takes an engine slot when a request for it is
        admitted (see the module docstring). Loading the same key from the same path with the same bytes again only
        marks it recently used. Beyond `max_cpu_loras` the least recently used adapter with no queued or running
        request leaves host memory; while every one is pinned the cache holds more (at most the pinned ones plus the
        one just loaded), trimmed as they drain. AdapterError for a directory it cannot serve.
        """
        if not isinstance(key, str) or not key:
            raise AdapterError("adapter key must be a non-empty string", field="adapter")
        path = Path(path)
        ad = read_adapter(key, path, self.runner.linears, self.max_lora_rank, self.runner.dtype)
        with self._cv:
            cur = self._adapters.get(key)
            if cur is not None and cur.path == str(path) and cur.sha256 == ad.sha256:
                self._adapters.move_to_end(key)
                return
            if cur is not None:
                self._drop_key(key)
            uid = f"{key}#{next(self._uids)}"
            ad.key = uid
            self._adapters[key] = ad
            self._uid[key] = uid
            self._instances[uid] = ad
            self._refs.setdefault(uid, 0)
            self._trim_host(keep=key)
            self._cv.notify_all()  # a reserved slot may now be for nobody

    def unload_adapter(self, key: str) -> None:
        """Forget `key`: new requests for it are refused at once; requests already queued or running finish normally."""
        with self._cv:
            if key not in self._adapters:
                raise AdapterError(f"adapter {key!r} is not loaded", field="adapter")
            self._drop_key(key)

    def loaded_adapters(self) -> list[str]:
        """Adapters in host memory (what `submit` accepts), least recently used first."""
        with self._cv:
            return list(self._adapters)

    def _drop_key(self, key: str) -> None:
        """Remove a key from the table; its instance stays (in its slot) while requests still use it (lock held)."""
        del self._adapters[key]
        uid = self._uid.pop(key)
        if self._refs.get(uid, 0) == 0:
            self._drop_instance(uid)

    def _drop_instance(self, uid: str) -> None:
        """An instance nobody uses leaves host memory and its slot (lock held)."""
        self._instances.pop(uid, None)
        self._refs.pop(uid, None)
        if uid in self._slots:
            del self._slots[uid]
            self._pack_dirty = True
        self._reserved = {v: w for v, w in self._reserved.items() if uid not in (v, w)}

    def _trim_host(self, keep: str | None = None) -> None:
        """Evict least recently used idle adapters while host memory holds more than max_cpu_loras, never `keep`
        (the one just loaded) (lock held)."""
        while len(self._adapters) > self.max_cpu_loras:
            victim = next((k for k in self._adapters if k != keep and self._refs.get(self._uid[k], 0) == 0), None)
            if victim is None:
                return  # every one is pinned by a request: trimmed again as they finish
            self._drop_key(victim)

    def _rebuild_pack(self) -> None:
        self._pack = LoRAPack.build([self._instances[u] for u in self._slots], self.runner.linears, self.runner.dtype)
        self._pack_dirty = False

    def _release(self, seq: _Seq) -> None:
        """A request left the engine: drop its grammar state, unpin its adapter instance, dropping a drained one
        (lock held)."""
        if seq.grammar is not None:
            seq.grammar = None
            self._grammar_states -= 1
        if seq.uid is None:
            return
        uid, seq.uid = seq.uid, None
        self._refs[uid] -= 1
        if self._refs[uid] == 0:
            if uid not in self._uid.values():
                self._drop_instance(uid)
            elif len(self._adapters) > self.max_cpu_loras:
                self._trim_host()

    # ---------------------------------------------------------------------------------------------- submit
    def _validate(self, req: GenRequest) -> None:
        n = len(req.prompt_ids) if isinstance(req.prompt_ids, (list, tuple)) else -1
        if n < 1:
            raise UserError("prompt must hold at least one token", field="prompt")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise UserError(f"max_tokens must be a positive integer, got {req.max_tokens!r}", field="max_tokens")
        if n >= self.max_model_len:
            raise UserError(f"prompt is {n} tokens; the limit is {self.max_model_len - 1} (max_model_len "
                            f"{self.max_model_len} minus at least one generated token)", field="prompt")
        if n + req.max_tokens > self.max_model_len:
            raise UserError(f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds max_model_len "
                            f"{self.max_model_len}; max_tokens can be at most {self.max_model_len - n}",
                            field="max_tokens")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in req.prompt_ids):
            raise UserError(f"prompt token ids must be integers in [0, {self.vocab_size})", field="prompt")
        real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if not real(req.temperature) or not (0 <= req.temperature < float("inf")):
            raise UserError(f"temperature must be a finite number >= 0, got {req.temperature!r}", field="temperature")
        if not real(req.top_p) or not (0 < req.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {req.top_p!r}", field="top_p")
        if req.seed is not None and (not isinstance(req.seed, int) or isinstance(req.seed, bool)
                                     or not SEED_MIN <= req.seed <= SEED_MAX):
            raise UserError(f"seed must be an integer in [-2^63, 2^64), got {_short(req.seed)}", field="seed")
        if req.stop_ids is not None and (not isinstance(req.stop_ids, (list, tuple, set))
                                         or any(not isinstance(t, int) for t in req.stop_ids)):
            raise UserError("stop_ids must be token ids", field="stop")
        if req.tenant is not None and not isinstance(req.tenant, str):
            raise UserError(f"tenant must be a string or None, got {type(req.tenant).__name__}", field="tenant")

    def submit(self, req: GenRequest) -> Handle:
        """Queue a request; thread-safe. Raises UserError (limits, sampling values), AdapterError (adapter not
        loaded), QueueFull (max_queue waiting), RuntimeError (engine not started).

        Everything that can fail happens before the request takes anything; what it takes (its adapter's reference,
        its queue entry) is released on every path from then on (finish, cancel, error, shutdown).
        """
        from gemtune.serve.engine_sampling import needs_generator

        self._validate(req)
        stop = set(req.stop_ids) if req.stop_ids is not None else (set() if req.ignore_eos else set(self.default_stop))
        gen = None
        if needs_generator(req):
            if req.seed is not None:
                seed = req.seed % 2**64  # manual_seed's own mapping of negative seeds, made explicit
            else:
                with self._cv:
                    seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
            gen = torch.Generator().manual_seed(seed)
        matcher = self.grammars.matcher(req.grammar) if req.grammar is not None else None  # GrammarError: 400
        seq = _Seq(req, None, stop, gen, Detokenizer(self.tokenizer))
        seq.handle = Handle(lambda: self._cancel(seq))
        with self._cv:
            if self._stop or self._thread is None:
                raise RuntimeError("engine is not running; call start() first")
            if self._n_waiting >= self.max_queue:
                raise QueueFull(f"{self._n_waiting} requests are waiting (max_queue {self.max_queue})",
                                retry_after=self._retry_after())
            if req.adapter is not None:
                if req.adapter not in self._adapters:
                    raise AdapterError(f"adapter {req.adapter!r} is not loaded", field="adapter")
                self._adapters.move_to_end(req.adapter)
                seq.uid = self._uid[req.adapter]
            # nothing below can fail: the reference and the queue entry are taken together
            if seq.uid is not None:
                self._refs[seq.uid] += 1
            if matcher is not None:
                seq.grammar = matcher
                self._grammar_states += 1
            q = self._queues.get(seq.tenant)
            if q is None:
                q = self._queues[seq.tenant] = deque()
                self._turn.append(seq.tenant)
            q.append(seq)
            self._n_waiting += 1
            self._stats["requests"] += 1
            self._cv.notify_all()
        return seq.handle

    def _dequeue(self, seq: _Seq) -> bool:
        """Take a waiting request out of its tenant's queue; False when it is not waiting (lock held)."""
        q = self._queues.get(seq.tenant)
        if q is None or seq not in q:
            return False
        q.remove(seq)
        self._n_waiting -= 1
        if not q:
            del self._queues[seq.tenant]
            self._turn.remove(seq.tenant)
        return True

    def _cancel(self, seq: _Seq) -> None:
        with self._cv:
            if seq.finished:
                return
            seq.cancelled = True
            queued = self._dequeue(seq)
            if queued:
                self._cv.notify_all()  # a slot reserved for it may be for nobody now
        if queued:
            self._finish(seq, "cancelled")

    def _retry_after(self) -> float:
        """Seconds until the queue has probably drained, from the recent completion rate (lock held)."""
        times, now = self._finish_times, time.monotonic()
        while times and times[0] < now - 60:  # only the last minute says how fast we drain now
            times.popleft()
        span = now - times[0] if times else 0.0
        if len(times) < 2 or span <= 0:
            return 1.0
        rate = len(times) / span
        return float(min(30.0, max(0.5, self._n_waiting / rate)))

    # -------------------------------------------------------------------------------------------- helpers
    def generate(self, prompts: list[list[int]], adapters: list[str | None], max_tokens: int, **kw) -> list[str]:
        """Generate for a batch of prompts (one adapter key or None each); blocks; starts the engine if needed."""
        if len(adapters) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(adapters)} adapters", field="adapters")
        self.start()
        handles: list[Handle] = []
        for p, a in zip(prompts, adapters):
            while True:
                try:
                    handles.append(self.submit(GenRequest(prompt_ids=list(p), adapter=a, max_tokens=max_tokens, **kw)))
                    break
                except QueueFull:
                    pending = next((h for h in handles if not h.done), None)
                    if pending is not None:
                        pending.result()
        return [h.result()[0] for h in handles]

    def stats(self) -> dict:
        with self._cv:
            tenants: dict[str | None, dict[str, int]] = {}
            for t, q in self._queues.items():
                tenants.setdefault(t, {"queued": 0, "running": 0})["queued"] = len(q)
            for r in self._rows:
                tenants.setdefault(r.tenant, {"queued": 0, "running": 0})["running"] += 1
            key_of = {uid: k for k, uid in self._uid.items()}
            out = {
                "queue_depth": self._n_waiting,
                "running": len(self._rows),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "loaded_adapters": list(self._adapters),
                "max_loras": self.max_loras,
                "max_cpu_loras": self.max_cpu_loras,
                "slot_adapters": [key_of.get(u, u) for u in self._slots],  # a draining instance shows as key#n
                "adapter_refs": {key_of.get(u, u): n for u, n in self._refs.items()},
                "tenants": tenants,
                "requests_total": self._stats["requests"],
                "requests_finished": dict(self._stats["finished"]),
                "prompt_tokens_total": self._stats["prompt_tokens"] + self._stats["prefix_shared_tokens"],
                "prompt_tokens_computed_total": self._stats["prompt_tokens"],
                "generated_tokens_total": self._stats["generated_tokens"],
                "steps_total": self._stats["steps"],
                "forward_seconds_total": round(self._stats["forward_seconds"], 6),
                "prefix_shared_tokens_total": self._stats["prefix_shared_tokens"],
                "kv_cache_bytes": self.runner.cache.nbytes(),
                "grammar_states": self._grammar_states,
                "grammars_cached": self.grammars.cached(),
                "lm_head_fallback_rows": getattr(self.runner.screened_head, "fallbacks", 0),
                "compute": self.runner.compute(),
                "per_adapter": {k: dict(v) for k, v in self._per_adapter.items()},
            }
        return out

    # ------------------------------------------------------------------------------------------- scheduler
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._n_waiting and not self._rows:
                    self._cv.wait()
                if self._stop:
                    return
                self._admit()
                pack = self._pack
            try:
                with torch.inference_mode():
                    self._step(pack)
            except Exception as e:  # a bug must not hang clients: fail the running requests, keep serving
                self._fail_running(e)

    def _admit(self) -> None:
        """Move queued requests into free rows, fairly across tenants (lock held). New rows start prefilling at the
        end of the batch.

        Each free row goes to the first tenant in turn order with an admissible request (its oldest one whose
        adapter has, or can take, an engine slot); that tenant then goes to the back of the turn. A tenant with
        nothing admissible keeps its place, so it is first once its request can run.
        """
        self._prune_reservations()
        while len(self._rows) < self.max_batch and self._turn:
            pick = None
            for i, tenant in enumerate(self._turn):
                pick = next((s for s in self._queues[tenant] if self._take_slot(s)), None)
                if pick is not None:
                    break
            if pick is None:
                break
            del self._turn[i]
            q = self._queues[tenant]
            q.remove(pick)
            self._n_waiting -= 1
            if q:
                self._turn.append(tenant)
            else:
                del self._queues[tenant]
            pick.handle.admitted = next(self._admissions)
            self._rows.append(pick)
        if self._pack_dirty:
            self._rebuild_pack()

    def _take_slot(self, s: _Seq) -> bool:
        """Whether `s` can run now: its adapter holds an engine slot or takes one; else the slot that will drain
        first is reserved for it (at most one per waiting adapter, and half the slots) (lock held)."""
        uid = s.uid
        if uid is None:
            return True
        if uid in self._slots:
            if uid in self._reserved:  # draining for a waiting adapter: no new rows here
                return False
            self._slots.move_to_end(uid)
            return True
        if len(self._slots) >= self.max_loras:
            busy = {r.uid for r in self._rows}
            mine = [v for v, w in self._reserved.items() if w == uid]
            idle = [v for v in self._slots if v not in busy and (v not in self._reserved or v in mine)]
            if not idle:
                if not mine and len(self._reserved) < max(1, self.max_loras // 2):
                    running = {v: 0 for v in self._slots if v not in self._reserved}
                    for r in self._rows:
                        if r.uid in running:
                            running[r.uid] += 1
                    if running:  # fewest running rows drains first; ties: least recently used
                        self._reserved[min(running, key=running.__getitem__)] = uid
                return False
            # a slot whose adapter nobody waits for, least recently used first
            victim = mine[0] if mine and mine[0] in idle else min(idle, key=lambda v: self._refs.get(v, 0) > 0)
            self._slots.pop(victim)
        self._reserved = {v: w for v, w in self._reserved.items() if w != uid}
        self._slots[uid] = None
        self._pack_dirty = True
        return True

    def _prune_reservations(self) -> None:
        """Forget reservations for adapters nobody waits for any more, or of slots already gone (lock held)."""
        if not self._reserved:
            return
        waiting = {s.uid for q in self._queues.values() for s in q}
        self._reserved = {v: w for v, w in self._reserved.items() if v in self._slots and w in waiting}

    def _fail_running(self, err: Exception) -> None:
        """Last resort when the shared step itself raised (a bug, not a request's values): fail the running rows."""
        import traceback

        traceback.print_exc()
        with self._cv:
            rows, self._rows, self._n_decode = self._rows, [], 0
        for r in range(len(rows)):
            self.runner.cache.clear_row(r)
        for s in rows:
            self._fail(s, RequestFailed(f"{type(err).__name__}: {err}", "engine"))

    def _fail(self, s: _Seq, err: RequestFailed) -> None:
        """Finish one request with an error (its row already removed): release what it holds, wake its reader."""
        with self._cv:
            s.finished = True
            self._release(s)
            self._stats["finished"]["error"] += 1
            self._finish_times.append(time.monotonic())
        s.handle._fail(err)

    def _step(self, pack: LoRAPack) -> None:
        from gemtune.serve.engine_model import Step
        from gemtune.serve.engine_sampling import choose_tokens

        self._drop_cancelled()
        rows, D = self._rows, self._n_decode
        if not rows:
            return
        ids, pos, trow, keys = [], [], [], []
        for r in range(D):
            s = rows[r]
            ids.append(s.out[-1])
            pos.append(s.n_cached)
            trow.append(r)
            keys.append(s.uid)
        pre_rows, pre_start, pre_len, copies = [], [], [], []
        budget = self.prefill_budget
        covered = {r: rows[r].n_cached for r in range(len(rows))}  # prompt positions cached once this step ran
        followers: set[int] = set()
        shared = 0
        for r in range(D, len(rows)):
            s = rows[r]
            if s.n_cached == 0 and self.prefix_share_min and budget > 0:
                src, u = self._share_source(r, s, covered, followers)
                if u < 0:
                    continue  # an earlier row is computing our prefix right now: borrow it next step
                if src is not None:
                    copies.append((src, r, u))
                    followers.add(r)
                    s.n_cached = covered[r] = u
                    shared += u
            c = min(len(s.prompt) - s.n_cached, self.runner.prefill_chunk, budget)
            if c <= 0:
                break
            covered[r] = s.n_cached + c
            budget -= c
            chunk = s.prompt[s.n_cached:s.n_cached + c]
            ids += chunk
            pos += range(s.n_cached, s.n_cached + c)
            trow += [r] * c
            keys += [s.uid] * c
            pre_rows.append(r)
            pre_start.append(s.n_cached)
            pre_len.append(c)
        # rows whose next token we need: every decode row, and prefill rows whose prompt ends in this chunk
        logit_rows, logit_idx = list(range(D)), list(range(D))
        off = D
        for r, st, c in zip(pre_rows, pre_start, pre_len):
            if st + c == len(rows[r].prompt):
                logit_rows.append(r)
                logit_idx.append(off + c - 1)
            off += c
        L = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        step = Step(ids=L(ids), pos=L(pos), rows=L(trow), n_decode=D,
                    decode_len=L([rows[r].n_cached + 1 for r in range(D)]), pre_rows=L(pre_rows),
                    pre_start=L(pre_start), pre_len=L(pre_len), logit_idx=L(logit_idx), adapter_keys=keys,
                    copies=copies)
        t0 = time.perf_counter()
        with self.runner.threads.step(len(ids)):
            hidden = self.runner.forward(step, pack)
            tokens, errors = choose_tokens(self.runner, hidden, [rows[r] for r in logit_rows], self.grammars)
        dt = time.perf_counter() - t0
        self.step_log.append((D, sum(pre_len), dt))
        for r in range(D):
            rows[r].n_cached += 1
        for r, c in zip(pre_rows, pre_len):
            rows[r].n_cached += c
        self._stats["prefix_shared_tokens"] += shared
        self._after_step(logit_rows, tokens, dt, sum(pre_len), errors)

    def _share_source(self, r: int, s: _Seq, covered: dict[int, int], followers: set[int]) -> tuple[int | None, int]:
        """Prefix sharing: a running row with the same adapter whose cache already holds (or this step writes)
        the longest common prompt prefix with `s` lends it: its K/V for those positions are copied layer by layer
        instead of recomputed (identical values: same tokens, positions and adapter).

        Returns (row, n) to borrow n positions from, (None, 0) to prefill alone, or (None, -1) to wait a step for
        an earlier row that is still prefilling a longer shared prefix. Only rows before `r` are considered (their
        writes for this step are planned), so waiting never forms a cycle and the earliest row always progresses.
        A lender must still hold the last sliding window of the prefix in its ring layers.
        """
        best, best_u, wait_u = None, 0, 0
        limit = len(s.prompt) - 1  # the last prompt token is always computed: it yields the first new token
        cache = self.runner.cache
        for q in range(r):
            other = self._rows[q]
            if q in followers or other.uid != s.uid or other.prompt[0] != s.prompt[0]:
                continue
            a, b = s.prompt, other.prompt
            n, u = min(limit, len(b)), 0
            while u < n and a[u] == b[u]:
                u += 1
            if u < self.prefix_share_min:
                continue
            if covered[q] < u:
                if q >= self._n_decode:  # still prefilling: it will hold u positions shortly
                    wait_u = max(wait_u, u)
                u = covered[q]
            if u > best_u and cache.can_lend(covered[q] + (1 if q < self._n_decode else 0), u):
                best, best_u = q, u
        if wait_u > best_u:
            return None, -1
        if best_u < self.prefix_share_min:
            return None, 0
        return best, best_u

    def _after_step(self, logit_rows: list[int], tokens: list[int | None], dt: float, prompt_tokens: int,
                    errors: dict[int, tuple[str, str]] | None = None) -> None:
        rows = self._rows
        events: list[tuple[_Seq, TokenEvent]] = []
        finished: dict[int, tuple[_Seq, str, int | None, str]] = {}  # id(seq) -> (seq, reason, last token, text)
        failed: dict[int, tuple[str, str]] = {}  # id(seq) -> (reason, why): this row alone ends with an error
        for i, (r, tok) in enumerate(zip(logit_rows, tokens)):
            s = rows[r]
            if errors and i in errors:
                failed[id(s)] = errors[i]
                continue
            s.completion += 1
            if s.grammar is not None:
                if not s.grammar.accept_token(tok):  # cannot happen: the token came from the grammar's mask
                    failed[id(s)] = ("engine", f"the grammar refused token {tok}")
                    continue
                if s.grammar.is_terminated():  # the grammar ended on a stop token: not emitted, as any stop
                    finished[id(s)] = (s, "stop", None, "")
                    continue
            if tok in s.stop:
                finished[id(s)] = (s, "stop", None, "")
                continue
            s.out.append(tok)
            text = s.detok.add(tok)
            if len(s.out) >= s.req.max_tokens:
                finished[id(s)] = (s, "length", tok, text)
                continue
            events.append((s, TokenEvent(tok, text, None, len(s.prompt), s.completion)))
        # prefills that just produced their first token join the decode region [0, D)
        for r in sorted(r for r in logit_rows if r >= self._n_decode):
            self._swap(r, self._n_decode)
            self._n_decode += 1
        for s, ev in events:
            s.handle._push(ev)
        with self._cv:
            self._stats["steps"] += 1
            self._stats["forward_seconds"] += dt
            self._stats["prompt_tokens"] += prompt_tokens
            self._stats["generated_tokens"] += len(tokens) - len(failed)
            for s, *_ in finished.values():
                s.finished = True
        for r in range(len(rows) - 1, -1, -1):
            s = rows[r]
            hit = finished.get(id(s))
            if hit is not None:
                self._remove_row(r)
                self._finish(hit[0], hit[1], last_token=hit[2], text=hit[3])
            elif id(s) in failed:
                self.runner.cache.clear_row(r)  # stale inf/NaN keys would reach the row's next owner (0 * NaN)
                self._remove_row(r)
                reason, why = failed[id(s)]
                self._fail(s, RequestFailed(why, reason))

    def _drop_cancelled(self) -> None:
        for r in range(len(self._rows) - 1, -1, -1):
            s = self._rows[r]
            if s.cancelled:
                self._remove_row(r)
                self._finish(s, "cancelled")

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        rows = self._rows
        self.runner.cache.swap_rows(a, b, rows[a].n_cached, rows[b].n_cached)
        rows[a], rows[b] = rows[b], rows[a]

    def _move(self, src: int, dst: int) -> None:
        rows = self._rows
        self.runner.cache.move_row(src, dst, rows[src].n_cached)
        rows[dst] = rows[src]

    def _remove_row(self, r: int) -> None:
        """Take row r out, keeping rows compact with decode rows first (one or two row copies in the cache)."""
        rows = self._rows
        last = len(rows) - 1
        if r < self._n_decode:
            d_last = self._n_decode - 1
            self._move(d_last, r)
            if last != d_last:
                self._move(last, d_last)
            self._n_decode -= 1
        else:
            self._move(last, r)
        with self._cv:
            rows.pop()

    def _finish(self, s: _Seq, reason: str, last_token: int | None = None, text: str = "") -> None:
        """Emit the final event and account for the request (scheduler thread or a cancelling caller)."""
        text += s.detok.flush()
        with self._cv:
            s.finished = True
            self._release(s)
            self._stats["finished"][reason] += 1
            pa = self._per_adapter.setdefault(s.adapter_key or "base",
                                              {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0})
            pa["requests"] += 1
            pa["generated_tokens"] += s.completion
            pa["prompt_tokens"] += len(s.prompt)
            self._finish_times.append(time.monotonic())
        s.handle._push(TokenEvent(last_token, text, reason, len(s.prompt), s.completion))
