"""Eval at every checkpoint: the training stage calls the function built here; it never imports evals itself
(the CLI wires the two together), so training stays usable without the eval stage.

During training the hook evaluates the model being trained (`attach_training_model`, called by the trainer):
the checkpoint's outputs come from the in-memory PEFT model with its adapter enabled, the base's with the adapter
disabled (computed once, and cached), on the training device in the training dtype: no second copy of the base
in memory. Without an attached model (a sharded run, or a baseline that is another adapter) it loads the base
once, as `gemtune eval` does.

Each call evaluates one checkpoint (a PEFT adapter dir) against a baseline computed once per run (by default the
version live under `eval.live` in the registry when it routes somewhere, else the base), writes
`ckpt/eval/{results.json,summary.json,report.html}`, prints (and posts) the one-line diff naming that baseline,
and records the summary, `"shippable"` (gate passed) and a verdict bound to the checkpoint's weights, the suite and
the baseline (`eval_verdicts`, see verdicts.py) in `ckpt/gemtune.json`, which the registry reads to refuse a
checkpoint that failed the gate. `mark_best` then names the best gate-passing checkpoint of the run in `best.json`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

from gemtune.errors import UserError
from gemtune.evals.baselines import Baseline, ExternalOptions, resolve_baseline
from gemtune.evals.cache import OutputCache, adapter_fingerprint, dir_fingerprint
from gemtune.evals.config import EvalConfig
from gemtune.evals.pipeline import (Evaluator, annotate, baseline_results, compare_and_report, history_point,
                                   record_eval, resolve_adapter)
from gemtune.evals.runner import ModelUnderTest, evaluate
from gemtune.evals.suite import load_suite
from gemtune.evals.verdicts import make_verdict
from gemtune.utils import atomic_write_json


def collect_history(run_dir: Path) -> list[dict]:
    """One point per checkpoint of the run that already has an eval summary (for the accuracy chart)."""
    points = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []:
        s = _read_summary(d)
        if s is not None:
            points.append(history_point(s))
    return points


def _read_summary(ckpt: Path) -> Optional[dict]:
    p = ckpt / "eval" / "summary.json"
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    except ValueError:
        return None


class CheckpointEvaluator:
    """Callable `(ckpt_dir, step) -> summary`; loads the base and computes the baseline on first use only.

    `baseline`: a spec as `gemtune eval --baseline` takes (base, an adapter dir, a results.json,
    registry:NAME@ALIAS, openai:URL#MODEL) or `auto` (`eval.gate_baseline`: the project's live version when
    `eval.live` routes somewhere in the registry, else the base). It is resolved here, before training starts, so
    a misnamed alias or an unreachable registry fails the command at once, not after the first checkpoint."""

    def __init__(self, suite_path: str | Path, base: str | Path, *, baseline: Optional[str | Path] = "base",
                 gate: Optional[float] = 0.02, webhook: Optional[str] = None, max_cases: Optional[int] = None,
                 batch_size: Optional[int] = None,
                 config: EvalConfig | None = None, no_cache: bool = False, echo: Callable[[str], None] = print,
                 progress: Callable[[str], None] | None = None, registry: Optional[str] = None,
                 external: Optional[ExternalOptions] = None):
        if baseline in ("none", ""):
            raise UserError("the checkpoint gate needs a baseline: \"base\", a results.json, an adapter dir, "
                            "registry:NAME@ALIAS or openai:URL#MODEL", field="baseline")
        cfg = config or EvalConfig()
        self.config = cfg.model_copy(update={k: v for k, v in (("gate", gate), ("batch_size", batch_size))
                                             if v is not None})
        self.suite = load_suite(suite_path, self.config, max_cases=max_cases)
        self.partial = max_cases is not None  # a smoke run of a few cases writes no verdict bound to the weights
        self.base, self.webhook = str(base), webhook
        self.no_cache, self.echo, self.progress = no_cache, echo, progress
        self.external = external
        self.spec: Baseline = resolve_baseline(None if baseline is None else str(baseline), base_name=self.base,
                                               registry=registry, config=self.config,
                                               note=progress or _stderr)  # type: ignore[assignment]
        self.baseline = self.spec.spec
        self._evaluator: Optional[Evaluator] = None
        self._baseline_doc: Optional[dict] = self.spec.results
        self._live = None  # the PEFT model being trained, when the trainer attached it
        self._live_tok = None
        self.cache = OutputCache(read=not no_cache)
        self.best: Optional[dict] = None  # best.json of the run, once `checkpoint_evals` has written it

    @property
    def evaluator(self) -> Evaluator:
        """A separately loaded base: only when no training model is attached."""
        if self._evaluator is None:
            self._evaluator = Evaluator(self.base, config=self.config, cache=self.cache, progress=self.progress)
        return self._evaluator

    def attach_training_model(self, model, **_) -> None:
        """Evaluate checkpoints on `model`, the PEFT model being trained (its weights are the checkpoint's when the
        hook runs), instead of loading the base a second time."""
        self._live = model

    def keep_tokenizer(self, tokenizer, family, *, vocab_size: Optional[int] = None) -> None:
        """Called by the trainer with its tokenizer before it frees it: keep the suite's rendered prompts and a
        decode table (`LeanTokenizer`, a few tens of MB), so evaluating on the training model never loads Gemma's
        ~0.32 GiB tokenizer a second time. `vocab_size` (the logits' width) is needed for `eval.constrained`."""
        from gemtune.base.lean_tokenizer import LeanTokenizer
        from gemtune.base.provision import pull

        grammar = vocab_size if self.config.constrained and any(c.schema is not None for c in self.suite.cases) else None
        lean = LeanTokenizer.from_tokenizer(tokenizer, family, [(c.messages, c.tools) for c in self.suite.cases],
                                            grammar_vocab=grammar)
        self._live_tok = (lean, dir_fingerprint(pull(self.base)))

    @contextlib.contextmanager
    def _on_training_model(self, adapter: Optional[Path], name: str) -> Iterator[ModelUnderTest]:
        """The training model in eval mode: adapter enabled (a checkpoint) or disabled (the base)."""
        from gemtune.base.families import family_of
        from gemtune.base.loader import load_tokenizer
        from gemtune.base.provision import pull
        from gemtune.evals.engine import make_generator

        model = self._live
        if self._live_tok is None:  # the trainer did not hand over its tokenizer (`keep_tokenizer`): load one
            base_path = pull(self.base)
            self._live_tok = (load_tokenizer(base_path), dir_fingerprint(base_path))
        tok, base_sha = self._live_tok
        fam, was_training = family_of(model), model.training
        model.eval()
        try:
            with model.disable_adapter() if adapter is None else contextlib.nullcontext():
                gen = make_generator(model, tok, batch_size=self.config.batch_size, seed=self.config.seed,
                                     **_generator_kw(model, fam))
                gen.name = f"{gen.name}+training-model"  # its outputs never mix with a fresh base's in the cache
                yield ModelUnderTest(name, gen, tok, fam, self.base, base_sha, None if adapter is None else str(adapter),
                                     None if adapter is None else adapter_fingerprint(adapter))
        finally:
            model.train(was_training)

    def _run(self, adapter: Optional[Path], name: str) -> dict:
        if self._live is None:
            return self.evaluator.run(self.suite, adapter, name=name)
        with self._on_training_model(adapter, name) as mut:
            return evaluate(self.suite, mut, cache=self.cache, progress=self.progress)

    def baseline_results(self) -> dict:
        """Computed once per run and reused for every checkpoint: the base on the training model when one is
        attached, anything else (a results file, an adapter or registry version on a separately loaded base, an
        endpoint) through the same path as `gemtune eval`."""
        if self._baseline_doc is None:
            if self.spec.kind == "base":
                self._baseline_doc = self._run(None, "base")
            else:
                self._baseline_doc = baseline_results(self.spec, self.suite, self._evaluator_for, cache=self.cache,
                                                      external=self.external, progress=self.progress)
        return self._baseline_doc

    def _evaluator_for(self, base: Optional[str]) -> Evaluator:
        from gemtune.base.provision import pull

        if base is None or str(pull(base)) == str(pull(self.base)):
            return self.evaluator
        return Evaluator(base, config=self.config, cache=self.cache, progress=self.progress)

    def __call__(self, ckpt_dir: str | Path, step: int) -> dict:
        ckpt = Path(ckpt_dir)
        adapter = resolve_adapter(str(ckpt))
        baseline = self.baseline_results()
        results = self._run(adapter, ckpt.name)
        results["summary"]["step"] = int(step)
        results["summary"]["checkpoint"] = str(ckpt)
        annotate(results, self.spec, baseline, None)
        outcome = compare_and_report(results, baseline, ckpt / "eval", config=self.config, webhook=self.webhook,
                                     history=collect_history(ckpt.parent), echo=self.echo)
        verdict = None if self.partial else make_verdict(ckpt, outcome.summary, suite_path=self.suite.path,
                                                         baseline=self.spec.spec, baseline_id=self.spec.id)
        record_eval(ckpt, outcome.summary, verdict)
        return outcome.summary


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _generator_kw(model, family) -> dict:
    """`family=` and `placement=` (where the training model really is, in its dtype) for the generator, as far as
    the engine and the device policy take them."""
    import inspect

    from gemtune.evals.engine import make_generator

    params = inspect.signature(make_generator).parameters
    kw = {"family": family} if "family" in params else {}
    if "placement" in params:
        try:
            from gemtune.base.device import placement_of
        except ImportError:
            return kw
        kw["placement"] = placement_of(model)
    return kw


def make_checkpoint_evaluator(suite_path: str | Path, base: str | Path, baseline: Optional[str | Path] = "base",
                              gate: Optional[float] = 0.02, webhook: Optional[str] = None,
                              max_cases: Optional[int] = None, batch_size: Optional[int] = None, **kw) -> Callable[[Path, int], dict]:
    """The per-checkpoint eval for the training loop: `fn(ckpt_dir, step) -> summary` (`baseline` None or
    "auto": `eval.gate_baseline`)."""
    return CheckpointEvaluator(suite_path, base, baseline=baseline, gate=gate, webhook=webhook, max_cases=max_cases,
                               batch_size=batch_size, **kw)


def mark_best(run_dir: str | Path) -> dict:
    """Write `run_dir/best.json` naming the most accurate gate-passing checkpoint (ties: fewer regressions, then
    the later step); `checkpoint` is null when none passed."""
    run = Path(run_dir)
    rows = []
    for d in sorted(p for p in run.iterdir() if p.is_dir()):
        s = _read_summary(d)
        if s is None:
            continue
        cmp = s.get("compare") or {}
        rows.append({"checkpoint": d.name, "path": str(d), "step": s.get("step"), "accuracy": s.get("accuracy"),
                     "regression_rate": cmp.get("regression_rate"), "shippable": bool(s.get("shippable")),
                     "line": s.get("line")})
    passing = [r for r in rows if r["shippable"]]
    best = max(passing, key=lambda r: (r["accuracy"] or 0.0, -(r["regression_rate"] or 0.0), r["step"] or 0),
               default=None)
    doc = {"checkpoint": best["checkpoint"] if best else None, "path": best["path"] if best else None,
           "step": best["step"] if best else None, "accuracy": best["accuracy"] if best else None,
           "reason": "most accurate gate-passing checkpoint" if best else "no checkpoint passed the gate",
           "checkpoints": rows}
    atomic_write_json(run / "best.json", doc)
    return doc


@contextlib.contextmanager
def checkpoint_evals(run_dir: str | Path, data_dir: str | Path, base: str | Path, *, enabled: bool = True,
                     suite: str | Path | None = None, gate: Optional[float] = 0.02, webhook: Optional[str] = None,
                     max_cases: Optional[int] = None, config: EvalConfig | None = None,
                     baseline: Optional[str] = None, registry: Optional[str] = None,
                     echo: Callable[[str], None] = print) -> Iterator[Optional[CheckpointEvaluator]]:
    """The eval at every checkpoint of one training run, as `gemtune train --eval-every` and the demo run it:
    yields the hook to hand the trainer (`suite`, default the dataset's frozen `eval.jsonl`, gated against
    `baseline`, default `eval.gate_baseline`: the live version when there is one, else the base), or None when
    not `enabled`; once training has returned, names the run's best gate-passing checkpoint in
    `run_dir/best.json` (the document is also left on the hook as `.best`)."""
    if not enabled:
        yield None
        return
    hook = make_checkpoint_evaluator(Path(suite) if suite else Path(data_dir) / "eval.jsonl", base,
                                     baseline=baseline or "auto", gate=gate, webhook=webhook, max_cases=max_cases,
                                     config=config, registry=registry, echo=echo)
    yield hook
    hook.best = mark_best(run_dir)
