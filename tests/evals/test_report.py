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
