"""Eval harness and regression gate: suites, scorers, batched deterministic runner, comparison with
significance, the gate, report.html, the one-line notification, and the per-checkpoint hook for training."""

from gemtune.evals.compare import compare, load_results
from gemtune.evals.config import EvalConfig, load_eval_config
from gemtune.evals.pipeline import EvalOutcome, Evaluator, compare_files, run_eval
from gemtune.evals.suite import Case, Suite, load_suite

__all__ = ["Case", "EvalConfig", "EvalOutcome", "Evaluator", "Suite", "compare", "compare_files", "load_eval_config",
           "load_results", "load_suite", "run_eval"]
