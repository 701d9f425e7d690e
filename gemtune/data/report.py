"""report.json and report.html of a dataset build.

The JSON is the machine-readable record the model card and the training stage read (counts, PII per type,
token lengths, balance, guidance). The HTML shows the same for a person, self-contained (inline SVG charts, no
scripts, no network), so it opens offline from a laptop or a CI artifact.
"""

from __future__ import annotations

import html
import json
import re
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from gemtune.data.pii import PII_TYPES
from gemtune.data.split import group_of
from gemtune.errors import UserError

MIN_EXAMPLES, MAX_EXAMPLES = 2000, 10000
IDENTITY = ("input_rows = train - generic_added + eval + quarantined + exact_duplicates + near_duplicates "
            "+ decontaminated + balanced_out")


def read_report(directory: str | Path) -> dict:
    """The report.json of a dataset directory `gemtune data build` wrote; a UserError naming the file otherwise."""
    p = Path(directory) / "report.json"
    if not p.is_file():
        raise UserError("no report.json: not a dataset directory built by `gemtune data build`", file=str(directory))
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"unreadable report: {e}", file=str(p)) from None


def _percentile(sorted_vals: list[int], q: float) -> int:
    if not sorted_vals:
        return 0
    k = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def token_stats(lengths: list[int], max_tokens: int, bins: int = 24) -> dict:
    vals = sorted(lengths)
    if not vals:
        return {"count": 0}
    hi = max(vals[-1], 1)
    width = max(1, -(-hi // bins))
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, v // width)] += 1
    return {
        "count": len(vals), "total": sum(vals), "min": vals[0], "mean": round(statistics.fmean(vals), 1),
        "p50": _percentile(vals, 0.5), "p90": _percentile(vals, 0.9), "p99": _percentile(vals, 0.99), "max": vals[-1],
        "max_tokens": max_tokens,
        "histogram": {"edges": [i * width for i in range(bins + 1)], "counts": counts},
    }


def _tokens_section(train: list[int], evals: list[int], max_tokens: int, max_length: Optional[int], sampled: bool,
                    n_rows: int) -> dict:
    """Token statistics; on large builds they come from a uniform sample (the limit itself is always exact)."""
    out = {"train": token_stats(train, max_tokens), "eval": token_stats(evals, max_tokens),
           "all": token_stats(train + evals, max_tokens), "sampled": sampled}
    if sampled and out["all"].get("count"):
        a = out["all"]
        a["max"] = max(a["max"], max_length or 0)  # the longest rows are always counted
        a["estimated_total"] = round(a["mean"] * n_rows)
        del a["total"]
        out["note"] = (f"percentiles and histogram from a uniform sample of {a['count']:,} of {n_rows:,} rows; "
                       "every row that could exceed max_tokens was counted exactly")
    return out


def _reason_kind(reason: str) -> str:
    """Group quarantine reasons: numbers and quoted values vary per row, the kind does not."""
    r = re.sub(r"'[^']*'|\"[^\"]*\"(?!:)", "…", reason)
    r = re.sub(r"(?<![A-Za-z\-])\d+", "N", r)
    return r[:120]


def _groups(c: Counter) -> dict[str, int]:
    return {group_of(t, l): n for (t, l), n in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def guidance(n_domain: int) -> list[str]:
    if n_domain < MIN_EXAMPLES:
        return [f"only {n_domain} domain examples: LoRA fine-tunes usually need at least {MIN_EXAMPLES:,} curated "
                "examples; expect a weak adapter or add data"]
    if n_domain > MAX_EXAMPLES:
        return [f"{n_domain:,} domain examples: beyond {MAX_EXAMPLES:,} quality matters more than quantity; "
                "consider reviewing or sampling before paying for longer training"]
    return []


PROVENANCE_ROWS = 100


def provenance_table(kept: Counter, quarantined: Counter, dropped: Counter, require_review: Optional[list[str]]
                     ) -> dict:
    """Rows per (source, review_status, license): kept (written to train or eval), quarantined (with a reason in
    quarantine.jsonl), dropped (duplicates, decontaminated, balanced out, generic rows not mixed in). Domain and
    generic rows alike; the most kept first, at most PROVENANCE_ROWS rows (the rest summed into one row)."""
    keys = sorted(set(kept) | set(quarantined) | set(dropped),
                  key=lambda k: (-kept[k], -quarantined[k], tuple(str(x) for x in k)))
    rows = [{"source": k[0], "review_status": k[1], "license": k[2], "kept": kept[k], "quarantined": quarantined[k],
             "dropped": dropped[k]} for k in keys]
    if len(rows) > PROVENANCE_ROWS:
        rest = rows[PROVENANCE_ROWS - 1:]
        rows = rows[:PROVENANCE_ROWS - 1] + [{
            "source": f"({len(rest)} more)", "review_status": None, "license": None,
            **{c: sum(r[c] for r in rest) for c in ("kept", "quarantined", "dropped")}}]
    return {"columns": ["source", "review_status", "license", "kept", "quarantined", "dropped"], "rows": rows,
            "totals": {c: sum(r[c] for r in rows) for c in ("kept", "quarantined", "dropped")},
            "require_review": list(require_review) if require_review else None}


def build_report(*, cfg, counts: dict, files: list[dict], base: dict, pii: dict, pii_quarantine: dict,
                 control_tokens: int, quarantine: list[dict], exact: list, near: list, decon: dict, conflicts: list,
                 examples: list, ids: list, train_lengths: list[int], eval_lengths: list[int], train_groups: Counter,
                 eval_groups: Counter, balance: dict, generic: Optional[dict], split: dict, warnings: list[str],
                 n_domain_examples: int, max_length: Optional[int] = None, sampled: bool = False,
                 provenance: Optional[dict] = None, benchmarks: Optional[dict] = None) -> dict:
    domain_q = [q for q in quarantine if not q.get("generic")]
    by_stage = Counter(q["stage"] for q in domain_q)
    after_sanitise = counts["input_rows"] - by_stage["sanitise"]
    after_review = after_sanitise - by_stage["review"]
    after_schema = after_review - by_stage["schema"]
    after_read = after_schema - by_stage["benchmark"]
    after_tokens = after_read - by_stage["tokens"]
    after_dedup = after_tokens - counts["exact_duplicates"] - counts["near_duplicates"] - counts["decontaminated"]
    after_ids = after_dedup - by_stage["ids"]
    # Decontamination happens during dedup (with a lock) or right after the split (scoped dedup); both are shown
    # in the dedup stage so each stage's in = out + removed.
    train_domain = counts["train"] - counts["generic_added"]
    stages = [
        {"stage": "read + sanitise + PII", "in": counts["input_rows"], "out": after_sanitise,
         "quarantined": by_stage["sanitise"]},
        {"stage": "review (require_review)", "in": after_sanitise, "out": after_review, "quarantined": by_stage["review"]},
        {"stage": "answer schema", "in": after_review, "out": after_schema, "quarantined": by_stage["schema"]},
        {"stage": "benchmark decontamination", "in": after_schema, "out": after_read,
         "quarantined": by_stage["benchmark"]},
        {"stage": "token limit", "in": after_read, "out": after_tokens, "quarantined": by_stage["tokens"]},
        {"stage": "dedup + decontaminate", "in": after_tokens, "out": after_dedup,
         "exact_duplicates": counts["exact_duplicates"], "near_duplicates": counts["near_duplicates"],
         "decontaminated": counts["decontaminated"]},
        {"stage": "unique ids", "in": after_dedup, "out": after_ids, "quarantined": by_stage["ids"]},
        {"stage": "split", "in": after_ids, "out": after_ids, "eval": counts["eval"], "train": after_ids - counts["eval"]},
        {"stage": "balance (train)", "in": after_ids - counts["eval"], "out": train_domain, "balanced_out": counts["balanced_out"]},
        {"stage": "generic mix", "in": train_domain, "out": counts["train"], "generic_added": counts["generic_added"]},
    ]
    near_examples = [{"dropped": {"id": ids[i], "file": examples[i].file, "line": examples[i].line, "key": examples[i].key_text[:160]},
                      "kept": {"id": ids[j], "file": examples[j].file, "line": examples[j].line, "key": examples[j].key_text[:160]},
                      "jaccard": round(s, 3)} for i, j, s in near[:20]]
    decon_examples = [{"dropped": {"id": ids[i], "file": examples[i].file, "line": examples[i].line},
                       "eval_id": ids[j], "jaccard": round(s, 3)} for i, (j, s) in list(decon.items())[:20]]
    warn = list(warnings) + guidance(n_domain_examples)
    frac = split.get("fraction_actual", 0)
    if split.get("locked") and frac < 0.10:
        warn.append(f"the locked eval set is now {frac:.1%} of the domain rows; consider --refreeze for a 10–15 % eval")
    if conflicts:
        warn.append(f"{len(conflicts)} label conflict(s): the same input appears with different outputs")
    return {
        "version": 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": files,
        "base": base,
        "counts": counts,
        "accounting": {"identity": IDENTITY, "holds": True},
        "stages": stages,
        "quarantine": {
            "total": len(quarantine), "domain": len(domain_q), "file": "quarantine.jsonl",
            "by_reason": dict(Counter(_reason_kind(q["reason"]) for q in quarantine).most_common(20)),
            "first": [{"file": q["file"], "line": q["line"], "reason": q["reason"]} for q in quarantine[:20]],
        },
        "pii": {t: pii.get(t, 0) for t in PII_TYPES} | {t: n for t, n in pii.items() if t not in PII_TYPES},
        "pii_engine": cfg.pii_engine,
        "pii_names": cfg.pii_names,
        "pii_in_quarantine": dict(pii_quarantine),
        "control_tokens_neutralised": control_tokens,
        "dedup": {
            "definition": "Jaccard >= %.2f on character 5-gram shingles of the normalised key "
                          "(input, or user turns; lowercase letters/digits/spaces)" % cfg.near_dup_threshold,
            "scope": cfg.dedup_scope,
            "exact_duplicates": counts["exact_duplicates"], "near_duplicates": counts["near_duplicates"],
            "label_conflicts": len(conflicts), "conflicts": conflicts[:20], "near_examples": near_examples,
        },
        "decontamination": {"count": counts["decontaminated"], "examples": decon_examples,
                            "benchmarks": benchmarks},
        "provenance": provenance,
        "split": {**split, "eval_groups": _groups(eval_groups)},
        "tokens": _tokens_section(train_lengths, eval_lengths, cfg.max_tokens, max_length, sampled,
                                  counts["train"] + counts["eval"]),
        "balance": {**balance, "train_final": _groups(train_groups)},
        "generic": generic,
        "guidance": {"domain_examples": n_domain_examples, "min": MIN_EXAMPLES, "max": MAX_EXAMPLES},
        "warnings": warn,
        "config": cfg.model_dump(mode="json"),
    }


# ------------------------------------------------------------------------------------------------ HTML
def _e(x: Any) -> str:
    return html.escape(str(x))


def svg_histogram(edges: list[int], counts: list[int], *, width: int = 640, height: int = 220, limit: Optional[int] = None) -> str:
    if not counts:
        return "<p>no rows</p>"
    pad, top = 40, max(counts) or 1
    bw = (width - pad - 40) / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" role="img" '
             f'aria-label="token length histogram">']
    for k, c in enumerate(counts):
        h = (height - 20) * c / top
        x = pad + k * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" fill="#4c78a8">'
                     f'<title>{edges[k]}–{edges[k + 1]} tokens: {c}</title></rect>')
    for k in range(0, len(edges), max(1, len(edges) // 6)):
        parts.append(f'<text x="{pad + k * bw:.1f}" y="{height + 15}" font-size="11">{edges[k]}</text>')
    parts.append(f'<text x="0" y="12" font-size="11">{top}</text><text x="0" y="{height}" font-size="11">0</text>')
    if limit and edges[-1] > 0:
        x = pad + (width - pad - 40) * min(1.0, limit / edges[-1])
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#e45756" stroke-dasharray="4"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(items: dict[str, int], *, width: int = 640, max_items: int = 40, cap: Optional[int] = None) -> str:
    rows = list(items.items())[:max_items]
    if not rows:
        return "<p>no rows</p>"
    label_w, bar_h = 220, 16
    top = max(n for _, n in rows) or 1
    height = bar_h * len(rows) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="counts per group">']
    for k, (name, n) in enumerate(rows):
        y = k * bar_h + 4
        w = (width - label_w - 60) * n / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 11}" font-size="11" text-anchor="end">{_e(name[:34])}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 3}" fill="#72b7b2"><title>{_e(name)}: {n}</title></rect>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 11}" font-size="11">{n}</text>')
    if cap:
        x = label_w + (width - label_w - 60) * min(1.0, cap / top)
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#e45756" stroke-dasharray="4"/>')
    if len(items) > max_items:
        parts.append(f'<text x="{label_w}" y="{height - 1}" font-size="10">… {len(items) - max_items} more</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict] | dict, cols: Optional[list[str]] = None) -> str:
    if isinstance(rows, dict):
        return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows.items()) + "</table>"
    if not rows:
        return "<p>none</p>"
    cols = cols or sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;margin:4px 0}
.ok{color:#2a7a2a}code{background:#f4f4f4;padding:0 3px}"""


def render_html(r: dict) -> str:
    c = r["counts"]
    tok = r["tokens"]["all"]
    bal = r.get("balance") or {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gemtune dataset report</title><style>{CSS}</style></head><body>",
             f"<h1>Dataset report</h1><p>Built {_e(r['created_at'])} for base <code>{_e(r['base']['name'])}</code> "
             f"({_e(r['base'].get('template', ''))} template).</p>"]
    for w in r.get("warnings", []):
        parts.append(f"<div class='warn'>{_e(w)}</div>")
    parts.append("<h2>Counts</h2>" + _table(c))
    parts.append(f"<p class='ok'>Accounting holds: <code>{_e(r['accounting']['identity'])}</code></p>")
    parts.append("<h2>Stages</h2>" + _table(r["stages"], ["stage", "in", "out", "quarantined", "exact_duplicates",
                                                          "near_duplicates", "decontaminated", "eval", "train",
                                                          "balanced_out", "generic_added"]))
    parts.append("<h2>PII redacted (per type)</h2>" + _table(r["pii"]) +
                 f"<p>Control tokens neutralised: {r['control_tokens_neutralised']}</p>")
    if tok.get("count"):
        parts.append("<h2>Token lengths (full example, chat template included)</h2>"
                     + _table({k: tok[k] for k in ("count", "min", "mean", "p50", "p90", "p99", "max", "max_tokens")})
                     + svg_histogram(tok["histogram"]["edges"], tok["histogram"]["counts"], limit=tok["max_tokens"])
                     + (f"<p>{_e(r['tokens']['note'])}</p>" if r["tokens"].get("note") else ""))
    parts.append("<h2>Train: task / label balance</h2>"
                 f"<p>median group {bal.get('median')}, cap {bal.get('cap')} (multiple {bal.get('multiple')}); "
                 f"rows removed: {c['balanced_out']}</p>" + svg_bars(bal.get("train_final", {}), cap=bal.get("cap")))
    parts.append("<h2>Eval: task / label</h2>"
                 f"<p>{c['eval']} rows, {r['split'].get('fraction_actual', 0):.1%} of domain rows "
                 f"({'frozen by ' + _e(r['split']['lock_file']) if r['split'].get('locked') else 'newly frozen'}).</p>"
                 + svg_bars(r["split"].get("eval_groups", {})))
    d = r["dedup"]
    parts.append(f"<h2>Duplicates</h2><p>{_e(d['definition'])}. Exact: {d['exact_duplicates']}, near: "
                 f"{d['near_duplicates']}, label conflicts: {d['label_conflicts']}, decontaminated: {c['decontaminated']}.</p>")
    if d["near_examples"]:
        parts.append(_table([{"jaccard": x["jaccard"], "dropped": f"{x['dropped']['file']}:{x['dropped']['line']} {x['dropped']['key']}",
                              "kept": f"{x['kept']['file']}:{x['kept']['line']} {x['kept']['key']}"} for x in d["near_examples"][:10]]))
    bm = (r.get("decontamination") or {}).get("benchmarks")
    if bm:
        parts.append(f"<h2>Benchmark decontamination</h2><p>{bm['removed']} domain and {bm['generic_removed']} "
                     "generic row(s) near-duplicated a benchmark row and were quarantined.</p>"
                     + _table(bm["files"], ["file", "column", "rows", "texts", "skipped", "sha256"])
                     + _table(bm["examples"][:10], ["file", "line", "benchmark", "benchmark_line", "jaccard"]))
    prov = r.get("provenance")
    if prov:
        need = prov.get("require_review")
        parts.append("<h2>Provenance</h2><p>"
                     + (f"Only rows with review_status in {_e(', '.join(need))} were kept. " if need
                        else "No review was required (<code>data.require_review</code> unset). ")
                     + "Kept: written to train or eval; dropped: duplicates, decontaminated, balanced out or generic "
                       "rows not mixed in.</p>"
                     + _table([{k: ("—" if v is None else v) for k, v in row.items()} for row in prov["rows"]],
                              prov["columns"]))
    q = r["quarantine"]
    parts.append(f"<h2>Quarantine</h2><p>{q['total']} row(s) in <code>{_e(q['file'])}</code>.</p>"
                 + _table([{"reason": k, "rows": n} for k, n in q["by_reason"].items()])
                 + _table(q["first"], ["file", "line", "reason"]))
    if r.get("generic"):
        parts.append("<h2>Generic mix</h2>" + _table({k: v for k, v in r["generic"].items() if k != "files"}))
    parts.append("<h2>Inputs</h2>" + _table(r["inputs"], ["file", "rows", "quarantined", "sha256"]))
    parts.append("</body></html>")
    return "\n".join(parts)
