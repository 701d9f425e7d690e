"""Baselines bound to what is live and verdicts bound to weights: `--baseline registry:NAME@ALIAS` resolves to the
version an alias routes to (baseline_id `registry:NAME@vN`); the checkpoint hook gates against the live version
(better than the base but worse than live: not shippable, and the line names what it lost to); `eval --record`
writes a verdict bound to the weights' sha256, and one changed byte leaves no passing verdict."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from gemtune.adapter import ADAPTER_WEIGHTS, weights_sha256
from gemtune.evals.baselines import auto_spec
from gemtune.evals.cache import OutputCache
from gemtune.evals.config import EvalConfig
from gemtune.evals.pipeline import Evaluator, run_eval
from gemtune.evals.suite import load_suite
from gemtune.evals.verdicts import current_verdicts, passing_verdicts
from gemtune.registry.routes import RouteTable
from gemtune.registry.store import Registry
from gemtune.utils import sha256_file

NAME = "support-router"
GEN = EvalConfig(max_new_tokens=6, batch_size=4)


def _push(reg: Registry, path):
    try:
        return reg.push(NAME, path, require_verdict=False)
    except TypeError:  # a registry without the verdict gate
        return reg.push(NAME, path)


@pytest.fixture(scope="module")
def world(tiny_gemma3, tmp_path_factory, adapter_maker):
    """A registry where `prod` routes to `live` (v1) beside `other` (v2), a candidate adapter, and every model's
    answers on 12 prompts."""
    d = tmp_path_factory.mktemp("baselines")
    live = adapter_maker(tiny_gemma3, d / "live", seed=5, r=8)
    other = adapter_maker(tiny_gemma3, d / "other", seed=7, r=8)
    cand = adapter_maker(tiny_gemma3, d / "cand", seed=9, r=8)
    reg = Registry(d / "registry")
    assert _push(reg, live).version == "v1" and _push(reg, other).version == "v2"
    RouteTable(reg).promote(NAME, "v1", "prod")
    prompts = [f"ticket {i}: " + "please route " * (i % 3) for i in range(12)]
    raw = d / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": f"c{i}", "prompt": p, "expected": "-"}) + "\n" for i, p in enumerate(prompts)))
    ev = Evaluator(tiny_gemma3, config=GEN, cache=OutputCache(d / "cache"))  # not the tests' per-test home
    out = {k: [c["output"] for c in ev.run(load_suite(raw, GEN), a)["cases"]]
           for k, a in (("base", None), ("live", live), ("cand", cand))}
    return {"dir": d, "root": str(d / "registry"), "reg": reg, "live": live, "cand": cand, "prompts": prompts,
            "answers": out}


def _fm(*answers: str) -> dict:
    return {"type": "regex", "pattern": "|".join(re.escape(a) for a in answers), "fullmatch": True}


def live_suite(w, path):
    """Every case passes for the live version; the candidate passes the `shared` ones, the base none: so the
    candidate beats the base and loses to what is live."""
    rows, shared, live_only = [], 0, []
    for i, p in enumerate(w["prompts"]):
        b, c, lv = (w["answers"][k][i] for k in ("base", "cand", "live"))
        if b in (c, lv):
            continue
        if lv != c and len(live_only) <= shared:
            rows.append({"id": f"c{i}", "prompt": p, "expected": lv, "scorers": [_fm(lv)]})
            live_only.append(f"c{i}")
        else:
            rows.append({"id": f"c{i}", "prompt": p, "expected": lv, "scorers": [_fm(lv, c)]})
            shared += 1
    assert shared >= 2 and len(live_only) >= 2, w["answers"]  # random adapters answer differently
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, shared, live_only


def test_registry_alias_baseline_resolves_to_the_live_version(world, tiny_gemma3, tmp_path, cli, capsys,
                                                              monkeypatch):
    suite, shared, live_only = live_suite(world, tmp_path / "suite.jsonl")
    n = shared + len(live_only)
    args = ["eval", "--adapter", str(world["cand"]), "--suite", str(suite), "--max-new-tokens", "6",
            "--batch-size", "4", "--baseline", f"registry:{NAME}@prod"]
    assert cli(args + ["--out", str(tmp_path / "a"), "--registry", world["root"]]) == 1  # loses to live
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["baseline"]["id"] == f"registry:{NAME}@v1" and s["baseline"]["spec"] == f"registry:{NAME}@prod"
    assert s["compare"]["baseline"] == f"registry:{NAME}@v1 (live as prod)"
    assert s["compare"]["accuracy"]["baseline"] == 1.0 and s["compare"]["accuracy"]["candidate"] == pytest.approx(shared / n, abs=1e-6)
    assert s["compare"]["regressions"] == live_only and s["compare"]["regression_rate"] == pytest.approx(len(live_only) / n, abs=1e-6)
    assert f"vs registry:{NAME}@v1 (live as prod))" in s["line"] and s["line"].endswith("FAIL")
    base_doc = json.loads((tmp_path / "a" / "baseline_results.json").read_text())
    assert [c["output"] for c in base_doc["cases"]] == [world["answers"]["live"][int(c["id"][1:])] for c in base_doc["cases"]]

    # $GEMTUNE_REGISTRY names the registry too; an A/B split gates against its largest arm, and says so
    monkeypatch.setenv("GEMTUNE_REGISTRY", world["root"])
    RouteTable(world["reg"]).split(NAME, "canary", {"v1": 30, "v2": 70})
    assert cli(args[:-1] + [f"registry:{NAME}@canary", "--out", str(tmp_path / "b"), "--gate", "1"]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["baseline"]["id"] == f"registry:{NAME}@v2" and "A/B split" in s["baseline"]["note"]
    assert "v2 (70%" in s["baseline"]["note"] and "(live as canary, A/B largest arm)" in s["compare"]["baseline"]

    # nothing routes there, no registry known, a corrupt stored version: exit 2 before any model loads
    assert cli(args[:-1] + [f"registry:{NAME}@staging", "--out", str(tmp_path / "c")]) == 2
    assert f"{NAME}@staging routes nowhere" in " ".join(capsys.readouterr().err.split())
    monkeypatch.delenv("GEMTUNE_REGISTRY")
    assert cli(args + ["--out", str(tmp_path / "c")]) == 2
    assert "needs a registry" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "c").exists()


def test_corrupt_live_version_is_refused(world, tmp_path, cli, capsys, tiny_gemma3, adapter_maker):
    reg = Registry(tmp_path / "reg")
    vi = _push(reg, world["live"])
    RouteTable(reg).promote(NAME, vi.version, "prod")
    w = vi.path / ADAPTER_WEIGHTS
    os.chmod(w, 0o644)
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    suite, _, _ = live_suite(world, tmp_path / "suite.jsonl")
    assert cli(["eval", "--adapter", str(world["cand"]), "--suite", str(suite), "--out", str(tmp_path / "o"),
                "--baseline", f"registry:{NAME}@prod", "--registry", str(tmp_path / "reg")]) == 2
    assert "sha256 mismatch" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "o").exists()


def test_checkpoint_better_than_base_but_worse_than_live_is_not_shippable(world, tiny_gemma3, tmp_path):
    from gemtune.evals.checkpoint import make_checkpoint_evaluator

    suite, shared, live_only = live_suite(world, tmp_path / "suite.jsonl")
    ck = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(world["cand"], ck)
    cfg = GEN.model_copy(update={"registry": world["root"], "live": f"{NAME}@prod"})
    lines: list[str] = []
    # against the base alone it would ship: it only improves
    vs_base = make_checkpoint_evaluator(suite, str(tiny_gemma3), baseline="base", config=cfg, echo=lines.append)(ck, 2)
    assert vs_base["shippable"] is True and vs_base["compare"]["regressions"] == []
    assert vs_base["compare"]["accuracy"]["baseline"] == 0.0 and vs_base["compare"]["improvements"]
    # the default gate (auto) is the version live under eval.live: it loses to it
    hook = make_checkpoint_evaluator(suite, str(tiny_gemma3), baseline="auto", config=cfg, echo=lines.append)
    assert hook.spec.id == f"registry:{NAME}@v1"
    s = hook(ck, 2)
    assert s["shippable"] is False and s["compare"]["regressions"] == live_only
    assert s["compare"]["accuracy"]["baseline"] == 1.0
    line = lines[-1]
    assert line.startswith("checkpoint-2 acc ") and f"vs registry:{NAME}@v1 (live as prod))" in line
    assert line.endswith("FAIL") and json.loads((ck / "gemtune.json").read_text())["eval"]["line"] == line
    # both verdicts kept, each bound to these weights; only the one against the base passed
    vs = current_verdicts(ck)
    assert [(v["baseline_id"], v["passed"]) for v in vs] == [(f"base:{tiny_gemma3}", True),
                                                            (f"registry:{NAME}@v1", False)]
    assert all(v["adapter_sha256"] == weights_sha256(ck) and v["suite_sha256"] == sha256_file(suite) for v in vs)
    assert passing_verdicts(ck, baseline_id=f"registry:{NAME}@v1") == []
    assert [v["baseline_id"] for v in passing_verdicts(ck)] == [f"base:{tiny_gemma3}"]


def test_auto_gate_baseline(world, tmp_path, monkeypatch):
    monkeypatch.delenv("GEMTUNE_REGISTRY", raising=False)
    notes: list[str] = []
    assert auto_spec(EvalConfig()) == "base"
    assert auto_spec(EvalConfig(live=f"{NAME}@prod", registry=world["root"])) == f"registry:{NAME}@prod"
    assert auto_spec(EvalConfig(live=f"{NAME}@prod"), registry=world["root"]) == f"registry:{NAME}@prod"
    assert auto_spec(EvalConfig(live=f"{NAME}@staging", registry=world["root"]), note=notes.append) == "base"
    assert auto_spec(EvalConfig(live=f"{NAME}@prod"), note=notes.append) == "base"
    assert "routes nowhere" in notes[0] and "no registry is known" in notes[1]
    assert auto_spec(EvalConfig(gate_baseline="openai:http://x/v1#m", live=f"{NAME}@prod")) == "openai:http://x/v1#m"
    y = tmp_path / "gemtune.yaml"
    y.write_text("eval:\n  gate_baseline: none\n")
    from gemtune.errors import UserError
    from gemtune.evals.config import load_eval_config

    with pytest.raises(UserError, match="gate_baseline"):
        load_eval_config(y)
    y.write_text("eval:\n  live: support-router\n")
    with pytest.raises(UserError, match="NAME@ALIAS"):
        load_eval_config(y)


def test_record_binds_the_verdict_to_the_weights(adapter3, tmp_path, cli, suite_writer):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter3, adapter)
    suite = suite_writer(tmp_path / "s.jsonl", n=4, scorers=["exact"])  # expected "x": the adapter never passes

    def results_doc(passed: bool, path):
        cases = [{"id": c.id, "output": "", "pass": passed} for c in load_suite(suite).cases]
        path.write_text(json.dumps({"meta": {"name": "prod"}, "cases": cases}))
        return path

    b0, b1 = results_doc(False, tmp_path / "b0.json"), results_doc(True, tmp_path / "b1.json")
    args = ["eval", "--adapter", str(adapter), "--suite", str(suite), "--max-new-tokens", "2", "--record"]
    assert passing_verdicts(adapter) == []  # never evaluated
    assert cli(args + ["--out", str(tmp_path / "o"), "--baseline", str(b0)]) == 0
    side = json.loads((adapter / "gemtune.json").read_text())
    (v,) = side["eval_verdicts"]
    assert v["adapter_sha256"] == weights_sha256(adapter) == sha256_file(adapter / ADAPTER_WEIGHTS)
    assert v["suite_sha256"] == sha256_file(suite) and v["baseline"] == str(b0)
    assert v["baseline_id"] == f"results:{sha256_file(b0)}" and v["passed"] is True and v["forced"] is False
    assert (v["cases"], v["gate"], v["regressed_share"], v["accuracy"], v["baseline_accuracy"]) == (4, 0.02, 0.0, 0.0, 0.0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", v["at"])
    assert passing_verdicts(adapter) == [v]
    # the same weights, suite and baseline again: replaced, not appended; a failing run against another baseline
    # adds its own verdict and takes nothing away from the passing one
    assert cli(args + ["--out", str(tmp_path / "o"), "--baseline", str(b0)]) == 0
    assert cli(args + ["--out", str(tmp_path / "o"), "--baseline", str(b1)]) == 1
    side = json.loads((adapter / "gemtune.json").read_text())
    assert [(x["baseline_id"], x["passed"]) for x in side["eval_verdicts"]] == [
        (f"results:{sha256_file(b0)}", True), (f"results:{sha256_file(b1)}", False)]
    assert [x["baseline_id"] for x in passing_verdicts(adapter)] == [f"results:{sha256_file(b0)}"]
    # one byte of the weights changed: no verdict speaks for these weights any more
    w = adapter / ADAPTER_WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert passing_verdicts(adapter) == [] and current_verdicts(adapter) == []
    assert len(json.loads((adapter / "gemtune.json").read_text())["eval_verdicts"]) == 2  # kept, vouching for nothing


def test_run_eval_record_against_the_live_version(world, tmp_path):
    """The Python API the release step uses: eval against the live alias and record, in one call."""
    adapter = tmp_path / "cand"
    shutil.copytree(world["cand"], adapter)
    suite, _, _ = live_suite(world, tmp_path / "suite.jsonl")
    o = run_eval(str(adapter), suite, tmp_path / "o", baseline=f"registry:{NAME}@prod", registry=world["root"],
                 config=GEN, record=True, echo=lambda s: None)
    assert o.gate is not None and o.gate.passed is False and o.baseline_spec.id == f"registry:{NAME}@v1"
    (v,) = current_verdicts(adapter)
    assert v["baseline_id"] == f"registry:{NAME}@v1" and v["baseline"] == f"registry:{NAME}@prod"
    assert v["passed"] is False and v["baseline_accuracy"] == 1.0
