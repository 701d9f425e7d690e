"""`gemtune eval` end to end on a tiny model: exit 0 pass, 1 gate failed, 2 input error."""

import json
import shutil
import subprocess
import sys

from gemtune.evals.suite import load_suite
from gemtune.registry.store import inspect_adapter


def baseline_results(suite, passed: bool, path):
    cases = [{"id": c.id, "output": "", "pass": passed} for c in load_suite(suite).cases]
    path.write_text(json.dumps({"meta": {"name": "prod"}, "cases": cases}))
    return path


def test_eval_cli_pass_and_fail(adapter3, tmp_path, cli, suite_writer, http_recorder, capsys):
    suite = suite_writer(tmp_path / "s.jsonl", n=6, scorers=[{"type": "exact"}])  # expected "x": never produced
    hook = http_recorder()
    args = ["eval", "--adapter", str(adapter3), "--suite", str(suite), "--max-new-tokens", "4",
            "--slack-webhook", hook.url]
    # the baseline got nothing right: nothing can regress
    rc = cli(args + ["--out", str(tmp_path / "ok"), "--baseline", str(baseline_results(suite, False, tmp_path / "b0.json"))])
    assert rc == 0
    s = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert s["shippable"] is True and s["compare"]["baseline"] == "prod"
    # the baseline got everything right and the candidate nothing: 100 % regressions, exit 1, files still written
    rc = cli(args + ["--out", str(tmp_path / "bad"), "--baseline", str(baseline_results(suite, True, tmp_path / "b1.json"))])
    assert rc == 1
    s = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert s["shippable"] is False and s["compare"]["regression_rate"] == 1.0
    assert "6/6 cases regressed" in " ".join(capsys.readouterr().err.split())
    assert len(hook.posts) == 2 and hook.posts[1]["body"]["text"].endswith("FAIL")


def test_eval_cli_base_and_config(tiny_gemma3, tmp_path, cli, suite_writer):
    suite = suite_writer(tmp_path / "s.jsonl", n=3)
    y = tmp_path / "gemtune.yaml"
    y.write_text("eval:\n  max_new_tokens: 3\n  batch_size: 2\n")
    assert cli(["eval", "--adapter", "base", "--base", str(tiny_gemma3), "--suite", str(suite),
                "--out", str(tmp_path / "o"), "--config", str(y)]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["meta"]["generation"]["max_new_tokens"] == 3 and res["meta"]["generation"]["batch_size"] == 2
    assert "compare" not in res["summary"] and all(c["new_tokens"] <= 3 for c in res["cases"])


def test_eval_cli_input_errors_exit_2(adapter3, tmp_path, cli, capsys):
    def err():  # rich wraps long lines on stderr
        return " ".join(capsys.readouterr().err.split())

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "expected": "y"}\n{"id": "b", "prompt": "x"}\n')
    assert cli(["eval", "--adapter", str(adapter3), "--suite", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f'{bad}:2: field "expected": missing' in err()
    assert not (tmp_path / "o").exists()  # nothing generated or written for a bad suite
    assert cli(["eval", "--adapter", str(tmp_path / "nope"), "--suite", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "adapter directory not found" in err()
    assert cli(["eval", "--suite", str(bad)]) == 2
    assert "missing --adapter, --out" in err()


def test_real_entry_point_exit_code(adapter3, tmp_path, suite_writer):
    suite = suite_writer(tmp_path / "s.jsonl", n=2, scorers=["exact"])
    b = baseline_results(suite, True, tmp_path / "b.json")
    r = subprocess.run([sys.executable, "-m", "gemtune.cli", "eval", "--adapter", str(adapter3), "--suite", str(suite),
                        "--out", str(tmp_path / "o"), "--baseline", str(b), "--max-new-tokens", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stdout.strip().endswith("FAIL")


def test_cli_rerun_with_no_cache_gives_identical_outputs(adapter4, tmp_path, cli, suite_writer):
    suite = suite_writer(tmp_path / "s.jsonl", n=5)
    args = ["eval", "--adapter", str(adapter4), "--suite", str(suite), "--max-new-tokens", "6", "--baseline", "none"]
    assert cli(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli(args + ["--out", str(tmp_path / "b"), "--no-cache"]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert b["summary"]["generation"]["cases_generated"] == 5 and b["summary"]["generation"]["cache_hits"] == 0
    assert [c["output"] for c in a["cases"]] == [c["output"] for c in b["cases"]]
    assert [c["pass"] for c in a["cases"]] == [c["pass"] for c in b["cases"]]


def test_eval_record_writes_verdict_the_registry_honours(adapter3, tmp_path, cli, suite_writer, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter3, adapter)
    suite = suite_writer(tmp_path / "s.jsonl", n=4, scorers=["exact"])  # expected "x": the adapter never passes
    args = ["eval", "--adapter", str(adapter), "--suite", str(suite), "--max-new-tokens", "2", "--record"]
    before = json.loads((adapter / "gemtune.json").read_text())
    # refused before anything runs: no gate, a smoke run, or the base
    for extra, needle in ((["--baseline", "none"], "needs a gate"), (["--max-cases", "2"], "needs the full suite")):
        assert cli(args + ["--out", str(tmp_path / "x")] + extra) == 2
        assert needle in " ".join(capsys.readouterr().err.split())
    assert cli(["eval", "--adapter", "base", "--suite", str(suite), "--out", str(tmp_path / "x"), "--record"]) == 2
    assert not (tmp_path / "x").exists() and json.loads((adapter / "gemtune.json").read_text()) == before
    # a baseline that got everything right: 100 % regressions, exit 1, verdict recorded, push refused
    rc = cli(args + ["--out", str(tmp_path / "bad"), "--baseline", str(baseline_results(suite, True, tmp_path / "b1.json"))])
    side = json.loads((adapter / "gemtune.json").read_text())
    assert rc == 1 and side["shippable"] is False and side["eval"]["gate_passed"] is False
    assert side["base_model"] == before["base_model"]  # what training wrote is kept
    assert inspect_adapter(adapter)[3] == ['gemtune.json says "shippable": false',
                                           "gemtune.json says eval.gate_passed: false"]  # what push refuses on
    # a baseline that got nothing right: exit 0, the verdict flips, the push goes through
    rc = cli(args + ["--out", str(tmp_path / "ok"), "--baseline", str(baseline_results(suite, False, tmp_path / "b0.json"))])
    side = json.loads((adapter / "gemtune.json").read_text())
    assert rc == 0 and side["shippable"] is True and side["eval"]["compare"]["baseline"] == "prod"
    assert inspect_adapter(adapter)[3] == []
