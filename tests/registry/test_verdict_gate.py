"""Verdicts bound to weights (#16, contract C1): a push needs a passing eval verdict for the weights it copies; a
promote or split needs one for each new arm against what the alias serves now; `--force` overrides and is recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gemtune.adapter import read_sidecar, weights_sha256
from gemtune.errors import UserError
from gemtune.registry.routes import RouteTable, read_routes
from gemtune.registry.store import Refused, Registry


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMTUNE_HOME", str(tmp_path / "home"))  # an empty eval output cache per test
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())  # rich wraps long lines on stderr


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))


def _suite_and_lenient_baseline(tmp_path: Path) -> tuple[Path, Path]:
    """A 4-case suite and saved baseline results that got every case wrong: nothing can regress against them, so
    the gate passes whatever the tiny adapter says (the verdict is real, the outcome is known in advance)."""
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": f"c{i}", "prompt": f"ticket {i}: route this", "expected": "x",
                                         "scorers": ["exact"]}) + "\n" for i in range(4)))
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"meta": {"name": "old"}, "cases": [{"id": f"c{i}", "output": "", "pass": False}
                                                                   for i in range(4)]}))
    return suite, base


def test_push_needs_eval_record_on_these_weights(tmp_path, adapters, cli, capsys):
    """Never evaluated: exit 1 naming what is missing; after `eval --record`: accepted; one byte of the weights
    changed: refused again (the verdict was for other weights); --force pushes it, recorded."""
    src = _copy(adapters[0], tmp_path / "cand")
    root = tmp_path / "reg"
    sha = weights_sha256(src)
    assert cli("registry", "--root", root, "push", "s", src) == 1
    err = _err(capsys)
    assert f"no eval verdict for these weights (sha256 {sha[:12]}…)" in err
    assert f"gemtune eval --adapter {src} --suite … --record" in err
    assert Registry(root).versions("s") == []

    suite, lenient = _suite_and_lenient_baseline(tmp_path)
    assert cli("eval", "--adapter", src, "--suite", suite, "--baseline", lenient, "--out", tmp_path / "ev",
               "--max-new-tokens", "2", "--record") == 0
    recorded = [v for v in read_sidecar(src).get("eval_verdicts", []) if v.get("adapter_sha256") == sha]
    assert recorded and recorded[-1]["passed"] is True
    assert cli("registry", "--root", root, "push", "s", src) == 0
    m = Registry(root).info("s", "v1").manifest
    assert m["forced"] is False and m["eval_verdict"]["adapter_sha256"] == sha
    assert m["files"]["adapter_model.safetensors"]["sha256"] == sha
    capsys.readouterr()

    _flip_last_byte(src / "adapter_model.safetensors")
    assert cli("registry", "--root", root, "push", "s", src) == 1
    err = _err(capsys)
    assert "no eval verdict for these weights" in err and "the verdict was for other weights" in err
    assert f"sha256 {sha[:12]}…" in err and Registry(root).versions("s") == ["v1"]

    assert cli("registry", "--root", root, "push", "s", src, "--force") == 0
    m = Registry(root).info("s", "v2").manifest
    assert m["forced"] is True and any("no eval verdict for these weights" in r for r in m["forced_reasons"])
    pushes = [e for e in read_routes(root / "routes.json")["log"] if e["event"] == "push"]
    assert [(e["ref"], e["forced"]) for e in pushes] == [("s@v1", False), ("s@v2", True)]


def test_push_reads_only_verdicts_for_these_weights(tmp_path, adapters, verdict):
    reg = Registry(tmp_path / "reg")
    src = _copy(adapters[0], tmp_path / "cand")
    verdict(src, passed=False, baseline_id="registry:s@v1")
    with pytest.raises(Refused, match=r"the eval verdict for these weights \(sha256 [0-9a-f]{12}…\) did not pass "
                                      r"\(against registry:s@v1, regressed on 25\.0% of cases, gate 2\.0%\)"):
        reg.push("s", src)
    verdict(src, passed=True, sha="0" * 64)  # a pass for other weights vouches for nothing
    with pytest.raises(Refused, match="did not pass"):
        reg.push("s", src)
    assert reg.versions("s") == []
    verdict(src, passed=True)
    assert reg.push("s", src).manifest["forced"] is False
    # nobody means to ship random test adapters: no verdict asked for, nothing recorded as forced
    assert reg.push("s", adapters[1], require_verdict=False).manifest["forced"] is False
    # a gate refusal is still a UserError (the admin API answers 400), with exit code 1
    assert issubclass(Refused, UserError) and Refused.exit_code == 1


def _pushed(tmp_path, adapters, verdict, baselines: list[str]) -> tuple[Registry, list[Path]]:
    """A registry with one version per baseline id, each source holding a passing verdict against it."""
    reg = Registry(tmp_path / "reg")
    srcs = []
    for i, bid in enumerate(baselines):
        src = _copy(adapters[i], tmp_path / f"src{i}")
        verdict(src, baseline_id=bid)
        reg.push("s", src)
        srcs.append(src)
    return reg, srcs


def test_promote_needs_a_verdict_against_what_the_alias_serves(tmp_path, adapters, verdict, cli, capsys):
    reg, srcs = _pushed(tmp_path, adapters, verdict, ["base:tiny", "base:tiny", "registry:s@v1"])
    root = str(reg.root)
    assert cli("registry", "--root", root, "promote", "s", "v1") == 0  # prod serves nothing: any pass will do
    before = reg.routes_path.read_bytes()
    # v2 beat the base, never v1: refused, exit 1, naming the baseline it needs; routes.json untouched
    assert cli("registry", "--root", root, "promote", "s", "v2") == 1
    err = _err(capsys)
    assert "no passing eval verdict for s@v2" in err and "against registry:s@v1 (what s@prod serves now)" in err
    assert "--baseline registry:s@prod" in err and reg.routes_path.read_bytes() == before
    # v3 beat v1: promoted; the same for a split that adds v3 as a new arm
    assert cli("registry", "--root", root, "split", "s", "v1=90", "v3=10") == 0
    assert cli("registry", "--root", root, "split", "s", "v1=90", "v2=10") == 1  # a new arm needs it too
    assert cli("registry", "--root", root, "promote", "s", "v3") == 0  # already serving at 10 %: not new
    assert RouteTable(reg).get("s")["weights"] == {"v3": 100}
    # --force: routed, and the route, its history and the audit log say so
    assert cli("registry", "--root", root, "promote", "s", "v2", "--force") == 0
    entry = RouteTable(reg).get("s")
    assert entry["weights"] == {"v2": 100} and entry["forced"] is True
    assert "against registry:s@v3" in entry["forced_reasons"][0]
    log = read_routes(reg.routes_path)["log"]
    assert log[-1]["event"] == "promote" and log[-1]["forced"] is True and log[-1]["forced_reasons"]
    assert not any(e.get("forced") for e in log[:-1] if e["event"] != "push")
    # a verdict recorded later in the directory v1 was pushed from counts (it names the weights)
    verdict(srcs[0], baseline_id="registry:s@v2")
    assert cli("registry", "--root", root, "promote", "s", "v1") == 0
    entry = RouteTable(reg).get("s")
    assert "forced" not in entry and entry["history"][-1]["weights"] == {"v2": 100}
    assert entry["history"][-1]["forced"] is True  # the forced route stays visible in the history
    # rollback brings the forced route back, with its record
    assert cli("registry", "--root", root, "rollback", "s") == 0
    entry = RouteTable(reg).get("s")
    assert entry["weights"] == {"v2": 100} and entry["forced"] is True


def test_route_check_runs_under_the_lock_and_library_routes_stay_unchecked(tmp_path, adapters, verdict):
    reg, _ = _pushed(tmp_path, adapters, verdict, ["base:tiny", "base:tiny"])
    RouteTable(reg).promote("s", "v1")
    with pytest.raises(Refused, match=r"s@prod is unchanged \(use --force"):
        RouteTable(reg, check=reg.route_check()).promote("s", "v2")
    assert RouteTable(reg).get("s")["weights"] == {"v1": 100}
    # a RouteTable without a check (the server's admin API, tests, benchmarks) routes as before
    assert RouteTable(reg).promote("s", "v2")["weights"] == {"v2": 100}


def test_an_unservable_adapter_with_a_verdict_names_only_what_is_wrong(tmp_path, adapters, verdict):
    """A DoRA adapter that passed its eval: the refusal names the servability problem and nothing else (no empty
    "its own checks say" clause)."""
    src = _copy(adapters[0], tmp_path / "dora")
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    verdict(src, passed=True)
    with pytest.raises(UserError) as e:
        Registry(tmp_path / "reg").push("s", src)
    assert "DoRA" in str(e.value) and "its own checks" not in str(e.value)
