"""Print the extraction example's field-level results: adapter vs base, free and schema-constrained decoding.

    python summarise.py OUT [t0 t1 t2 t3]     (OUT holds eval/results.json and eval/baseline_results.json)

Writes OUT/extraction.json and prints one table per decoding: per-key F1 (adapter, base), then micro F1,
exact-match, valid-JSON and schema-valid rates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gemtune.evals.scorers import CONSTRAINED_SCORES, field_summary


def blocks(doc: dict | None) -> dict:
    """{"free": json block, "constrained": json block} of one results document (missing ones left out)."""
    if not doc:
        return {}
    rows = doc["cases"]
    out = {"free": field_summary(rows).get("json"), "constrained": field_summary(rows, CONSTRAINED_SCORES).get("json")}
    return {k: v for k, v in out.items() if v}


def fmt(v) -> str:
    return "   –  " if v is None else f"{v:6.3f}"


def table(name: str, cand: dict, base: dict | None) -> None:
    print(f"\n{name}: per-key F1 (adapter vs base)")
    for k, v in cand["per_key"].items():
        b = (base or {}).get("per_key", {}).get(k)
        print(f"  {k:<14} {fmt(v['f1'])}   base {fmt(b['f1'] if b else None)}   (support {v['support']})")
    for label, key in (("micro F1", None), ("exact match", "exact_match"), ("valid JSON", "valid"),
                       ("schema-valid", "schema_valid")):
        c = cand["micro"]["f1"] if key is None else cand.get(key)
        b = None if base is None else base["micro"]["f1"] if key is None else base.get(key)
        print(f"  {label:<14} {fmt(c)}   base {fmt(b)}")


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    cand = json.loads((out / "eval" / "results.json").read_text())
    base_file = out / "eval" / "baseline_results.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else None
    c, b = blocks(cand), blocks(base)
    summary = cand.get("summary", {})
    res = {"cases": len(cand["cases"]), "adapter": c, "base": b, "eval_line": summary.get("line")}
    if len(argv) == 5:
        t0, t1, t2, t3 = map(int, argv[1:])
        res["minutes"] = {"data": round((t1 - t0) / 60, 1), "train": round((t2 - t1) / 60, 1),
                          "eval": round((t3 - t2) / 60, 1)}
    (out / "extraction.json").write_text(json.dumps(res, indent=2) + "\n")
    for mode in ("free", "constrained"):
        if mode in c:
            table("unconstrained decoding" if mode == "free" else "decoded under the schema", c[mode], b.get(mode))
    if "constrained" not in c:
        print("\n(no schema-constrained outputs in results.json: this gemtune's eval does not decode under the schema)")
    print(f"\n{summary.get('line', '')}\nfull results: {out / 'extraction.json'}, report: {out / 'eval' / 'report.html'}")


if __name__ == "__main__":
    main(sys.argv[1:])
