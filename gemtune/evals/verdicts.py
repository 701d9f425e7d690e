"""Eval verdicts bound to the weights they judged (the `eval_verdicts` list in the adapter's `gemtune.json`).

A verdict says: these weights (sha256 of `adapter_model.safetensors`), on this suite (sha256 of the suite file's
bytes), against this baseline (`baseline_id`: what the spec resolved to, e.g. `registry:NAME@v3`), passed or failed
the regression gate. A newer verdict replaces an older one with the same (weights, suite, baseline). Readers count
a verdict only when its `adapter_sha256` is the adapter's current weights' sha256: retraining, or one changed byte,
leaves the old verdicts in the file but vouching for nothing.

The registry reads verdicts through `passing_verdicts` / `passing_in`. This module imports only `gemtune.adapter`
and `gemtune.utils`, so a reader pulls in no model code; import it lazily (inside a function) from a package that
`gemtune.evals` itself imports (the registry), so the two packages never import each other at load time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Optional

from gemtune.adapter import read_sidecar, update_sidecar, weights_sha256
from gemtune.utils import sha256_file

VERDICTS = "eval_verdicts"  # the sidecar section


def suite_sha256(suite_path: str | Path) -> str:
    """sha256 of the suite file's bytes (a dataset directory means its eval.jsonl)."""
    p = Path(suite_path)
    return sha256_file(p / "eval.jsonl" if p.is_dir() else p)


def make_verdict(adapter_dir: str | Path, summary: Mapping, *, suite_path: str | Path, baseline: str,
                 baseline_id: str, forced: bool = False) -> dict:
    """The verdict object of one gated eval run (`summary`: summary.json of the run, with `compare` and `gate`)."""
    cmp = summary.get("compare") or {}
    gate = summary.get("gate") or {}
    return {
        "adapter_sha256": weights_sha256(adapter_dir),
        "suite_sha256": suite_sha256(suite_path),
        "baseline": str(baseline),
        "baseline_id": str(baseline_id),
        "passed": bool(gate.get("passed")),
        "regressed_share": float(cmp.get("regression_rate") or 0.0),
        "gate": float(gate.get("threshold") if gate.get("threshold") is not None else 0.0),
        "accuracy": summary.get("accuracy"),
        "baseline_accuracy": (cmp.get("accuracy") or {}).get("baseline"),
        "cases": int(cmp.get("n") or summary.get("n") or 0),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "forced": bool(forced),
    }


def _same(a: Mapping, b: Mapping) -> bool:
    return all(a.get(k) == b.get(k) for k in ("adapter_sha256", "suite_sha256", "baseline_id"))


def merged(existing: object, verdict: Mapping) -> list[dict]:
    """`existing` (the sidecar's list) with `verdict` appended, replacing one for the same weights, suite and
    baseline; entries that are not objects are dropped."""
    rows = [dict(v) for v in existing if isinstance(v, dict)] if isinstance(existing, list) else []
    return [v for v in rows if not _same(v, verdict)] + [dict(verdict)]


def record(adapter_dir: str | Path, summary: Mapping, verdict: Optional[Mapping] = None) -> dict:
    """Write the run's summary (`eval`), the gate verdict (`shippable`) and, when given, `verdict` into
    `eval_verdicts`, keeping every other section; returns the sidecar written."""
    sections: dict[str, object] = {"eval": dict(summary), "shippable": bool(summary.get("shippable"))}

    def with_verdict(side: dict) -> dict:  # runs under the sidecar's lock: a concurrent verdict is never lost
        return {**sections, VERDICTS: merged(side.get(VERDICTS), verdict)} if verdict is not None else sections

    return update_sidecar(adapter_dir, with_verdict)


def passing_in(sidecar: Mapping, weights_sha: Optional[str], baseline_id: Optional[str] = None) -> list[dict]:
    """The passing verdicts of a sidecar document for weights `weights_sha` (and `baseline_id`, when given)."""
    if not weights_sha:
        return []
    return [dict(v) for v in verdicts_in(sidecar, weights_sha)
            if v.get("passed") is True and (baseline_id is None or v.get("baseline_id") == baseline_id)]


def verdicts_in(sidecar: Mapping, weights_sha: Optional[str]) -> list[dict]:
    """Every verdict (passed or not) of a sidecar document made for weights `weights_sha`, oldest first."""
    rows = sidecar.get(VERDICTS) if isinstance(sidecar, Mapping) else None
    if not weights_sha or not isinstance(rows, list):
        return []
    return [dict(v) for v in rows if isinstance(v, dict) and v.get("adapter_sha256") == weights_sha]


def current_verdicts(adapter_dir: str | Path) -> list[dict]:
    """Every verdict in the adapter's sidecar made for the weights it holds now."""
    return verdicts_in(read_sidecar(adapter_dir), weights_sha256(adapter_dir))


def passing_verdicts(adapter_dir: str | Path, baseline_id: Optional[str] = None) -> list[dict]:
    """The passing eval verdicts for the adapter's current weights (against `baseline_id` only, when given);
    empty when it was never evaluated, failed, or its weights changed since."""
    return passing_in(read_sidecar(adapter_dir), weights_sha256(adapter_dir), baseline_id)
