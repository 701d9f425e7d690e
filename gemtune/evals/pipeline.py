"""The eval as a library call: suite → candidate (and baseline) results → comparison → gate → files → line.

`Evaluator` keeps one base loaded so the baseline and every adapter (every checkpoint of a run) are generated on
one load; adapters are attached and detached around each run. The CLI and the training hook both call
`run_eval`, so `gemtune eval` and the per-checkpoint eval write the same files and the same line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from gemtune.adapter import (ADAPTER_CONFIG, SIDECAR, attached, base_of, check_adapter_dir, sidecar_path,
                             update_sidecar)
from gemtune.base.provision import DEFAULT_MODEL, pull
from gemtune.errors import UserError
from gemtune.evals.cache import OutputCache, adapter_fingerprint, dir_fingerprint
from gemtune.evals.compare import compare, load_results
from gemtune.evals.config import EvalConfig
from gemtune.evals.gate import GateResult
from gemtune.evals.notify import notify, summary_line
from gemtune.evals.report import render_report
from gemtune.evals.runner import ModelUnderTest, evaluate
from gemtune.evals.suite import Suite, load_suite
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


def resolve_adapter(adapter: str) -> Optional[Path]:
    return None if adapter in ("base", "", None) else check_adapter_dir(adapter, or_base=True)


def record_eval(adapter_dir: Path, summary: dict) -> dict:
    """The eval summary and the gate verdict into the adapter's sidecar (sections `eval` and `shippable`), keeping
    what training and the probe wrote there; returns the sidecar. The registry refuses a non-shippable adapter."""
    return update_sidecar(adapter_dir, {"eval": summary, "shippable": bool(summary.get("shippable"))})


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


def record_verdict(adapter: str, outcome: EvalOutcome) -> tuple[Path, dict]:
    """`gemtune eval --record`, after the run: the outcome's summary and gate verdict into the adapter's sidecar;
    (the sidecar's path, its content)."""
    if outcome.gate is None:
        raise UserError("--record needs a gate, and this run compared against no baseline", field="baseline")
    adapter_dir = Path(resolve_adapter(adapter))
    return sidecar_path(adapter_dir), record_eval(adapter_dir, outcome.summary)


def is_results_file(path: str) -> bool:
    p = Path(path)
    return (p.is_file() and p.suffix == ".json") or (p.is_dir() and (p / "results.json").is_file()
                                                     and not (p / ADAPTER_CONFIG).is_file())


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


def run_eval(adapter: str, suite: str | Path, out: str | Path, *, baseline: Optional[str] = "auto",
             config: EvalConfig | None = None, webhook: Optional[str] = None, no_cache: bool = False,
             latency: bool = False, base: Optional[str] = None, judge_url: Optional[str] = None,
             judge_model: str = "judge", max_cases: Optional[int] = None, echo: Callable[[str], None] = print,
             progress: Callable[[str], None] | None = None) -> EvalOutcome:
    """`gemtune eval`: evaluate `adapter` (a PEFT dir or "base") on `suite`, compare with `baseline`, write
    `out/{results.json,summary.json,report.html}`, print (and post) the line. The gate verdict is in the outcome;
    the CLI turns a failed gate into exit 1."""
    config = config or EvalConfig()
    adapter_dir = resolve_adapter(adapter)
    suite_obj = load_suite(suite, config, max_cases=max_cases)
    base_name = base_of(adapter_dir, base) if adapter_dir else (base or DEFAULT_MODEL)
    if baseline == "auto":
        baseline = "base" if adapter_dir is not None else None
    if baseline in ("none", ""):
        baseline = None
    baseline_doc = None
    if baseline is not None and baseline != "base" and is_results_file(baseline):
        baseline_doc = load_results(baseline)  # fail on a bad file before generating anything
    if baseline not in (None, "base") and baseline_doc is None and str(baseline).endswith(".json"):
        raise UserError("baseline results file not found", file=str(baseline), field="baseline")
    baseline_dir = resolve_adapter(baseline) if baseline not in (None, "base") and baseline_doc is None else None
    cache = OutputCache(read=not no_cache)
    ev = Evaluator(base_name, config=config, cache=cache, progress=progress)
    to_save = None
    if baseline == "base":
        baseline_doc = to_save = ev.run(suite_obj, None, name="base")
    elif baseline_dir is not None:
        other_base = base_of(baseline_dir, base)
        bev = ev if str(pull(other_base)) == str(ev.base_path) else Evaluator(other_base, config=config, cache=cache,
                                                                                progress=progress)
        baseline_doc = to_save = bev.run(suite_obj, baseline_dir)
    results = ev.run(suite_obj, adapter_dir, latency=latency)
    return compare_and_report(results, baseline_doc, Path(out), config=config, judge_url=judge_url,
                              judge_model=judge_model, webhook=webhook, echo=echo, baseline_to_save=to_save)


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
