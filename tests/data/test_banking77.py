"""banking77 (../shared/datasets) builds as a routing task; its report renders; token counts match the template.

Skips when the dataset folder is absent. The `slow` test uses the real Gemma 3 270M tokenizer.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from gemtune.data.config import DataConfig
from gemtune.data.pipeline import build
from gemtune.data.records import load_dataset_dir

ROUTING = "Route this banking support request to the right queue. Answer with the queue name only."


def _cfg(base) -> DataConfig:
    return DataConfig(base=str(base), instruction=ROUTING,
                      columns={"input": "text", "output": "category", "label": "category"})


def test_banking77_builds_as_routing(banking77, tiny_gemma3, tmp_path):
    out = tmp_path / "b77"
    report = build([banking77 / "train.csv"], out, _cfg(tiny_gemma3))
    c = report["counts"]
    assert c["input_rows"] == 10003 and c["quarantined"] == 0
    assert c["input_rows"] == (c["train"] + c["eval"] + c["exact_duplicates"] + c["near_duplicates"]
                               + c["decontaminated"] + c["balanced_out"])
    assert 0.10 <= c["eval"] / (c["train"] + c["eval"]) <= 0.15
    train, evals, meta = load_dataset_dir(out)
    labels = {r["label"] for r in evals}
    assert len(labels) == 77  # stratified by label: every queue is in eval
    r = train[0]
    assert r["messages"][0]["content"].startswith(ROUTING + "\n\n") and r["messages"][1]["content"] == r["label"]
    assert r["provenance"]["source"] == "train.csv"
    assert report["tokens"]["all"]["max"] <= 2048 and report["guidance"]["domain_examples"] == c["train"] + c["eval"]


def test_cli_map_flags_and_report_html_renders(cli, banking77, tiny_gemma3, tmp_path, chromium):
    out = tmp_path / "cli"
    assert cli("data", "build", banking77 / "test.csv", "--out", out, "--base", tiny_gemma3, "-q",
               "--instruction", ROUTING, "--map", "input=text", "--map", "output=category", "--map", "label=category") == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("<svg") >= 3 and "Accounting holds" in html and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    assert "Dataset report" in dom and dom.count("<rect") > 77  # histogram bars + one bar per queue


@pytest.mark.slow
def test_real_tokenizer_counts_equal_render(banking77, real_base, tmp_path):
    from gemtune.base.families import GEMMA3_TEXT
    from gemtune.base.loader import load_tokenizer
    from gemtune.base.templates import render

    out = tmp_path / "real"
    report = build([banking77 / "test.csv"], out, _cfg(real_base))
    train, evals, meta = load_dataset_dir(out)
    tok = load_tokenizer(real_base)
    lengths = sorted(len(render(r["messages"], tok, GEMMA3_TEXT).input_ids) for r in train + evals)
    assert report["tokens"]["all"]["max"] == lengths[-1] and report["tokens"]["all"]["min"] == lengths[0]
    assert report["tokens"]["all"]["total"] == sum(lengths)
    assert meta["base"]["template"] == "gemma3"
    assert json.loads((out / "dataset.json").read_text())["tokenizer_sha256"] == meta["tokenizer_sha256"]
