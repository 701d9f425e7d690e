"""Candidate vs baseline on the same cases: win/loss/tie, win-rate, regressions, significance, gate.

Cases are paired by `id`. Regressions (baseline passed, candidate fails) drive the gate; the exact McNemar test
and a bootstrap CI say whether the accuracy difference is more than noise. Win-rate counts ties as half
(AlpacaEval's convention), so 0.5 means "no better, no worse"; per-case outcomes come from the scorers, or from
the pairwise judge's verdicts when a judge was used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from gemtune.errors import UserError
from gemtune.evals.gate import apply_gate
from gemtune.evals.stats import bootstrap_delta_ci, mcnemar_exact


def load_results(path: str | Path) -> dict:
    """A `results.json`, checked enough that comparing it cannot crash half-way."""
    p = Path(path)
    if p.is_dir() and (p / "results.json").is_file():
        p = p / "results.json"
    if not p.is_file():
        raise UserError("results file not found", file=str(p))
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"not valid JSON: {e}", file=str(p)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise UserError("expected an object with a \"cases\" list (a gemtune results.json)", file=str(p), field="cases")
    seen = set()
    for i, c in enumerate(doc["cases"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("pass"), bool):
            raise UserError(f"cases[{i}] needs an \"id\" and a boolean \"pass\"", file=str(p), field=f"cases[{i}]")
        if str(c["id"]) in seen:
            raise UserError(f"duplicate case id {c['id']!r}", file=str(p), field=f"cases[{i}].id")
        seen.add(str(c["id"]))
    doc.setdefault("summary", {})
    doc.setdefault("meta", {})
    doc["meta"].setdefault("name", doc["summary"].get("name") or p.parent.name or p.stem)
    doc["meta"]["results_path"] = str(p)
    return doc


def result_name(doc: dict) -> str:
    return str(doc.get("meta", {}).get("name") or doc.get("summary", {}).get("name") or "?")


def compare(candidate: dict, baseline: dict, *, gate: float = 0.02, seed: int = 0, n_boot: int = 2000,
            verdicts: Optional[dict[str, str]] = None) -> dict:
    """The comparison document (stored in summary.json under "compare")."""
    base_by_id = {str(c["id"]): c for c in baseline["cases"]}
    cand_ids = [str(c["id"]) for c in candidate["cases"]]
    paired = [(c, base_by_id[str(c["id"])]) for c in candidate["cases"] if str(c["id"]) in base_by_id]
    if not paired:
        raise UserError("candidate and baseline results share no case ids; were they run on the same suite?",
                        file=candidate.get("meta", {}).get("results_path"), field="cases")
    cand_pass = [bool(c["pass"]) for c, _ in paired]
    base_pass = [bool(b["pass"]) for _, b in paired]
    regressions = [str(c["id"]) for c, b in paired if b["pass"] and not c["pass"]]
    improvements = [str(c["id"]) for c, b in paired if c["pass"] and not b["pass"]]
    outcomes = {}
    for c, b in paired:
        cid = str(c["id"])
        if verdicts and cid in verdicts:
            v = verdicts[cid]
            outcomes[cid] = "win" if v == "candidate" else "loss" if v == "baseline" else "tie"
        else:
            outcomes[cid] = "win" if c["pass"] and not b["pass"] else "loss" if b["pass"] and not c["pass"] else "tie"
    n = len(paired)
    wins = sum(o == "win" for o in outcomes.values())
    losses = sum(o == "loss" for o in outcomes.values())
    ties = n - wins - losses
    acc_c, acc_b = sum(cand_pass) / n, sum(base_pass) / n
    lo, hi = bootstrap_delta_ci(base_pass, cand_pass, n_boot=n_boot, seed=seed)
    g = apply_gate(len(regressions), n, gate)
    return {
        "candidate": result_name(candidate),
        "baseline": result_name(baseline),
        "n": n,
        "only_in_candidate": sum(1 for i in cand_ids if i not in base_by_id),
        "only_in_baseline": len(base_by_id) - n,
        "accuracy": {"candidate": round(acc_c, 6), "baseline": round(acc_b, 6), "delta": round(acc_c - acc_b, 6)},
        "wins": wins, "losses": losses, "ties": ties,
        "win_rate": round((wins + 0.5 * ties) / n, 6),
        "outcome_source": "judge" if verdicts else "scorers",
        "regressions": regressions,
        "improvements": improvements,
        "regression_rate": round(len(regressions) / n, 6),
        "mcnemar": {"b_regressions": len(regressions), "c_improvements": len(improvements),
                    "p_value": mcnemar_exact(len(regressions), len(improvements))},
        "delta_ci": {"level": 0.95, "low": round(lo, 6), "high": round(hi, 6), "n_boot": n_boot, "seed": seed},
        "gate": g.to_json(),
        "outcomes": outcomes,
    }
