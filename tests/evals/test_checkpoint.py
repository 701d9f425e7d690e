"""Eval at every checkpoint: files per checkpoint, baseline once, shippable in gemtune.json, best.json, and a
real training run with eval_every."""

import json
import shutil

import pytest

from gemtune.adapter import weights_sha256
from gemtune.evals.checkpoint import make_checkpoint_evaluator, mark_best
from gemtune.evals.config import EvalConfig
from gemtune.evals.pipeline import Evaluator
from gemtune.evals.suite import load_suite
from gemtune.utils import sha256_file


def exact_suite_from_base(base, path, tmp, suite_writer, n=8):
    """A suite the base gets 100 % right (expected = the base's own greedy output), so any changed answer regresses."""
    raw = suite_writer(tmp / "raw.jsonl", n=n)
    cfg = EvalConfig(max_new_tokens=8, batch_size=4)
    res = Evaluator(base, config=cfg).run(load_suite(raw, cfg))
    rows = [{"id": c["id"], "prompt": json.loads(line)["prompt"], "expected": c["output"], "scorers": ["exact"]}
            for c, line in zip(res["cases"], raw.read_text().splitlines())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_checkpoint_hook_gates_records_and_marks_best(tiny_gemma3, tmp_path, suite_writer, adapter_maker,
                                                      http_recorder):
    suite = exact_suite_from_base(tiny_gemma3, tmp_path / "suite.jsonl", tmp_path, suite_writer)
    run = tmp_path / "run"
    good = adapter_maker(tiny_gemma3, run / "checkpoint-2", std=0.0)  # B = 0: answers exactly like the base
    bad = adapter_maker(tiny_gemma3, run / "checkpoint-4", std=0.5)
    for ck, step in ((good, 2), (bad, 4)):
        (ck / "gemtune.json").write_text(json.dumps({"base_model": str(tiny_gemma3), "step": step, "config": {"r": 4}}))
    hook = http_recorder()
    printed = []
    fn = make_checkpoint_evaluator(suite, str(tiny_gemma3), baseline="base", gate=0.02, webhook=hook.url,
                                   batch_size=4, config=EvalConfig(max_new_tokens=8), echo=printed.append)
    s2 = fn(good, 2)
    baseline_doc = fn.baseline_results()
    s4 = fn(bad, 4)
    assert fn.baseline_results() is baseline_doc  # computed once, reused for every checkpoint
    assert baseline_doc["summary"]["accuracy"] == 1.0

    assert s2["shippable"] is True and s2["compare"]["regressions"] == [] and s2["step"] == 2
    assert s4["shippable"] is False and s4["compare"]["regression_rate"] > 0.02 and s4["step"] == 4
    for ck, s in ((good, s2), (bad, s4)):
        assert sorted(p.name for p in (ck / "eval").iterdir()) == ["report.html", "results.json", "summary.json"]
        side = json.loads((ck / "gemtune.json").read_text())
        assert side["step"] == s["step"] and side["config"] == {"r": 4}  # training's keys survive
        assert side["shippable"] is s["shippable"] and side["eval"]["line"] == s["line"]
        (v,) = side["eval_verdicts"]  # bound to the checkpoint's weights, the suite and the base it was gated against
        assert (v["baseline"], v["baseline_id"], v["passed"]) == ("base", f"base:{tiny_gemma3}", s["shippable"])
        assert v["adapter_sha256"] == weights_sha256(ck) and v["suite_sha256"] == sha256_file(suite)
    assert printed == [s2["line"], s4["line"]] and s4["line"].startswith("checkpoint-4 acc ") and s4["line"].endswith("FAIL")
    assert [p["body"]["text"] for p in hook.posts] == printed
    # the second checkpoint's report charts both
    assert "Accuracy per checkpoint" in (bad / "eval" / "report.html").read_text()
    assert "Accuracy per checkpoint" not in (good / "eval" / "report.html").read_text()

    best = mark_best(run)
    assert best["checkpoint"] == "checkpoint-2" and json.loads((run / "best.json").read_text()) == best
    assert [c["shippable"] for c in best["checkpoints"]] == [True, False]

    # the registry refuses the checkpoint that failed the gate (its contract with gemtune.json)
    from gemtune.registry.store import gate_problems

    assert gate_problems(json.loads((bad / "gemtune.json").read_text()))
    assert not gate_problems(json.loads((good / "gemtune.json").read_text()))


def test_mark_best_with_no_passing_checkpoint(tmp_path):
    ck = tmp_path / "checkpoint-1" / "eval"
    ck.mkdir(parents=True)
    (ck / "summary.json").write_text(json.dumps({"accuracy": 0.9, "shippable": False, "step": 1}))
    assert mark_best(tmp_path)["checkpoint"] is None


def test_baseline_from_saved_results(tiny_gemma3, adapter3, tmp_path, suite_writer):
    suite = suite_writer(tmp_path / "s.jsonl", n=4)
    cases = [{"id": f"c{i}", "output": "", "pass": False} for i in range(4)]
    (tmp_path / "base.json").write_text(json.dumps({"meta": {"name": "prod-v3"}, "cases": cases}))
    ck = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(adapter3, ck)
    fn = make_checkpoint_evaluator(suite, str(tiny_gemma3), baseline=str(tmp_path / "base.json"),
                                   config=EvalConfig(max_new_tokens=4), echo=lambda s: None)
    s = fn(ck, 1)
    assert s["compare"]["baseline"] == "prod-v3" and s["shippable"] is True  # nothing the baseline passed regressed


def _route_dataset(d):
    queues = ["billing", "refund", "login", "shipping"]
    rows = [{"id": f"r{i}", "label": queues[i % 4], "messages": [
        {"role": "user", "content": f"Route: my {queues[i % 4]} issue {i}"},
        {"role": "assistant", "content": queues[i % 4]}]} for i in range(24)]
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    return d


def test_training_run_with_eval_every_writes_one_summary_per_checkpoint(tiny_gemma3, tmp_path):
    trainer = pytest.importorskip("gemtune.train.trainer", reason="training stage not built")
    from gemtune.train.config import TrainConfig

    data = _route_dataset(tmp_path / "data")
    run = tmp_path / "run"
    lines = []
    hook = make_checkpoint_evaluator(data / "eval.jsonl", str(tiny_gemma3), baseline="base", gate=0.02,
                                     config=EvalConfig(max_new_tokens=6), echo=lines.append)
    cfg = TrainConfig(base=str(tiny_gemma3), batch_size=4, lr=1e-3, seed=7, eval_every=2)
    trainer.train(data, run, cfg, stop_after=4, on_checkpoint=hook, progress=False)
    summaries = sorted(run.glob("checkpoint-*/eval/summary.json"))
    assert [p.parent.parent.name for p in summaries] == ["checkpoint-2", "checkpoint-4"]
    for p in summaries:
        s = json.loads(p.read_text())
        side = json.loads((p.parent.parent / "gemtune.json").read_text())
        assert s["n"] == 8 and side["eval"]["line"] == s["line"] and isinstance(side["shippable"], bool)
        assert s["name"] == p.parent.parent.name and s["step"] == int(s["name"].split("-")[1])
    assert len(lines) == 2 and all(" vs base) " in ln for ln in lines)
    best = mark_best(run)
    assert best["checkpoint"] in (None, "checkpoint-2", "checkpoint-4") and len(best["checkpoints"]) == 2
    # the final adapter carries the last checkpoint's verdict
    final = json.loads((run / "adapter" / "gemtune.json").read_text())
    assert "shippable" in final and final["eval"]["step"] == 4


def test_train_cli_with_eval_every_evaluates_each_checkpoint_and_names_the_best(tiny_gemma3, tmp_path, cli):
    """`gemtune train --eval-every` wires the hook (the dataset's eval.jsonl by default, the base as baseline) and,
    once training returns, writes best.json (evals.checkpoint.checkpoint_evals)."""
    data = _route_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(run), "--base", str(tiny_gemma3), "--batch-size", "4",
                "--lr", "1e-3", "--seed", "7", "--eval-every", "2", "--stop-after-steps", "4", "--eval-max-cases", "3",
                "--gate", "1.0"]) == 0
    summaries = {p.parent.parent.name: json.loads(p.read_text()) for p in run.glob("checkpoint-*/eval/summary.json")}
    assert sorted(summaries) == ["checkpoint-2", "checkpoint-4"] and {s["n"] for s in summaries.values()} == {3}
    assert all(s["shippable"] is True for s in summaries.values())  # --gate 1.0 passes every checkpoint
    best = json.loads((run / "best.json").read_text())
    assert best["checkpoint"] in summaries and [r["checkpoint"] for r in best["checkpoints"]] == sorted(summaries)
    # an --eval-max-cases smoke run vouches for no weights: no verdict bound to them
    assert all("eval_verdicts" not in json.loads((run / n / "gemtune.json").read_text()) for n in summaries)


def test_train_cli_gate_baseline_is_resolved_before_training(tiny_gemma3, tmp_path, cli, capsys, monkeypatch):
    """`train --gate-baseline registry:NAME@ALIAS` with no registry, or one that does not exist: exit 2 before a
    single step is trained."""
    monkeypatch.delenv("GEMTUNE_REGISTRY", raising=False)
    data = _route_dataset(tmp_path / "data")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--base", str(tiny_gemma3), "--batch-size",
            "4", "--eval-every", "2", "--stop-after-steps", "2", "--gate-baseline", "registry:support-router@prod"]
    assert cli(args) == 2
    assert "needs a registry" in " ".join(capsys.readouterr().err.split())
    assert cli(args + ["--registry", str(tmp_path / "nope")]) == 2
    assert "registry directory does not exist" in " ".join(capsys.readouterr().err.split())
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_checkpoint_eval_runs_on_the_training_model_not_a_second_base(tiny_gemma3, tmp_path, monkeypatch):
    """The hook evaluates the in-memory training model (adapter on for the checkpoint, off for the base): the base
    is never loaded a second time, and the outputs equal those of the saved checkpoint on a freshly loaded base."""
    from gemtune.evals import pipeline
    from gemtune.train.config import TrainConfig
    from gemtune.train.trainer import train

    data = _route_dataset(tmp_path / "data")
    loads = []
    real_init = pipeline.Evaluator.__init__

    def counting_init(self, *a, **k):
        loads.append(a)
        real_init(self, *a, **k)

    monkeypatch.setattr(pipeline.Evaluator, "__init__", counting_init)
    cfg_eval = EvalConfig(max_new_tokens=6, batch_size=4)
    hook = make_checkpoint_evaluator(data / "eval.jsonl", str(tiny_gemma3), baseline="base", gate=1.0,
                                     config=cfg_eval, echo=lambda s: None, no_cache=True)
    # lean: false keeps the frozen base in fp32, so a fresh fp32 base must give the very same outputs
    cfg = TrainConfig(base=str(tiny_gemma3), batch_size=4, lr=5e-3, seed=7, eval_every=2, lean=False)
    train(data, tmp_path / "run", cfg, stop_after=4, on_checkpoint=hook, progress=False)
    assert loads == []  # no second copy of the base
    from gemtune.base.lean_tokenizer import LeanTokenizer

    assert isinstance(hook._live_tok[0], LeanTokenizer)  # nor of its tokenizer: the trainer's prompts and decode table
    fresh = Evaluator(str(tiny_gemma3), config=cfg_eval)
    suite = load_suite(data / "eval.jsonl", cfg_eval)
    base_outputs = [c["output"] for c in fresh.run(suite)["cases"]]
    assert [c["output"] for c in hook.baseline_results()["cases"]] == base_outputs
    for step in (2, 4):
        ck = tmp_path / "run" / f"checkpoint-{step}"
        live = json.loads((ck / "eval" / "results.json").read_text())
        assert [c["output"] for c in live["cases"]] == [c["output"] for c in fresh.run(suite, ck)["cases"]]
    # the adapter really changed something (else the comparison above proves little)
    assert [c["output"] for c in live["cases"]] != base_outputs


RSS_DRIVER = """
import json, resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print(json.dumps({"rc": r.returncode, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stderr": r.stderr[-3000:]}))
"""


@pytest.mark.slow
def test_eval_every_adds_under_15_percent_peak_rss_on_the_real_base(real_base, tmp_path):
    """A training run with --eval-every evaluates on the model in memory: its peak RSS stays within 15 % of the
    same run without the eval (a second fp32 copy of the 270M base alone would add ~1 GB, well over 15 %, and a
    second Gemma tokenizer ~0.32 GiB: measured +25 % before the eval took the trainer's prompts and a decode table,
    `LeanTokenizer`; +3 % after, 1.28 -> 1.32 GiB).
    Each run is the child of a small driver process, so ru_maxrss of its children is the run's own peak. The
    base is given as its directory: this folder's fixtures point GEMTUNE_HOME at an empty cache, where pulling
    `gemma-3-270m` would convert it again inside the measured run."""
    import subprocess
    import sys

    data = _route_dataset(tmp_path / "data")
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"train:\n  base: {real_base}\n  batch_size: 4\n  max_len: 128\n"
                 "eval:\n  max_new_tokens: 8\n  batch_size: 8\n")
    driver = tmp_path / "driver.py"
    driver.write_text(RSS_DRIVER)

    def peak_gib(out, *extra) -> float:
        cmd = [sys.executable, str(driver), sys.executable, "-m", "gemtune.cli", "train", "--data", str(data),
               "--out", str(tmp_path / out), "--config", str(y), "--max-steps", "2", "--save-every", "2", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["rc"] == 0, res["stderr"]
        return res["peak_kib"] / 2**20

    plain = peak_gib("plain")
    with_eval = peak_gib("eval", "--eval-every", "2", "--eval-max-cases", "8")
    assert (tmp_path / "eval" / "checkpoint-2" / "eval" / "summary.json").is_file()  # the eval did run
    print(f"peak RSS without --eval-every {plain:.2f} GiB, with it {with_eval:.2f} GiB")
    assert with_eval < 1.15 * plain, (plain, with_eval)
