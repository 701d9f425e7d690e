"""`gemtune card` on the real pipeline (tiny base): data build with PII, duplicates and a canary → training with the
eval hook → probe → card written from the sidecars alone. Every number in the card is checked against the file it
came from; the YAML front matter is parsed back; missing stages say "not run"."""

import json
import random
import re

import pytest

from gemtune.card import build_card, parse_front_matter

QUEUES = ["bill", "refund", "login", "ship"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _raw_rows(n: int = 60) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        q = QUEUES[i % 4]
        text = f"ticket {i}: trouble with my {q} {rng.choice(['today', 'again', 'since monday', 'please help'])}"
        if i % 10 == 3:
            text += f", mail me at user{i}@example.com"
        if i % 10 == 7:
            text += " or call (415) 555-01" + f"{i:02d}"
        rows.append({"id": f"t{i}", "input": text, "output": q, "label": q, "task": "route"})
    rows += [dict(rows[5], id="dup-a"), dict(rows[6], id="dup-b")]  # exact duplicates
    return rows


@pytest.fixture(scope="module")
def pipeline(tiny_gemma3, tmp_path_factory):
    """data build → train (eval hook every 2 steps) → probe, as the CLI wires them."""
    from gemtune.data.config import DataConfig
    from gemtune.data.pipeline import build
    from gemtune.evals.checkpoint import make_checkpoint_evaluator
    from gemtune.evals.config import EvalConfig
    from gemtune.privacy.config import PrivacyConfig
    from gemtune.privacy.probe import run_probe
    from gemtune.train.config import TrainConfig
    from gemtune.train.trainer import train

    root = tmp_path_factory.mktemp("card")
    raw = root / "tickets.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in _raw_rows()))
    data = root / "tickets"
    report = build([raw], data, DataConfig(base=str(tiny_gemma3), instruction="Route the ticket.", canaries=1))
    hook = make_checkpoint_evaluator(data / "eval.jsonl", str(tiny_gemma3), baseline="base", gate=0.5,
                                     config=EvalConfig(max_new_tokens=6), echo=lambda s: None)
    cfg = TrainConfig(base=str(tiny_gemma3), batch_size=8, lr=1e-3, seed=3, eval_every=2)
    res = train(data, root / "run", cfg, stop_after=2, on_checkpoint=hook, progress=False)
    probe = run_probe(res.adapter_dir, None, root / "probe.json",
                      config=PrivacyConfig(samples=4, candidates=16, pii_samples=4))
    return {"root": root, "data": data, "report": report, "adapter": res.adapter_dir, "probe": probe}


def test_card_front_matter_parses_back_with_eval_results(pipeline):
    side = json.loads((pipeline["adapter"] / "gemtune.json").read_text())
    meta = parse_front_matter(build_card(pipeline["adapter"]))
    assert meta["base_model"] == side["base_model"] and meta["library_name"] == "peft"
    assert meta["license"] == "gemma" and meta["base_model_relation"] == "adapter"
    assert meta["datasets"] == ["tickets"] and {"gemtune", "lora", "route"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "run"
    metrics = {m["name"]: m["value"] for m in entry["results"][0]["metrics"]}
    ev = side["eval"]
    assert metrics["Accuracy (adapter)"] == round(ev["accuracy"], 4)
    assert metrics["Accuracy (base)"] == round(ev["compare"]["accuracy"]["baseline"], 4)
    assert metrics["Win-rate vs baseline"] == round(ev["compare"]["win_rate"], 4)
    assert entry["results"][0]["dataset"]["split"] == "eval"


def test_card_body_is_filled_from_the_sidecars(pipeline):
    card = build_card(pipeline["adapter"])
    rep = json.loads((pipeline["data"] / "report.json").read_text())
    dataset = json.loads((pipeline["data"] / "dataset.json").read_text())
    side = json.loads((pipeline["adapter"] / "gemtune.json").read_text())
    for section in ("## Model details", "## Uses", "### Out-of-scope use", "## Bias, risks, and limitations",
                    "## Training details", "## Evaluation", "## Privacy", "### Residual risk",
                    "## Environmental impact", "## How to serve"):
        assert section in card
    # dataset report: rows, PII per type, dedup, eval lock
    assert rep["pii"]["EMAIL"] == 6 and rep["pii"]["PHONE"] == 6  # what the raw rows planted
    assert f"| EMAIL | {rep['pii']['EMAIL']} |" in card and f"| PHONE | {rep['pii']['PHONE']} |" in card
    assert f"| exact duplicates removed | {rep['counts']['exact_duplicates']} |" in card
    assert rep["counts"]["exact_duplicates"] == 2
    assert f"| train rows | {rep['counts']['train']} |" in card and "| canaries planted | 1 |" in card
    assert f"`{dataset['eval_lock_sha256']}`" in card and "changed since training" not in card
    # training: preset, rank, steps, trainable %
    assert "| preset | default |" in card and "| LoRA rank / alpha / dropout | 16 / 32 / 0.05 |" in card
    assert "| steps | 2 (planned 7) |" in card and f"({side['trainable_pct']}%)" in card
    # hardware the trainer recorded (this machine has no GPU)
    hw = side["hardware"]
    assert hw["device"] == "cpu" and hw["processes"] == 1 and hw["cpu_cores"] >= 1 and "gpu" not in hw
    assert f"- **Hardware:** device: cpu, cpu: {hw['cpu']}, cpu_cores: {hw['cpu_cores']}," in card
    # evaluation: accuracy vs baseline, McNemar, CI, gate
    cmp = side["eval"]["compare"]
    assert f"| accuracy | {100 * cmp['accuracy']['candidate']:.1f}% | {100 * cmp['accuracy']['baseline']:.1f}% |" in card
    assert f"| McNemar exact p | {cmp['mcnemar']['p_value']:.4f} |" in card
    assert f"95% CI {100 * cmp['delta_ci']['low']:.1f}% to {100 * cmp['delta_ci']['high']:.1f}%" in card
    gate = "PASS" if side["eval"]["gate"]["passed"] else "FAIL"
    assert f"| regression gate | {gate} (limit 50.0% of cases) |" in card
    # privacy from the probe report recorded in gemtune.json
    probe = pipeline["probe"]
    assert f"Probe report: `{probe['report']}`" in card
    can = probe["canaries"]["adapter"]
    assert f"| canary exposure, mean (bits) | {can['mean_exposure']:.2f} |" in card
    # serving lines
    assert f"--enable-lora --max-lora-rank 16 --lora-modules run={pipeline['adapter'].resolve()}" in card
    assert "gemtune serve --registry registry" in card
    assert "not run" not in card.split("## Environmental impact")[0]  # every stage ran


def test_eval_dir_overrides_the_sidecar_and_a_changed_dataset_is_flagged(pipeline, tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    summary = json.loads((pipeline["adapter"] / "gemtune.json").read_text())["eval"]
    summary = dict(summary, accuracy=0.875,
                   compare=dict(summary["compare"], accuracy={"candidate": 0.875, "baseline": 0.25, "delta": 0.625}))
    (ev / "summary.json").write_text(json.dumps(summary))
    (ev / "results.json").write_text(json.dumps({"meta": {"suite": {"path": "suite.jsonl", "n": 8, "sha256": "ab" * 32}},
                                                 "cases": []}))
    adapter = tmp_path / "adapter"
    import shutil

    shutil.copytree(pipeline["adapter"], adapter)
    side = json.loads((adapter / "gemtune.json").read_text())
    side["dataset"]["eval_lock_sha256"] = "0" * 64
    (adapter / "gemtune.json").write_text(json.dumps(side))
    card = build_card(adapter, eval_dir=ev)
    assert "measured on other adapter weights" not in card  # a copy of the probed weights is the same adapter
    other = tmp_path / "other.json"
    doc = json.loads(open(pipeline["probe"]["report"]).read())
    other.write_text(json.dumps(dict(doc, adapter_sha256="f" * 64)))
    assert f"measured on other adapter weights (sha256 `{'f' * 64}`)" in build_card(adapter, probe=other)
    meta = parse_front_matter(card)
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.875
    assert "Suite `suite.jsonl`: 8 cases" in card and "| accuracy | 87.5% | 25.0% |" in card
    assert "| accuracy change | +62.5% (95% CI" in card
    assert f"trained against lock `{'0' * 64}`: the dataset directory changed since training" in card


def test_bare_adapter_card_says_not_run_and_invents_nothing(tiny_gemma3, tmp_path, cli):
    from peft import LoraConfig, get_peft_model

    from gemtune.base.loader import load_base

    model, _ = load_base(tiny_gemma3)
    adapter = tmp_path / "my-adapter"
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    out = tmp_path / "README.md"
    assert cli("card", "--adapter", adapter, "--out", out) == 0
    card = out.read_text()
    meta = parse_front_matter(card)
    assert meta["base_model"] == str(tiny_gemma3) and meta["library_name"] == "peft"
    assert "model-index" not in meta and meta["datasets"] == []
    assert "Evaluation: not run" in card and "Privacy probes: not run" in card
    assert "eval gate not run; privacy probe not run" in card
    assert "memorised is unmeasured" in card
    assert "- **Preset:** not recorded" in card and "- **Hardware:** not recorded" in card
    assert "rank 8, alpha 16" in card and "q_proj, v_proj" in card


HOSTILE_LABELS = ["billing/refunds", "a`b", "x|y", "x`<script>alert(1)</script>", "line1\n\n# Injected heading",
                  "**bold** [link](http://evil.example)", "``", " <img src=x onerror=alert(2)> "]


def test_card_escapes_hostile_labels_and_never_splits_on_slash(tmp_path):
    """Labels, tasks, names and report strings are user data: they render as the characters they hold, never as
    Markdown or HTML, and task/label structure comes from the rows' fields, not from splitting on "/"."""
    import html

    from markdown_it import MarkdownIt

    from gemtune.card import one_line

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": f"r{i}", "task": "support/es", "label": lab, "messages": []} for i, lab in enumerate(HOSTILE_LABELS)]
    rows.append({"id": "g", "task": "plain", "messages": []})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "report.json").write_text(json.dumps({
        "balance": {"train_final": {f"support/es/{lab}": 1 for lab in HOSTILE_LABELS}},
        "counts": {"train": len(rows)}, "pii": {"EMAIL|<b>x</b>": 1},
        "warnings": ["<script>alert(3)</script> | *x*\n\n## Injected warning"],
        "inputs": [{"file": "in|put<script>.jsonl", "rows": 3, "quarantined": 0, "sha256": "ab" * 32}]}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / "gemtune.json").write_text(json.dumps({
        "base_model": "evil`base|<script>alert(4)</script>", "dataset": {"dir": str(data)},
        "preset": "*p* | <b>x</b>", "hardware": {"device": "cpu", "cpu": "<img src=x onerror=alert(5)>"}}))
    card = build_card(adapter, name="my`card <script>alert(6)</script>\n# Injected")
    page = MarkdownIt("commonmark", {"html": True}).enable("table").render(card.split("\n---\n", 1)[1])
    assert "<script" not in page and "<img" not in page and "<b>" not in page  # no raw HTML gets through
    assert "Injected" not in "".join(re.findall(r"<h[1-6]>.*?</h[1-6]>", page)[1:])  # only the title heading
    assert "<strong>bold</strong>" not in page and 'href="http://evil.example"' not in page
    # structure from the fields: one task "support/es" with every label, each shown whole in its own code span
    m = re.search(r"<li><code>support/es</code>: answers with one of (\d+) labels seen in training: (.*?)\.</li>",
                  page)
    assert m and int(m.group(1)) == len(HOSTILE_LABELS)
    codes = re.findall(r"<code>(.*?)</code>", m.group(2))
    want = [html.escape(one_line(lab), quote=False).replace('"', "&quot;").strip() for lab in HOSTILE_LABELS]
    assert sorted(c.strip() for c in codes) == sorted(want)
    assert "<li><code>plain</code>: the task of the training rows tagged <code>plain</code>.</li>" in page
    assert "<code>support</code>" not in page and "<code>es/billing/refunds</code>" not in page
    # table cells keep a "|" inside one cell
    assert "<td>EMAIL|&lt;b&gt;x&lt;/b&gt;</td>" in page and "<td>in|put&lt;script&gt;.jsonl</td>" in page
    for table in re.findall(r"<table>.*?</table>", page, re.S):
        widths = {len(re.findall(r"<t[hd]>", row)) for row in re.findall(r"<tr>.*?</tr>", table, re.S)}
        assert len(widths) == 1, table
    # the front matter still parses; only plain words become Hub tags
    meta = parse_front_matter(card)
    assert meta["tags"] == ["gemtune", "lora", "peft", "text-generation", "plain"]
    assert meta["base_model"] == "evil`base|<script>alert(4)</script>"


def test_card_says_when_names_were_not_redacted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"id": "r0", "task": "t", "messages": []}) + "\n")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / "gemtune.json").write_text(json.dumps({"base_model": "b", "dataset": {"dir": str(data)}}))
    note = "Personal names were not redacted (`data.pii_names: false`)."
    for names, said in ((False, True), (True, False), (None, False)):
        report = {"counts": {"train": 1}, "pii": {"EMAIL": 2}, "pii_engine": "builtin"}
        if names is not None:
            report["pii_names"] = names
        (data / "report.json").write_text(json.dumps(report))
        card = build_card(adapter)
        assert "PII redacted before training (engine `builtin`)" in card
        assert (note in card) is said, names


def test_card_is_registered_by_its_own_module_not_by_privacy():
    import typer

    from gemtune import card_commands
    from gemtune.cli import STAGE_COMMANDS
    from gemtune.privacy import commands as privacy_commands

    for module, verbs in ((card_commands, ["card"]), (privacy_commands, ["probe"])):
        app = typer.Typer()
        module.register(app)
        assert [c.name for c in app.registered_commands] == verbs
    assert "gemtune.card_commands" in STAGE_COMMANDS


def test_front_matter_is_read_by_the_one_yaml_reader_with_file_and_line():
    from gemtune.errors import UserError

    assert parse_front_matter("---\nlicense: gemma\n---\n# x\n") == {"license": "gemma"}
    with pytest.raises(UserError) as e:
        parse_front_matter("---\nlicense: gemma\ntags: [a, b\n  - c: d\n---\n# x\n", "README.md")
    assert str(e.value).startswith("README.md:4: invalid YAML: ")


def test_card_states_provenance_and_review_from_the_dataset_report(tiny_gemma3, tmp_path):
    """The provenance table (source × review status × license: kept, quarantined, dropped) and the review the
    build required come from the dataset's report.json; the numbers are the report's."""
    from gemtune.data.config import DataConfig
    from gemtune.data.pipeline import build

    rows = []
    for i in range(30):
        status = ["approved", "pending", "approved"][i % 3]
        rows.append({"id": f"r{i}", "input": f"ticket {i}: my card {1000 + 37 * i} was charged twice on day {i}",
                     "output": "billing", "source": "crm" if i < 20 else "email", "license": "internal",
                     "review_status": status})
    rows.append(dict(rows[0], id="dup"))  # an approved crm row again: dropped as a duplicate
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": rows[3]["input"].upper()}) + "\n")  # row 3 (approved crm) leaks
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "data"
    report = build([raw], data, DataConfig(base=str(tiny_gemma3), instruction="Route.", require_review=["approved"],
                                           decontaminate=[{"path": str(bench)}]))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / "gemtune.json").write_text(json.dumps({"base_model": "b", "dataset": {"dir": str(data)}}))
    card = build_card(adapter)
    # crm rows 0-19: 13 approved (12 kept, the benchmark copy quarantined) + the duplicate, 7 pending;
    # email rows 20-29: 7 approved, 3 pending
    assert "| source | review status | license | kept | quarantined | dropped |" in card
    assert "| crm | approved | internal | 12 | 1 | 1 |" in card
    assert "| email | approved | internal | 7 | 0 | 0 |" in card
    assert "| crm | pending | internal | 0 | 7 | 0 |" in card
    assert "| email | pending | internal | 0 | 3 | 0 |" in card
    kept = sum(r["kept"] for r in report["provenance"]["rows"])
    assert kept == report["counts"]["train"] + report["counts"]["eval"] == 19
    assert "Only rows whose review status is one of `approved` were kept" in card
    assert f"Benchmark decontamination against `{bench}`: 1 domain and 0 generic row(s)" in card

    (data / "report.json").write_text(json.dumps({"counts": {"train": 1}}))  # a report from before provenance
    assert "| crm | approved | internal | 12 | 1 | 1 |" in build_card(adapter)  # dataset.json holds it too
    dataset = json.loads((data / "dataset.json").read_text())
    del dataset["provenance"]
    (data / "dataset.json").write_text(json.dumps(dataset))
    assert "Provenance (source, review status, license): not recorded." in build_card(adapter)
