"""The eval as a library call: suite → candidate (and baseline) results → comparison → gate → files → line.

`Evaluator` keeps one base loaded so the baseline and every adapter (every checkpoint of a run) are generated on
one load; adapters are attached and detached around each run. `run_eval` (the CLI) and the training hook both
resolve their baseline through baselines.py and finish through `compare_and_report`, so `gemtune eval` and the
per-checkpoint eval write the same files, the same line and the same verdict (verdicts.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from gemtune.adapter import SIDECAR, attached, base_of, check_adapter_dir, sidecar_path
from gemtune.base.provision import DEFAULT_MODEL, pull
from gemtune.errors import UserError
from gemtune.evals.baselines import Baseline, ExternalOptions, resolve_baseline
from gemtune.evals.cache import OutputCache, adapter_fingerprint, dir_fingerprint
from gemtune.evals.compare import compare, load_results
from gemtune.evals.config import EvalConfig
from gemtune.evals.gate import GateResult
from gemtune.evals.notify import notify, summary_line
from gemtune.evals.report import render_report
from gemtune.evals.runner import ModelUnderTest, evaluate
from gemtune.evals.suite import Suite, load_suite
from gemtune.evals.verdicts import make_verdict, record as record_sidecar
from gemtune.utils import atomic_write_json, atomic_write_text


class Evaluator:
    """A loaded base plus the output cache; evaluates the base or any adapter of it on a suite."""

    def __init__(self, base: str | Path = DEFAULT_MODEL, *, config: EvalConfig | None = None,
                 cache: OutputCache | None = None, progress: Callable[[str], None] | None = None):
        from gemtune.base.device import resolve
        from gemtune.base.families import family_of
        from gemtune.base.loader import load_base

        self.config = config or EvalConfig()
        self.placement = resolve(self.config.device, self.config.dtype)  # a bad device fails before any file is read
        self.base_name = str(base)
        self.base_path = pull(str(base))
        self.base_sha = dir_fingerprint(self.base_path)
        self.model, self.tokenizer = load_base(self.base_path, placement=self.placement)
        self.family = family_of(self.model)
        self.cache = cache if cache is not None else OutputCache()
        self.progress = progress

    @contextlib.contextmanager
    def model_under_test(self, adapter: Optional[Path], name: Optional[str] = None) -> Iterator[ModelUnderTest]:
        from gemtune.evals.engine import make_generator

        cfg = self.config
        if adapter is None:
            gen = make_generator(self.model, self.tokenizer, batch_size=cfg.batch_size, seed=cfg.seed,
                                 family=self.family, placement=self.placement)
            yield ModelUnderTest(name or "base", gen, self.tokenizer, self.family, self.base_name, self.base_sha)
            return
        with attached(self.model, adapter) as peft_model:
            gen = make_generator(peft_model, self.tokenizer, batch_size=cfg.batch_size, seed=cfg.seed,
                                 family=self.family, placement=self.placement)
            yield ModelUnderTest(name or adapter.name, gen, self.tokenizer, self.family, self.base_name, self.base_sha,
                                 str(adapter), adapter_fingerprint(adapter))

    def run(self, suite: Suite, adapter: Optional[Path] = None, *, name: Optional[str] = None,
            latency: bool = False) -> dict:
        with self.model_under_test(adapter, name) as mut:
            return evaluate(suite, mut, cache=self.cache, latency=latency, progress=self.progress)


@dataclass
class EvalOutcome:
    results: dict
    summary: dict
    comparison: Optional[dict]
    gate: Optional[GateResult]
    line: str
    out: Optional[Path]
    baseline: Optional[dict] = None
    posted: bool = False
    baseline_spec: Optional[Baseline] = None  # what the run was gated against (None: compare_files, or no gate)
    suite_path: Optional[str] = None


def resolve_adapter(adapter: str) -> Optional[Path]:
    return None if adapter in ("base", "", None) else check_adapter_dir(adapter, or_base=True)


def record_eval(adapter_dir: Path, summary: dict, verdict: Optional[dict] = None) -> dict:
    """The eval summary and the gate verdict into the adapter's sidecar (sections `eval` and `shippable`), plus
    `verdict` into `eval_verdicts` (bound to the weights' sha256), keeping what training and the probe wrote
    there; returns the sidecar. The registry refuses a non-shippable adapter."""
    return record_sidecar(adapter_dir, summary, verdict)


def check_record(adapter: str, baseline: Optional[str], max_cases: Optional[int]) -> None:
    """`gemtune eval --record`, refused before anything is generated: a verdict written into an adapter must come
    from a gate over the whole suite."""
    if adapter == "base":
        raise UserError(f"--record writes into an adapter's {SIDECAR}; `base` has none", field="record")
    if baseline in ("none", ""):
        raise UserError("--record needs a gate: drop --baseline none (an ungated run has no verdict)",
                        field="baseline")
    if max_cases is not None:
        raise UserError("--record needs the full suite: a --max-cases smoke run cannot vouch for an adapter",
                        field="max_cases")


def record_verdict(adapter: str | Path, outcome: EvalOutcome) -> tuple[Path, dict]:
    """`gemtune eval --record`, after the run: the outcome's summary, gate verdict and a verdict bound to the
    adapter's weights, suite and baseline (`eval_verdicts`) into the adapter's sidecar; (its path, its content)."""
    if outcome.gate is None or outcome.baseline_spec is None:
        raise UserError("--record needs a gate, and this run compared against no baseline", field="baseline")
    adapter_dir = Path(resolve_adapter(str(adapter)))
    bl = outcome.baseline_spec
    verdict = make_verdict(adapter_dir, outcome.summary, suite_path=outcome.suite_path, baseline=bl.spec,
                           baseline_id=bl.id)
    return sidecar_path(adapter_dir), record_eval(adapter_dir, outcome.summary, verdict)


def with_comparison(results: dict, comparison: Optional[dict], gate: Optional[GateResult], line: str,
                    judge_stats: Optional[dict] = None) -> dict:
    """The full summary (summary.json): run summary + comparison (per-case outcomes stay in results.json)."""
    summary = dict(results["summary"])
    if comparison:
        summary["compare"] = {k: v for k, v in comparison.items() if k != "outcomes"}
        summary["gate"] = gate.to_json() if gate else None
        summary["shippable"] = summary["gate_passed"] = bool(gate.passed) if gate else None
        for row in results["cases"]:
            row["outcome"] = comparison["outcomes"].get(str(row["id"]))
    if judge_stats:
        summary["judge"] = judge_stats
    summary["line"] = line
    results["summary"] = summary
    return summary


def write_outputs(out: Path, results: dict, summary: dict, report_html: str,
                  baseline_results: Optional[dict] = None) -> None:
    """Each file is written atomically; the report last, so a reader that sees it sees the rest."""
    out.mkdir(parents=True, exist_ok=True)
    if baseline_results is not None:
        atomic_write_json(out / "baseline_results.json", baseline_results)
    atomic_write_json(out / "results.json", results)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.html", report_html)


def compare_and_report(results: dict, baseline: Optional[dict], out: Optional[Path], *, config: EvalConfig,
                       judge_url: Optional[str] = None, judge_model: str = "judge", webhook: Optional[str] = None,
                       history: Optional[list[dict]] = None, echo: Callable[[str], None] = print,
                       baseline_to_save: Optional[dict] = None) -> EvalOutcome:
    """Everything after generation: judge, compare, gate, files, line, webhook. Shared by run_eval and compare."""
    comparison = gate = judge_stats = None
    if baseline is not None:
        verdicts = None
        if judge_url:
            from gemtune.evals.judge import PairwiseJudge

            judge = PairwiseJudge(judge_url, model=judge_model)
            try:
                verdicts = judge.judge_results(results, baseline)
            finally:
                judge.close()
            judge_stats = judge.stats()
        comparison = compare(results, baseline, gate=config.gate, seed=config.seed, n_boot=config.bootstrap,
                             verdicts=verdicts)
        gate = GateResult(**comparison["gate"])
    line = summary_line(results["summary"], comparison)
    summary = with_comparison(results, comparison, gate, line, judge_stats)
    hist = []
    if history is not None:  # this run replaces any earlier point of the same checkpoint (a re-evaluation)
        hist = [h for h in history if h.get("name") != summary.get("name")] + [history_point(summary)]
    if out is not None:
        html = render_report(results, baseline=baseline, comparison=comparison, history=hist, line=line)
        write_outputs(out, results, summary, html, baseline_to_save)
    posted = notify(line, webhook, echo=echo)
    return EvalOutcome(results, summary, comparison, gate, line, out, baseline, posted)


def history_point(summary: dict, step: Optional[int] = None) -> dict:
    cmp = summary.get("compare") or {}
    return {"name": summary.get("name"), "step": step if step is not None else summary.get("step"),
            "accuracy": summary.get("accuracy"),
            "baseline_accuracy": (cmp.get("accuracy") or {}).get("baseline"),
            "gate_passed": (summary.get("gate") or {}).get("passed")}


def baseline_results(bl: Baseline, suite: Suite, evaluator: Callable[[Optional[str]], Evaluator], *,
                     cache: OutputCache, external: Optional[ExternalOptions] = None, base: Optional[str] = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """The baseline's results on `suite`: a saved document as is, an endpoint's answers, or the base / an adapter
    (a registry version) generated on `evaluator(base)` (None: the candidate's base; the one already loaded is
    reused when the baseline adapter belongs to the same base)."""
    if bl.kind == "results":
        return bl.results  # type: ignore[return-value]
    if bl.kind == "openai":
        from gemtune.evals.external import ExternalModel

        return ExternalModel(bl.url, bl.model, external or ExternalOptions()).run(suite, cache, progress=progress)
    if bl.kind == "base":
        return evaluator(None).run(suite, None, name="base")
    if progress and bl.note:
        progress(f"baseline {bl.name}: {bl.note}")
    return evaluator(base_of(bl.adapter, base)).run(suite, bl.adapter, name=bl.name)


def candidate_cost(results: dict, suite: Suite, ev: Evaluator, price: Optional[tuple[float, float]]) -> Optional[dict]:
    """What the adapter's answers cost at `price` (USD per 1M input, output tokens): rendered prompt tokens in,
    generated tokens out."""
    if price is None:
        return None
    from gemtune.evals.external import usage_cost
    from gemtune.evals.runner import render_prompts

    prompt_tokens = sum(len(p) for p in render_prompts(suite, ev.tokenizer, ev.family))
    completion = sum(int(c.get("new_tokens") or 0) for c in results["cases"])
    return usage_cost(prompt_tokens, completion, len(results["cases"]), price)


def run_eval(adapter: str, suite: str | Path, out: str | Path, *, baseline: Optional[str] = "auto",
             config: EvalConfig | None = None, webhook: Optional[str] = None, no_cache: bool = False,
             latency: bool = False, base: Optional[str] = None, judge_url: Optional[str] = None,
             judge_model: str = "judge", max_cases: Optional[int] = None, echo: Callable[[str], None] = print,
             progress: Callable[[str], None] | None = None, registry: Optional[str] = None,
             external: Optional[ExternalOptions] = None, adapter_price: Optional[tuple[float, float]] = None,
             record: bool = False) -> EvalOutcome:
    """`gemtune eval`: evaluate `adapter` (a PEFT dir or "base") on `suite`, compare with `baseline` (a spec, see
    baselines.py: base, an adapter dir, a results.json, registry:NAME@ALIAS, openai:URL#MODEL, none, auto), write
    `out/{results.json,summary.json,report.html}`, print (and post) the line; `record`: also write the verdict into
    the adapter's gemtune.json (as `--record`). The gate verdict is in the outcome; the CLI turns a failed gate
    into exit 1."""
    config = config or EvalConfig()
    if record:
        check_record(adapter, baseline, max_cases)
    adapter_dir = resolve_adapter(adapter)
    suite_obj = load_suite(suite, config, max_cases=max_cases)
    base_name = base_of(adapter_dir, base) if adapter_dir else (base or DEFAULT_MODEL)
    # every input error (a bad file, an alias that routes nowhere, a malformed URL) before any model is loaded
    bl = resolve_baseline(baseline, base_name=base_name, has_adapter=adapter_dir is not None, registry=registry,
                          config=config, note=progress)
    if record and bl is None:
        raise UserError("--record needs a gate, and this run compares against no baseline", field="baseline")
    cache = OutputCache(read=not no_cache)
    baseline_doc = to_save = None
    if bl is not None and bl.kind == "openai":  # an unreachable endpoint fails before the base is loaded
        baseline_doc = to_save = baseline_results(bl, suite_obj, None, cache=cache, external=external,  # type: ignore[arg-type]
                                                  progress=progress)
    ev = Evaluator(base_name, config=config, cache=cache, progress=progress)
    loaded = {str(ev.base_path): ev}

    def evaluator(other: Optional[str]) -> Evaluator:
        key = str(ev.base_path) if other is None else str(pull(other))
        if key not in loaded:
            loaded[key] = Evaluator(other, config=config, cache=cache, progress=progress)
        return loaded[key]

    if bl is not None and baseline_doc is None:
        baseline_doc = baseline_results(bl, suite_obj, evaluator, cache=cache, base=base, progress=progress)
        to_save = None if bl.kind == "results" else baseline_doc
    results = ev.run(suite_obj, adapter_dir, latency=latency)
    annotate(results, bl, baseline_doc, candidate_cost(results, suite_obj, ev, adapter_price))
    outcome = compare_and_report(results, baseline_doc, Path(out), config=config, judge_url=judge_url,
                                 judge_model=judge_model, webhook=webhook, echo=echo, baseline_to_save=to_save)
    outcome.baseline_spec, outcome.suite_path = bl, suite_obj.path
    if record:
        record_verdict(adapter, outcome)
    return outcome


def annotate(results: dict, bl: Optional[Baseline], baseline_doc: Optional[dict], cost: Optional[dict]) -> None:
    """What the candidate was gated against, and the cost per 1k cases of both sides when priced, into the
    candidate's summary (so summary.json, the sidecar's `eval` and the line carry them)."""
    if bl is not None:
        results["summary"]["baseline"] = bl.to_json()
    base_cost = ((baseline_doc or {}).get("summary") or {}).get("cost")
    if cost is not None or base_cost is not None:
        results["summary"]["cost"] = {"candidate": cost, "baseline": base_cost}


def compare_files(candidate: str | Path, baseline: str | Path, *, gate: Optional[float] = None,
                  webhook: Optional[str] = None, out: Optional[str | Path] = None, config: EvalConfig | None = None,
                  judge_url: Optional[str] = None, judge_model: str = "judge",
                  echo: Callable[[str], None] = print) -> EvalOutcome:
    """`gemtune eval compare`: two saved results, no model needed; files are written only with `out`."""
    config = config or EvalConfig()
    if gate is not None:
        config = config.model_copy(update={"gate": gate})
    cand = load_results(candidate)
    base = load_results(baseline)
    if not cand.get("summary", {}).get("name"):
        cand["summary"]["name"] = cand["meta"]["name"]
    if "accuracy" not in cand["summary"] or "n" not in cand["summary"]:
        n = len(cand["cases"])
        passed = sum(1 for c in cand["cases"] if c["pass"])
        cand["summary"].update({"n": n, "passed": passed, "accuracy": passed / n if n else 0.0})
    return compare_and_report(cand, base, Path(out) if out else None, config=config, judge_url=judge_url, judge_model=judge_model,
                              webhook=webhook, echo=echo)
