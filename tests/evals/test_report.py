"""report.html: regressions first, differences highlighted, chart over checkpoints, self-contained; rendered in
headless Chromium (required under `make test`)."""

import re
import subprocess

from gemtune.evals.compare import compare
from gemtune.evals.report import accuracy_chart, render_report, word_diff


def doc(name, rows):
    cases = [{"id": i, "output": o, "pass": p, "prompt": f"prompt {i}", "expected": "e", "tags": ["t"],
              "scores": {"exact": {"pass": p, **({} if p else {"detail": "output differs from expected"})}},
              "latency_ms": None} for i, o, p in rows]
    n, k = len(rows), sum(p for _, _, p in rows)
    summary = {"name": name, "n": n, "passed": k, "accuracy": k / n, "format_compliance": None, "format_checked": 0,
               "scorers": {"exact": {"n": n, "passed": k, "accuracy": k / n}}, "tags": {}, "latency_ms": None}
    return {"meta": {"name": name, "base": "tiny", "adapter": "/runs/a", "suite": {"path": "s.jsonl", "n": n}},
            "cases": cases, "summary": summary}


BASE = doc("base", [("same", "refund", True), ("broke", "billing <b>", True), ("fixed", "nope", False),
                    ("other", "x y z", False)])
CAND = doc("ckpt-4", [("same", "refund", True), ("broke", "shipping <b>", False), ("fixed", "refund", True),
                      ("other", "x q z", False)])


def render(history=None):
    c = compare(CAND, BASE, gate=0.02)
    return render_report(CAND, baseline=BASE, comparison=c, history=history, line="ckpt-4 acc 0.50 ...")


def test_regressions_first_and_differences_highlighted():
    html = render()
    order = [m for m in re.findall(r'<tr class="(\w+)">', html)]
    assert order == ["regression", "improvement", "changed", "same"]
    assert "FAIL: not shippable" in html and "Regressions (1)" in html
    # baseline words removed are <del>, candidate words added are <ins>; markup in outputs is escaped
    assert "<del>billing</del> &lt;b&gt;" in html and "<ins>shipping</ins> &lt;b&gt;" in html
    assert "<del>y</del>" in html and "<ins>q</ins>" in html
    assert "output differs from expected" in html


def test_self_contained_offline():
    html = render()
    assert not re.search(r'(src|href)=["\']?(https?:)?//', html)  # no external resource of any kind
    assert "<script" not in html and "<link" not in html and "@import" not in html


def test_word_diff_and_chart():
    a, b = word_diff("the card is lost", "the card was found")
    assert a == "the card <del>is</del> <del>lost</del>" and b == "the card <ins>was</ins> <ins>found</ins>"
    assert accuracy_chart([{"name": "c", "step": 1, "accuracy": 0.5}]) == ""  # one point: no chart
    svg = accuracy_chart([{"name": "checkpoint-2", "step": 2, "accuracy": 0.4, "baseline_accuracy": 0.3, "gate_passed": True},
                          {"name": "checkpoint-4", "step": 4, "accuracy": 0.6, "gate_passed": False}])
    assert svg.count("<circle") == 2 and "baseline 0.30" in svg and "#b3261e" in svg
    assert "Accuracy per checkpoint" in render([{"name": "a", "step": 1, "accuracy": 0.1},
                                                {"name": "b", "step": 2, "accuracy": 0.2}])


def test_renders_in_headless_chromium(tmp_path, chromium):
    page = tmp_path / "report.html"
    page.write_text(render([{"name": "a", "step": 1, "accuracy": 0.1}, {"name": "b", "step": 2, "accuracy": 0.2}]))
    png = tmp_path / "shot.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                        f"--screenshot={png}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert png.is_file(), r.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 1600)
    # the page really drew something: a blank white page compresses to almost nothing
    from PIL import Image  # matplotlib depends on pillow

    img = Image.open(png).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20


# ---------------------------------------------------------------- per-field results (issue #15)

from gemtune.evals.report import field_section  # noqa: E402
from gemtune.evals.scorers import parse_scorer, score_one, ScoreContext  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"origin": {"type": "string"}, "dest": {"type": "string"}, "kg": {"type": "number"}}}
EXP = {"origin": "Oslo", "dest": "Rome", "kg": 5}


def jdoc(name, outputs):
    cases = []
    for i, out in enumerate(outputs):
        sc = score_one(parse_scorer("json", expected=EXP), out, EXP, ScoreContext(), case_schema=SCHEMA)
        cases.append({"id": f"c{i}", "output": out, "pass": sc.passed, "prompt": "p", "expected": EXP, "tags": [],
                      "scores": {"json": sc.to_json()}, "latency_ms": None})
    n, k = len(cases), sum(c["pass"] for c in cases)
    return {"meta": {"name": name, "suite": {"path": "s.jsonl", "n": n}}, "cases": cases,
            "summary": {"name": name, "n": n, "passed": k, "accuracy": k / n, "format_compliance": None,
                        "format_checked": 0, "scorers": {}, "tags": {}, "latency_ms": None}}


RIGHT = '{"origin": "Oslo", "dest": "Rome", "kg": 5}'
JBASE = jdoc("base", [RIGHT, RIGHT, '{"origin": "Oslo", "dest": "Roma", "kg": 5}', "not json"])
JCAND = jdoc("adapter", [RIGHT, '{"origin": "Bergen", "dest": "Rome", "kg": 7}', '{"origin": "Bergen", "dest": "Rome", "kg": 5.0}',
                         '{"origin": "Oslo", "dest": "Rome", "kg": 5, "extra": 1}'])


def test_report_shows_per_field_results_and_the_fields_that_regressed():
    html = field_section(JCAND, JBASE)
    assert "JSON fields" in html
    # candidate: exact 1/4, valid 4/4, schema-valid 3/4; baseline: exact 2/4, valid 3/4, schema-valid 3/4
    assert "<b class=\"\">0.250</b><span>exact match (4 cases), baseline 0.500</span>" in html
    assert "<b class=\"\">0.750</b><span>schema-valid (4 with a schema), baseline 0.750</span>" in html
    assert "<b class=\"\">1.000</b><span>valid JSON, baseline 0.750</span>" in html
    # per key F1 (baseline's unparseable answer misses all three): origin 0.5 vs 6/7 (drop 0.357), kg 0.75 vs 6/7
    # (drop 0.107), dest 1.0 vs 4/7 (improved, not listed)
    m = re.search(r"Fields that regressed \((\d+)\)</h3>(.*?)</table>", html, re.S)
    assert m and m.group(1) == "2"
    assert re.findall(r'<tr class="regression"><td>(\w+)</td>', m.group(2)) == ["origin", "kg"]  # largest drop first
    assert '<td>0.857</td><td>0.5</td><td class="fail">-0.357</td>' in m.group(2)
    assert '<td>0.857</td><td>0.75</td><td class="fail">-0.107</td>' in m.group(2)
    assert '<td>dest</td><td>4</td><td>1</td><td>1</td><td>1</td><td>0.571</td><td><span class="pass">+0.429</span>' in html
    # without a baseline: no regression list, no baseline column; nothing at all without structured scorers
    alone = field_section(JCAND)
    assert "Fields that regressed" not in alone and "baseline F1" not in alone and "micro F1" in alone
    assert field_section(CAND, BASE) == ""


def test_full_report_with_fields_renders_in_headless_chromium(tmp_path, chromium):
    c = compare(JCAND, JBASE, gate=0.02)
    html = render_report(JCAND, baseline=JBASE, comparison=c, line="adapter ...")
    assert "Fields that regressed (2)" in html and "<script" not in html
    page = tmp_path / "report.html"
    page.write_text(html)
    png = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                    f"--screenshot={png}", page.as_uri()], capture_output=True, text=True, timeout=120)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert len(Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_constrained_outputs_get_their_own_field_section():
    cand = jdoc("adapter", ["not json", RIGHT])
    con = jdoc("adapter", [RIGHT, RIGHT])
    for row, crow in zip(cand["cases"], con["cases"]):
        row["output_constrained"], row["scores_constrained"] = crow["output"], crow["scores"]
    html = render_report(cand)
    free, constrained = html.split("JSON fields — decoded under the schema")
    assert "<b class=\"\">0.500</b><span>valid JSON</span>" in free
    assert "<b class=\"\">1.000</b><span>valid JSON</span>" in constrained
    assert "decoded under the schema" not in render_report(JCAND)
