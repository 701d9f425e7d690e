"""Run a suite on one model: render, generate (through the cache), score, summarise.

The runner owns everything that is not generation — prompt rendering, the output cache, scoring, the latency
pass, the summary — so a faster engine plugs in through `engine.Generator` without touching any of it. Latency is
measured in a separate unbatched pass (`latency=True`) because per-case latency inside a batch measures the batch,
not the case; it is never cached.

With `eval.constrained: true`, the cases that carry a `schema` are decoded a second time under it
(`Generator.generate_constrained`, what the server does for `response_format` json_schema) and scored the same way:
each such row gets `output_constrained`, `pass_constrained` and `scores_constrained` beside its free `output`, and
the summary's `constrained` block gives both accuracies over those cases (`accuracy` under the schema,
`free_accuracy` of the same cases decoded freely). The gate still judges the free outputs: what the adapter emits.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from gemtune.base.families import Family
from gemtune.errors import UserError
from gemtune.base.templates import render_prompt
from gemtune.evals.cache import OutputCache
from gemtune.evals.scorers import ScoreContext, field_summary, score_one
from gemtune.evals.suite import Case, Suite

if TYPE_CHECKING:
    from gemtune.evals.engine import Generator

RESULTS_VERSION = 1


@dataclass
class ModelUnderTest:
    """What is being evaluated: a generator plus what identifies its weights for the cache and the report."""

    name: str  # shown in lines and reports: "base", "checkpoint-400", an adapter dir name
    generator: "Generator"
    tokenizer: object
    family: Family
    base: str  # base name or directory
    base_sha: str
    adapter: Optional[str] = None  # adapter directory, None for the bare base
    adapter_sha: Optional[str] = None


def render_prompts(suite: Suite, tokenizer, family: Family) -> list[list[int]]:
    """Each case's prompt, its tool definitions rendered in when it offers tools (a `LeanTokenizer` holds them
    rendered already: the per-checkpoint eval renders the suite before the trainer frees its tokenizer)."""
    if hasattr(tokenizer, "prompt_ids"):
        return [tokenizer.prompt_ids(c.messages, c.tools or None) for c in suite.cases]
    return [render_prompt(c.messages, tokenizer, family, tools=c.tools or None).input_ids for c in suite.cases]


def case_key(c: Case) -> str:
    """A case's cache identity: `Case.key()`, plus its tools when it offers some (they are part of the prompt)."""
    if not c.tools:
        return c.key()
    from gemtune.utils import sha256_text

    return sha256_text(json.dumps([c.key(), c.tools], sort_keys=True, ensure_ascii=False))


def placement_key(mut: ModelUnderTest) -> dict:
    """The device kind and dtype the generator really runs in (not what was asked for: `auto` differs by host)."""
    placement = getattr(mut.generator, "placement", None)
    if placement is None:
        return {"device": None, "dtype": None}
    return placement.cache_key()


def generation_key(suite: Suite, mut: ModelUnderTest) -> dict:
    """Every knob that can change an output, the device and dtype included; part of each cache key."""
    cfg = suite.config
    return {"engine": mut.generator.name, "max_new_tokens": cfg.max_new_tokens, **placement_key(mut),
            "batch_size": cfg.batch_size, "seed": cfg.seed, "template": mut.family.name, "decoding": "greedy"}


def generate_outputs(suite: Suite, mut: ModelUnderTest, cache: OutputCache,
                     progress: Callable[[str], None] | None = None) -> tuple[list[str], list[int], dict]:
    """Outputs for every case: cache hits first, one batched generate call for the misses."""
    from gemtune.evals.cache import model_sha

    gen = generation_key(suite, mut)
    msha = model_sha(mut.base_sha, mut.adapter_sha)
    keys = [OutputCache.key(msha, case_key(c), gen) for c in suite.cases]
    outputs: list[Optional[str]] = [None] * len(keys)
    tokens = [0] * len(keys)
    hits_before = cache.hits
    for i, k in enumerate(keys):
        hit = cache.get(k)
        if hit is not None and isinstance(hit.get("output"), str):
            outputs[i], tokens[i] = hit["output"], int(hit.get("tokens", 0))
    missing = [i for i, o in enumerate(outputs) if o is None]
    seconds = 0.0
    if missing:
        prompts = render_prompts(suite, mut.tokenizer, mut.family)
        if progress:
            progress(f"{mut.name}: generating {len(missing)} of {len(keys)} cases ({len(keys) - len(missing)} cached)")
        t0 = time.perf_counter()
        new = mut.generator.generate([prompts[i] for i in missing], suite.config.max_new_tokens)
        seconds = time.perf_counter() - t0
        counts = getattr(mut.generator, "last_new_tokens", None) or [len(mut.tokenizer.encode(o, add_special_tokens=False)) for o in new]
        for i, out, n in zip(missing, new, counts):
            outputs[i], tokens[i] = out, n
            cache.put(keys[i], {"output": out, "tokens": n})
    gen_tokens = sum(tokens[i] for i in missing)
    stats = {"cases_generated": len(missing), "cache_hits": cache.hits - hits_before, "seconds": round(seconds, 4),
             "new_tokens": gen_tokens,
             "cases_per_s": round(len(missing) / seconds, 3) if seconds > 0 else None,
             "tokens_per_s": round(gen_tokens / seconds, 3) if seconds > 0 else None}
    return outputs, tokens, stats  # type: ignore[return-value]


def generate_constrained_outputs(suite: Suite, mut: ModelUnderTest, cache: OutputCache,
                                 progress: Callable[[str], None] | None = None) -> dict[int, tuple[str, int]]:
    """Outputs decoded under each case's schema, for the cases that carry one: {case index: (output, tokens)}.
    Cached like the free outputs, under a generation key that says "greedy+schema" and the schema itself."""
    from gemtune.evals.cache import model_sha
    from gemtune.utils import sha256_text

    idx = [i for i, c in enumerate(suite.cases) if c.schema is not None]
    if not idx:
        return {}
    if not hasattr(mut.generator, "generate_constrained"):
        raise UserError(f"eval.constrained: the generator {mut.generator.name!r} cannot decode under a schema",
                        field="eval.constrained")
    gen = {**generation_key(suite, mut), "decoding": "greedy+schema"}
    msha = model_sha(mut.base_sha, mut.adapter_sha)
    keys = {i: OutputCache.key(msha, sha256_text(json.dumps([case_key(suite.cases[i]), suite.cases[i].schema],
                                                            sort_keys=True)), gen) for i in idx}
    out: dict[int, tuple[str, int]] = {}
    for i in idx:
        hit = cache.get(keys[i])
        if hit is not None and isinstance(hit.get("output"), str):
            out[i] = (hit["output"], int(hit.get("tokens", 0)))
    missing = [i for i in idx if i not in out]
    if missing:
        prompts = render_prompts(suite, mut.tokenizer, mut.family)
        if progress:
            progress(f"{mut.name}: decoding {len(missing)} cases under their schema")
        new = mut.generator.generate_constrained([prompts[i] for i in missing],
                                                 [suite.cases[i].schema for i in missing], suite.config.max_new_tokens)
        counts = getattr(mut.generator, "last_new_tokens", None) or [0] * len(new)
        for i, text, n in zip(missing, new, counts):
            out[i] = (text, n)
            cache.put(keys[i], {"output": text, "tokens": n})
    return out


def constrained_summary(rows: list[dict]) -> dict:
    """Both accuracies over the cases decoded under their schema."""
    sub = [r for r in rows if "pass_constrained" in r]
    n = len(sub)
    passed = sum(bool(r["pass_constrained"]) for r in sub)
    free = sum(bool(r["pass"]) for r in sub)
    out = {"n": n, "passed": passed, "accuracy": round(passed / n, 6) if n else None,
           "free_passed": free, "free_accuracy": round(free / n, 6) if n else None}
    fields = field_summary(sub, "scores_constrained")
    if fields:
        out["fields"] = fields  # per-field results of the constrained outputs (json / tool_call scorers)
    return out


def measure_latency(suite: Suite, mut: ModelUnderTest) -> list[float]:
    """Milliseconds per case, one case at a time (what a single user waits), never cached."""
    prompts = render_prompts(suite, mut.tokenizer, mut.family)
    out = []
    for p in prompts:
        t0 = time.perf_counter()
        mut.generator.generate([p], suite.config.max_new_tokens)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def score_case(case: Case, output: str, ctx: ScoreContext, latency_ms: Optional[float]) -> tuple[bool, dict]:
    """(pass, scores by scorer name). A case passes when every scorer that applies passes."""
    scores: dict[str, dict] = {}
    verdicts = []
    for spec in case.scorers:
        target = case.label if (spec.type == "label" and case.label is not None) else case.expected
        s = score_one(spec, output, target, ctx, case_schema=case.schema, latency_ms=latency_ms)
        name, k = spec.type, 2
        while name in scores:
            name, k = f"{spec.type}#{k}", k + 1
        scores[name] = s.to_json()
        if s.passed is not None:
            verdicts.append(s.passed)
    return all(verdicts), scores


def percentile(values: list[float], q: float) -> Optional[float]:
    return round(float(np.percentile(values, q)), 3) if values else None


def summarise(suite: Suite, rows: list[dict], name: str) -> dict:
    """Accuracy, per-scorer and per-tag pass rates, format compliance, latency percentiles."""
    n = len(rows)
    passed = sum(1 for r in rows if r["pass"])
    scorers: dict[str, dict] = {}
    fmt_total = fmt_ok = 0
    for r in rows:
        flags = [s["format_ok"] for s in r["scores"].values() if "format_ok" in s]
        if flags:
            fmt_total += 1
            fmt_ok += all(flags)
        for key, s in r["scores"].items():
            base = key.split("#")[0]
            d = scorers.setdefault(base, {"n": 0, "passed": 0, "skipped": 0})
            if s["pass"] is None:
                d["skipped"] += 1
            else:
                d["n"] += 1
                d["passed"] += bool(s["pass"])
    tags: dict[str, dict] = {}
    for r in rows:
        for t in r.get("tags", []):
            d = tags.setdefault(t, {"n": 0, "passed": 0})
            d["n"] += 1
            d["passed"] += bool(r["pass"])
    for d in list(scorers.values()) + list(tags.values()):
        d["accuracy"] = round(d["passed"] / d["n"], 6) if d["n"] else None
    lat = [r["latency_ms"] for r in rows if r.get("latency_ms") is not None]
    return {
        "name": name,
        "n": n,
        "passed": passed,
        "accuracy": round(passed / n, 6) if n else 0.0,
        "format_compliance": round(fmt_ok / fmt_total, 6) if fmt_total else None,
        "format_checked": fmt_total,
        "scorers": scorers,
        "tags": tags,
        "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "n": len(lat)} if lat else None,
    }


def evaluate(suite: Suite, mut: ModelUnderTest, *, cache: OutputCache | None = None, latency: bool = False,
             progress: Callable[[str], None] | None = None) -> dict:
    """Run `suite` on `mut`; returns the `results.json` document (cases in suite order + summary + meta)."""
    cache = cache if cache is not None else OutputCache()
    outputs, tokens, gen_stats = generate_outputs(suite, mut, cache, progress)
    constrained = generate_constrained_outputs(suite, mut, cache, progress) if suite.config.constrained else {}
    lat = measure_latency(suite, mut) if latency else [None] * len(suite.cases)
    # the model's family: the tool_call scorer parses that family's call syntax (Gemma 4's is not Gemma 3's)
    ctx = ScoreContext(labels=suite.labels, max_latency_ms=suite.config.max_latency_ms, family=mut.family)
    rows = []
    for i, (case, out, ntok, ms) in enumerate(zip(suite.cases, outputs, tokens, lat)):
        ok, scores = score_case(case, out, ctx, ms)
        rows.append({"id": case.id, "output": out, "pass": ok, "scores": scores,
                     "latency_ms": None if ms is None else round(ms, 3), "expected": case.expected,
                     "prompt": case.prompt_text(), "tags": case.tags, "new_tokens": ntok})
        if i in constrained:
            c_out, c_tok = constrained[i]
            c_ok, c_scores = score_case(case, c_out, ctx, None)
            rows[-1].update(output_constrained=c_out, pass_constrained=c_ok, scores_constrained=c_scores,
                            new_tokens_constrained=c_tok)
    summary = summarise(suite, rows, mut.name)
    fields = field_summary(rows)
    if fields:
        summary["fields"] = fields  # per-field P/R/F1, exact-match and schema-valid rates (json / tool_call)
    if suite.config.constrained:
        summary["constrained"] = constrained_summary(rows)
    summary["generation"] = gen_stats
    placement = getattr(mut.generator, "placement", None)
    summary["placement"] = placement.describe() if placement is not None else None  # where the outputs came from
    meta = {"version": RESULTS_VERSION, "name": mut.name, "base": mut.base, "base_sha256": mut.base_sha,
            "adapter": mut.adapter, "adapter_sha256": mut.adapter_sha,
            "suite": {"path": suite.path, "sha256": suite.sha256, "n": len(suite.cases)},
            "generation": generation_key(suite, mut),
            "placement": summary["placement"],
            "labels": sorted(suite.labels) if suite.labels else None}
    return {"meta": meta, "cases": rows, "summary": summary}
