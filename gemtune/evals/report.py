"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) a reviewer can open offline.

Order follows what a reviewer needs: the verdict, then regressions (the cases that block shipping), then
improvements and other changed answers, then the rest; baseline and candidate side by side with the words that
differ highlighted; and, over a training run, accuracy per checkpoint. Structured answers (`json`, `tool_call`
scorers) get per-field results — exact-match, valid and schema-valid rates, micro and per-key P/R/F1 — and, versus
the baseline, the fields whose F1 dropped, largest drop first.
"""

from __future__ import annotations

import difflib
import html
import json
import re
from typing import Optional

from gemtune.evals.scorers import CONSTRAINED_SCORES, field_regressions, field_summary

MAX_ROWS = 2000
_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} h3{font-size:15px;margin:14px 0 6px}
.muted{color:#66707a}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #d8dde3;border-radius:8px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:19px} .card span{color:#66707a;font-size:12px}
.pass{color:#0a7d32} .fail{color:#b3261e} .verdict{font-weight:700;padding:2px 8px;border-radius:6px}
.verdict.pass{background:#e4f5e9} .verdict.fail{background:#fbe7e6}
table{border-collapse:collapse;width:100%;margin:6px 0} th,td{border:1px solid #e0e4e8;padding:5px 7px;vertical-align:top;text-align:left}
th{background:#f4f6f8;font-weight:600} td.out{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;max-width:38em}
tr.regression td:first-child{border-left:4px solid #b3261e} tr.improvement td:first-child{border-left:4px solid #0a7d32}
del{background:#fbd3d0;text-decoration:line-through} ins{background:#cdeed6;text-decoration:none}
.tag{display:inline-block;background:#eef1f4;border-radius:4px;padding:0 5px;margin:1px;font-size:12px}
code{font-size:12.5px}
"""


def esc(v) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        v = json.dumps(v, ensure_ascii=False)
    return html.escape(v)


def word_diff(a: str, b: str) -> tuple[str, str]:
    """(a with removed words in <del>, b with added words in <ins>), escaped."""
    ta, tb = _TOKEN.findall(a or ""), _TOKEN.findall(b or "")
    sm = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
    out_a, out_b = [], []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        sa, sb = html.escape("".join(ta[i1:i2])), html.escape("".join(tb[j1:j2]))
        if op == "equal":
            out_a.append(sa)
            out_b.append(sb)
            continue
        if sa:
            out_a.append(f"<del>{sa}</del>")
        if sb:
            out_b.append(f"<ins>{sb}</ins>")
    return "".join(out_a), "".join(out_b)


def _card(value: str, label: str, cls: str = "") -> str:
    return f'<div class="card"><b class="{cls}">{value}</b><span>{esc(label)}</span></div>'


def _fmt(v, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.1%}" if pct else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def summary_cards(summary: dict, comparison: Optional[dict]) -> str:
    cards = [_card(f"{summary['accuracy']:.3f}", f"accuracy ({summary['passed']}/{summary['n']})")]
    if summary.get("format_compliance") is not None:
        cards.append(_card(f"{summary['format_compliance']:.3f}", f"format compliance ({summary['format_checked']} checked)"))
    if comparison:
        acc = comparison["accuracy"]
        ci = comparison["delta_ci"]
        g = comparison["gate"]
        cards += [
            _card(f"{acc['baseline']:.3f}", f"baseline accuracy ({comparison['baseline']})"),
            _card(f"{acc['delta']:+.3f}", f"delta, 95% CI [{ci['low']:+.3f}, {ci['high']:+.3f}]",
                  "pass" if acc["delta"] >= 0 else "fail"),
            _card(f"{comparison['win_rate']:.3f}", f"win-rate ({comparison['wins']}W {comparison['losses']}L "
                  f"{comparison['ties']}T, {comparison['outcome_source']})"),
            _card(f"{comparison['regression_rate']:.1%}", f"regressions ({g['regressions']}/{g['n']}), gate {g['threshold']:.1%}",
                  "pass" if g["passed"] else "fail"),
            _card(f"{comparison['mcnemar']['p_value']:.3g}", "McNemar exact p"),
        ]
    lat = summary.get("latency_ms")
    if lat:
        cards.append(_card(f"{lat['p50']:.0f} / {lat['p95']:.0f} ms", "latency p50 / p95 (unbatched)"))
    gen = summary.get("generation") or {}
    if gen.get("cases_per_s"):
        cards.append(_card(f"{gen['cases_per_s']:.2f}/s", f"cases generated/s ({gen['tokens_per_s']:.0f} tok/s)"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _breakdown(title: str, d: dict) -> str:
    if not d:
        return ""
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v['n']}</td><td>{v['passed']}</td><td>{_fmt(v.get('accuracy'))}</td></tr>"
                   for k, v in sorted(d.items()))
    return f"<h2>{esc(title)}</h2><table><tr><th>{esc(title.split()[-1])}</th><th>n</th><th>passed</th><th>accuracy</th></tr>{rows}</table>"


def accuracy_chart(history: list[dict], width: int = 640, height: int = 240) -> str:
    """Inline SVG: accuracy per checkpoint (red when the gate failed), baseline dashed."""
    pts = [h for h in history if h.get("accuracy") is not None]
    if len(pts) < 2:
        return ""
    pts.sort(key=lambda h: h.get("step") or 0)
    pad_l, pad_r, pad_t, pad_b = 48, 16, 14, 34
    xs = [float(h.get("step") or i) for i, h in enumerate(pts)]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    def sx(x):
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)
    def sy(y):
        return pad_t + (1 - y) * (height - pad_t - pad_b)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="accuracy per checkpoint">']
    for y in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e5e8eb"/>'
                     f'<text x="{pad_l - 6}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end" fill="#66707a">{y:.2f}</text>')
    base = next((h["baseline_accuracy"] for h in pts if h.get("baseline_accuracy") is not None), None)
    if base is not None:
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{sy(base):.1f}" y2="{sy(base):.1f}" stroke="#66707a" '
                     f'stroke-dasharray="5 4"/><text x="{width - pad_r}" y="{sy(base) - 4:.1f}" font-size="11" '
                     f'text-anchor="end" fill="#66707a">baseline {base:.2f}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(h['accuracy']):.1f}" for i, (x, h) in enumerate(zip(xs, pts)))
    parts.append(f'<path d="{path}" fill="none" stroke="#1f6feb" stroke-width="2"/>')
    for x, h in zip(xs, pts):
        color = "#b3261e" if h.get("gate_passed") is False else "#0a7d32"
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(h["accuracy"]):.1f}" r="4" fill="{color}">'
                     f'<title>{esc(h.get("name"))}: {h["accuracy"]:.3f}</title></circle>'
                     f'<text x="{sx(x):.1f}" y="{height - pad_b + 16}" font-size="11" text-anchor="middle" '
                     f'fill="#66707a">{esc(str(h.get("step", "")))}</text>')
    parts.append(f'<text x="{(pad_l + width - pad_r) / 2}" y="{height - 4}" font-size="11" text-anchor="middle" '
                 f'fill="#66707a">step</text></svg>')
    return "<h2>Accuracy per checkpoint</h2>" + "".join(parts)


_KIND_TITLE = {"json": "JSON fields", "tool_call": "Tool-call arguments"}


def _rate_card(block: dict, base: Optional[dict], key: str, label: str) -> str:
    v = block.get(key)
    if v is None:
        return ""
    b = (base or {}).get(key)
    extra = f", baseline {b:.3f}" if b is not None else ""
    return _card(f"{v:.3f}", label + extra)


def _per_key_table(block: dict, base: Optional[dict]) -> str:
    bk = (base or {}).get("per_key") or {}
    head = "<tr><th>field</th><th>support</th><th>precision</th><th>recall</th><th>F1</th>"
    head += "<th>baseline F1</th><th>ΔF1</th></tr>" if base else "</tr>"
    rows = []
    for k, v in block["per_key"].items():
        cells = [esc(k), str(v["support"]), _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"])]
        if base:
            b = bk.get(k)
            d = None if b is None else v["f1"] - b["f1"]
            cls = "" if d is None or abs(d) < 1e-9 else ' class="fail"' if d < 0 else ' class="pass"'
            cells += [_fmt(b["f1"]) if b else "–", f'<span{cls}>{d:+.3f}</span>' if d is not None else "–"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _regressed_fields(block: dict, base: Optional[dict]) -> str:
    if not base:
        return ""
    drops = field_regressions(block, base)
    if not drops:
        return '<p class="pass">No field regressed versus the baseline.</p>'
    rows = "".join(f'<tr class="regression"><td>{esc(d["key"])}</td><td>{d["support"]}</td><td>{_fmt(d["baseline_f1"])}'
                   f'</td><td>{_fmt(d["f1"])}</td><td class="fail">{-d["drop"]:+.3f}</td></tr>' for d in drops)
    return (f'<h3 class="fail">Fields that regressed ({len(drops)})</h3><table><tr><th>field</th><th>support</th>'
            f"<th>baseline F1</th><th>F1</th><th>ΔF1</th></tr>{rows}</table>")


def field_section(results: dict, baseline: Optional[dict] = None, scores_key: str = "scores", title: str = "") -> str:
    """Per-field results of the structured scorers; empty when none ran."""
    fs = field_summary(results.get("cases") or [], scores_key)
    bfs = field_summary(baseline.get("cases") or [], scores_key) if baseline else {}
    parts = []
    for kind, block in fs.items():
        base = bfs.get(kind)
        micro, bmicro = block["micro"], (base or {}).get("micro")
        cards = [_rate_card(block, base, "exact_match", f"exact match ({block['cases']} cases)"),
                 _rate_card(block, base, "valid", "valid JSON" if kind == "json" else "parseable calls"),
                 _rate_card(block, base, "schema_valid", f"schema-valid ({block.get('schema_checked', 0)} with a schema)"),
                 _card(f"{micro['f1']:.3f}", f"micro F1 (P {micro['precision']:.3f}, R {micro['recall']:.3f})"
                       + (f", baseline {bmicro['f1']:.3f}" if bmicro else ""))]
        if kind == "tool_call":
            cards.append(_rate_card(block, base, "names_ok", "right tools called"))
        parts.append(f"<h2>{esc(_KIND_TITLE[kind] + title)}</h2>" + '<div class="cards">' + "".join(cards) + "</div>"
                     + _regressed_fields(block, base) + _per_key_table(block, base))
    return "".join(parts)


def constrained_section(results: dict, baseline: Optional[dict] = None) -> str:
    """The same per-field results for the outputs decoded under each case's schema (`eval.constrained`)."""
    if not any(c.get(CONSTRAINED_SCORES) for c in results.get("cases") or []):
        return ""
    return field_section(results, baseline, CONSTRAINED_SCORES, " — decoded under the schema")


def _status(c: dict, b: Optional[dict]) -> str:
    if b is None:
        return "pass" if c["pass"] else "fail"
    if b["pass"] and not c["pass"]:
        return "regression"
    if c["pass"] and not b["pass"]:
        return "improvement"
    if (c.get("output") or "") != (b.get("output") or ""):
        return "changed"
    return "same"


_ORDER = {"regression": 0, "fail": 0, "improvement": 1, "changed": 2, "pass": 3, "same": 3}


def _failed_checks(c: dict) -> str:
    bad = [f"{k}: {v.get('detail', 'fail')}" for k, v in (c.get("scores") or {}).items() if v.get("pass") is False]
    return "<br>".join(esc(x) for x in bad)


def cases_table(results: dict, baseline: Optional[dict]) -> str:
    base_by_id = {str(b["id"]): b for b in baseline["cases"]} if baseline else {}
    rows = []
    for i, c in enumerate(results["cases"]):
        b = base_by_id.get(str(c["id"])) if baseline else None
        rows.append((_ORDER[_status(c, b)], i, c, b))
    rows.sort(key=lambda r: (r[0], r[1]))
    shown = rows[:MAX_ROWS]
    head = "<tr><th>case</th><th>status</th><th>prompt</th><th>expected</th>"
    head += "<th>baseline</th><th>candidate</th></tr>" if baseline else "<th>output</th><th>failed checks</th></tr>"
    body = []
    for _, _, c, b in shown:
        st = _status(c, b)
        tags = "".join(f'<span class="tag">{esc(t)}</span>' for t in c.get("tags") or [])
        cells = [f"<td>{esc(c['id'])}<br>{tags}</td>",
                 f'<td class="{"fail" if st in ("regression", "fail") else "pass" if st in ("improvement", "pass") else ""}">{st}</td>',
                 f'<td class="out">{esc(c.get("prompt"))}</td>', f'<td class="out">{esc(c.get("expected"))}</td>']
        if baseline:
            if b is None:
                cells += ['<td class="muted">not in baseline</td>', f'<td class="out">{esc(c.get("output"))}</td>']
            else:
                da, db = word_diff(b.get("output") or "", c.get("output") or "")
                mark = lambda r: '<span class="pass">✓</span> ' if r["pass"] else '<span class="fail">✗</span> '  # noqa: E731
                cells += [f'<td class="out">{mark(b)}{da}</td>', f'<td class="out">{mark(c)}{db}<br>'
                          f'<span class="muted">{_failed_checks(c)}</span></td>']
        else:
            cells += [f'<td class="out">{esc(c.get("output"))}</td>', f"<td>{_failed_checks(c)}</td>"]
        body.append(f'<tr class="{st}">' + "".join(cells) + "</tr>")
    note = (f'<p class="muted">showing {len(shown)} of {len(rows)} cases (regressions and failures first)</p>'
            if len(rows) > len(shown) else "")
    return f"<h2>Cases</h2>{note}<table>{head}{''.join(body)}</table>"


def render_report(results: dict, *, baseline: Optional[dict] = None, comparison: Optional[dict] = None,
                  history: Optional[list[dict]] = None, line: str = "") -> str:
    s = results["summary"]
    meta = results.get("meta", {})
    verdict = ""
    if comparison:
        ok = comparison["gate"]["passed"]
        verdict = f' <span class="verdict {"pass" if ok else "fail"}">{"PASS" if ok else "FAIL: not shippable"}</span>'
    regress = ""
    if comparison and comparison["regressions"]:
        ids = ", ".join(esc(i) for i in comparison["regressions"][:50])
        more = f" … (+{len(comparison['regressions']) - 50})" if len(comparison["regressions"]) > 50 else ""
        regress = f'<h2 class="fail">Regressions ({len(comparison["regressions"])})</h2><p>{ids}{more}</p>'
    suite = meta.get("suite") or {}
    sub = (f'<p class="muted">adapter <code>{esc(meta.get("adapter") or "none")}</code> on base <code>{esc(meta.get("base"))}</code>'
           f' · suite <code>{esc(suite.get("path"))}</code> ({suite.get("n", s.get("n"))} cases, sha256 '
           f'{esc((suite.get("sha256") or "")[:12])})</p>')
    body = [f"<h1>gemtune eval: {esc(s.get('name'))}{verdict}</h1>", sub]
    if line:
        body.append(f"<p><code>{esc(line)}</code></p>")
    body += [summary_cards(s, comparison), regress, field_section(results, baseline), constrained_section(results, baseline),
             accuracy_chart(history or []),
             _breakdown("By scorer", s.get("scorers") or {}), _breakdown("By tag", s.get("tags") or {}),
             cases_table(results, baseline)]
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>gemtune eval: {esc(s.get('name'))}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")
