"""The runner on tiny Gemma 3 / Gemma 4 models: deterministic, cached, batched == unbatched, per-row stop."""

import json
import shutil

import pytest
import torch

from gemtune.errors import UserError
from gemtune.evals.cache import OutputCache
from gemtune.evals.config import EvalConfig
from gemtune.evals.engine import LocalGenerator, plan_batches
from gemtune.evals.pipeline import Evaluator, run_eval
from gemtune.evals.suite import load_suite


def outputs(doc):
    return [c["output"] for c in doc["cases"]]


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_two_runs_identical_and_cache_makes_reruns_free(family, request, tmp_path, suite_writer):
    adapter = request.getfixturevalue("adapter3" if family == "gemma3" else "adapter4")
    suite = suite_writer(tmp_path / "suite.jsonl", n=10)
    cfg = EvalConfig(max_new_tokens=12, batch_size=4)
    first = run_eval(str(adapter), suite, tmp_path / "a", config=cfg, echo=lambda s: None)
    assert first.summary["generation"]["cases_generated"] == 10 and first.summary["generation"]["cache_hits"] == 0
    second = run_eval(str(adapter), suite, tmp_path / "b", config=cfg, no_cache=True, echo=lambda s: None)
    assert second.summary["generation"]["cases_generated"] == 10  # --no-cache regenerated everything
    assert outputs(first.results) == outputs(second.results)
    assert outputs(first.baseline) == outputs(second.baseline)
    assert all(o for o in outputs(first.results))
    third = run_eval(str(adapter), suite, tmp_path / "c", config=cfg, echo=lambda s: None)
    assert third.summary["generation"] == {**third.summary["generation"], "cases_generated": 0, "cache_hits": 10}
    assert outputs(third.results) == outputs(first.results)
    # the adapter really changes the model: its outputs differ from the base's
    assert outputs(first.results) != outputs(first.baseline)
    # a changed generation config misses the cache
    fourth = run_eval(str(adapter), suite, tmp_path / "d", config=cfg.model_copy(update={"max_new_tokens": 6}),
                      baseline="none", echo=lambda s: None)
    assert fourth.summary["generation"]["cases_generated"] == 10
    for o4, o1 in zip(outputs(fourth.results), outputs(first.results)):
        assert len(o4) <= len(o1)


def test_output_files_and_shapes(adapter3, tmp_path, suite_writer):
    suite = suite_writer(tmp_path / "suite.jsonl", n=6)
    out = tmp_path / "out"
    lines = []
    o = run_eval(str(adapter3), suite, out, config=EvalConfig(max_new_tokens=8), echo=lines.append)
    assert sorted(p.name for p in out.iterdir()) == ["baseline_results.json", "report.html", "results.json", "summary.json"]
    res = json.loads((out / "results.json").read_text())
    assert [c["id"] for c in res["cases"]] == [f"c{i}" for i in range(6)]
    assert set(res["cases"][0]) >= {"id", "output", "pass", "scores", "latency_ms"}
    assert res["meta"]["adapter_sha256"] and res["meta"]["base_sha256"] and res["meta"]["suite"]["n"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 6 and summary["passed"] == sum(c["pass"] for c in res["cases"])
    assert summary["compare"]["baseline"] == "base" and isinstance(summary["shippable"], bool)
    assert set(summary["tags"]) == {"t0", "t1"} and summary["scorers"]["regex"]["n"] == 6
    assert lines == [o.line] and o.line.startswith("adapter acc ") and o.line.endswith(("PASS", "FAIL"))
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files


def test_batched_equals_unbatched_and_base_is_restored(tiny_gemma3, adapter3, tmp_path, suite_writer):
    suite_path = suite_writer(tmp_path / "suite.jsonl", n=9)
    got = {}
    for bs in (1, 4):
        cfg = EvalConfig(max_new_tokens=10, batch_size=bs)
        ev = Evaluator(tiny_gemma3, config=cfg, cache=OutputCache(read=False, write=False))
        suite = load_suite(suite_path, cfg)
        before = outputs(ev.run(suite))
        got[bs] = outputs(ev.run(suite, adapter3))
        after = outputs(ev.run(suite))
        assert before == after  # the adapter was detached: the same loaded base serves the next checkpoint
    assert got[1] == got[4]


def test_per_row_stop_and_length_sorted_plan(tiny_gemma3):
    from gemtune.base.families import family_of
    from gemtune.base.loader import load_base

    model, tok = load_base(tiny_gemma3)
    gen = LocalGenerator(model, tok, family_of(model), batch_size=2)
    a = tok.encode("<bos>hello there", add_special_tokens=False)
    b = tok.encode("<bos>zz", add_special_tokens=False)
    free = gen.generate_batch([a, b], 8)
    assert [len(r) for r in free] == [8, 8]
    # make row a's third token a stop token: row a ends there, row b (which never emits it) runs on unchanged
    stop = free[0][2]
    assert stop not in free[1]
    gen.stops = gen.stops + [stop]
    rows = gen.generate_batch([a, b], 8)
    assert rows[0] == free[0][:3] and rows[1] == free[1]
    assert gen.decode(rows[0]) == tok.decode(free[0][:2], skip_special_tokens=True).strip()
    assert plan_batches([[1], [1, 2, 3], [1, 2], [4, 5, 6]], 2) == [[1, 3], [2, 0]]


def test_generation_leaves_the_global_rng_alone(tiny_gemma3, tmp_path, suite_writer):
    cfg = EvalConfig(max_new_tokens=4, seed=123)
    ev = Evaluator(tiny_gemma3, config=cfg, cache=OutputCache(read=False, write=False))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    ev.run(load_suite(suite_writer(tmp_path / "s.jsonl", n=3), cfg))
    assert torch.equal(torch.get_rng_state(), state)  # a mid-training eval does not perturb training's stream


def test_latency_pass(adapter3, tmp_path, suite_writer):
    suite = suite_writer(tmp_path / "s.jsonl", n=4, scorers=[{"type": "regex", "pattern": "."},
                                                                 {"type": "latency", "max_ms": 60000}])
    o = run_eval(str(adapter3), suite, tmp_path / "o", config=EvalConfig(max_new_tokens=4), latency=True,
                 baseline="none", echo=lambda s: None)
    lat = [c["latency_ms"] for c in o.results["cases"]]
    assert all(isinstance(x, float) and x > 0 for x in lat)
    assert o.summary["latency_ms"]["n"] == 4 and o.summary["latency_ms"]["p50"] <= o.summary["latency_ms"]["p95"]
    assert o.summary["scorers"]["latency"] == {"n": 4, "passed": 4, "skipped": 0, "accuracy": 1.0}
    assert o.comparison is None and o.gate is None and "vs" not in o.line


def test_adapter_base_resolution_and_errors(tiny_gemma3, adapter3, tmp_path, suite_writer):
    suite = suite_writer(tmp_path / "s.jsonl", n=2)
    bare = tmp_path / "bare"
    shutil.copytree(adapter3, bare)
    (bare / "gemtune.json").unlink()
    cfg = json.loads((bare / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="pass --base"):
        run_eval(str(bare), suite, tmp_path / "o", echo=lambda s: None)
    o = run_eval(str(bare), suite, tmp_path / "o", base=str(tiny_gemma3), baseline="none",
                 config=EvalConfig(max_new_tokens=2), echo=lambda s: None)
    assert o.results["meta"]["base"] == str(tiny_gemma3)
    with pytest.raises(UserError, match="adapter_config.json missing"):
        run_eval(str(tmp_path), suite, tmp_path / "o", echo=lambda s: None)
    with pytest.raises(UserError, match="adapter directory not found"):
        run_eval(str(tmp_path / "nope"), suite, tmp_path / "o", echo=lambda s: None)


# ------------------------------------------------------------------------------------------------ constrained
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def fused_adapter(tmp_path_factory):
    """A tiny Gemma 3 whose tokenizer decodes by concatenation (as Gemma's does; the shared tiny tokenizer joins
    tokens with spaces, which makes any JSON invalid text) and an adapter for it."""
    from pathlib import Path

    from gemtune.base.tiny import save_tiny

    from .conftest import make_adapter

    d = Path(save_tiny(tmp_path_factory.mktemp("tiny-fused"), "gemma3"))
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["decoder"] = {"type": "Fuse"}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return make_adapter(d, tmp_path_factory.mktemp("fused-adapter") / "adapter")


def test_constrained_eval_decodes_schema_cases_under_their_schema(fused_adapter, tmp_path):
    import jsonschema

    rows = []
    for i in range(6):
        row = {"id": f"c{i}", "prompt": f"case {i}: describe " + "it " * i, "expected": '{"color": "red", "size": 3}'}
        if i % 3:
            row["schema"] = SCHEMA
        else:
            row["scorers"] = [{"type": "regex", "pattern": "."}]
        rows.append(row)
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(max_new_tokens=40, batch_size=3)
    free = run_eval(str(fused_adapter), suite, tmp_path / "free", config=cfg, baseline="none", echo=lambda s: None)
    both = run_eval(str(fused_adapter), suite, tmp_path / "both", config=cfg.model_copy(update={"constrained": True}),
                    baseline="none", echo=lambda s: None)
    assert outputs(both.results) == outputs(free.results)  # the free outputs are what they were
    cases = both.results["cases"]
    with_schema = [c for c, r in zip(cases, rows) if "schema" in r]
    assert len(with_schema) == 4 and all("output_constrained" not in c for c, r in zip(cases, rows) if "schema" not in r)
    for c in with_schema:
        jsonschema.validate(json.loads(c["output_constrained"]), SCHEMA)
        assert set(c["scores_constrained"]) == set(c["scores"])
        assert c["scores_constrained"]["json"]["pass"] == c["pass_constrained"]
    assert not all(_parses(c["output"]) for c in with_schema)  # free decoding of a random model is not JSON
    summ = both.summary["constrained"]
    assert summ["n"] == 4 and summ["passed"] == sum(c["pass_constrained"] for c in with_schema)
    assert summ["free_passed"] == sum(c["pass"] for c in with_schema)
    assert "constrained" not in free.summary
    # per-field results in summary.json, free and constrained: every constrained output is schema-valid
    assert summ["fields"]["json"]["cases"] == 4 and summ["fields"]["json"]["schema_valid"] == 1.0
    assert both.summary["fields"]["json"]["cases"] == 4
    assert both.summary["fields"]["json"]["schema_valid"] == sum(_parses(c["output"]) for c in with_schema) / 4
    assert json.loads((tmp_path / "both" / "summary.json").read_text())["fields"] == both.summary["fields"]
    # cached like free outputs: a rerun generates nothing
    again = run_eval(str(fused_adapter), suite, tmp_path / "again", config=cfg.model_copy(update={"constrained": True}),
                     baseline="none", echo=lambda s: None)
    assert [c.get("output_constrained") for c in again.results["cases"]] == [c.get("output_constrained") for c in cases]
    assert again.summary["generation"]["cases_generated"] == 0


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
