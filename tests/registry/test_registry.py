"""Registry store and routes: immutable verified versions, refusals, aliases, A/B splits, rollback, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from gemtune.errors import NotFound, UserError
from gemtune.registry.routes import (RouteTable, RouteWatcher, parse_model, parse_split, pick_version,
                                     read_routes)
from gemtune.registry.store import CorruptAdapter, Registry, inspect_adapter


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_push_creates_immutable_versions_with_manifest(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    v1 = reg.push("support", adapters[0], require_verdict=False)
    v2 = reg.push("support", adapters[1], require_verdict=False)
    assert (v1.version, v2.version) == ("v1", "v2")
    assert v1.ref == "support@v1"
    m = json.loads((v1.path / "manifest.json").read_text())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(m["files"])
    assert m["rank"] == 8 and m["forced"] is False
    assert reg.versions("support") == ["v1", "v2"]
    assert reg.verify("support", "v2").path == tmp_path / "reg" / "adapters" / "support" / "v2"
    assert [r["ref"] for r in reg.list()] == ["support@v1", "support@v2"]
    # nothing half-built is left beside the versions
    assert not [p for p in (tmp_path / "reg" / "adapters" / "support").iterdir() if p.name.startswith(".")]
    log = read_routes(reg.routes_path)["log"]
    assert [e["ref"] for e in log if e["event"] == "push"] == ["support@v1", "support@v2"]


@pytest.mark.parametrize("changes,needle", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 16}}, "per-layer ranks"),
    ({"alpha_pattern": {"q_proj": 4}}, "per-layer ranks"),
    ({"r": 12}, "rank r=12"),
    ({"peft_type": "IA3"}, "plain LoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"use_rslora": True}, "rsLoRA"),
    ({"trainable_token_indices": [5]}, "trainable_token_indices"),
])
def test_push_refuses_vllm_incompatible_unless_forced(tmp_path, adapters, changes, needle):
    bad = _edit_config(adapters[0], tmp_path / "bad", **changes)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UserError, match=needle) as e:
        reg.push("x", bad, require_verdict=False)
    assert "adapter_config.json" in str(e.value)
    assert reg.versions("x") == []
    vi = reg.push("x", bad, force=True, require_verdict=False)
    assert vi.manifest["forced"] is True and any(needle in r for r in vi.manifest["forced_reasons"])
    assert reg.list()[0]["forced"] is True


@pytest.mark.parametrize("sidecar", [{"shippable": False}, {"eval": {"gate_passed": False}}])
def test_push_refuses_failed_gate_unless_forced(tmp_path, adapters, sidecar):
    src = tmp_path / "gated"
    shutil.copytree(adapters[0], src)
    (src / "gemtune.json").write_text(json.dumps(sidecar))
    reg = Registry(tmp_path / "reg")
    with pytest.raises(UserError, match="must not ship: gemtune.json says") as e:
        reg.push("x", src, require_verdict=False)
    assert "gemtune.json" in str(e.value)
    vi = reg.push("x", src, force=True, require_verdict=False)
    assert vi.manifest["forced"] and (vi.path / "gemtune.json").is_file()
    forced = [e for e in read_routes(reg.routes_path)["log"] if e["event"] == "push"]
    assert forced[-1]["forced"] is True and forced[-1]["reasons"]


def _privacy(passed: bool, sha: str | None) -> dict:
    return {"privacy": {"passed": passed, "adapter_sha256": sha,
                        "checks": [{"name": "extraction rate", "passed": passed}, {"name": "PII hits", "passed": True}]}}


def test_push_refuses_failed_privacy_probe_for_these_weights(tmp_path, adapters):
    from gemtune.utils import sha256_file

    src = tmp_path / "probed"
    shutil.copytree(adapters[0], src)
    sha = sha256_file(src / "adapter_model.safetensors")
    reg = Registry(tmp_path / "reg")
    for recorded in (sha, None):  # the probe named these weights, or named none: the failure stands
        (src / "gemtune.json").write_text(json.dumps(_privacy(False, recorded)))
        with pytest.raises(UserError, match=r"privacy.passed: false \(extraction rate\)") as e:
            reg.push("x", src, require_verdict=False)
        assert "gemtune.json" in str(e.value) and reg.versions("x") == []
    # a failed report made for other weights does not describe this adapter; a passed one never blocks
    (src / "gemtune.json").write_text(json.dumps(_privacy(False, "0" * 64)))
    assert reg.push("x", src, require_verdict=False).manifest["forced"] is False
    (src / "gemtune.json").write_text(json.dumps(_privacy(True, sha)))
    assert reg.push("x", src, require_verdict=False).version == "v2"
    (src / "gemtune.json").write_text(json.dumps(_privacy(False, sha)))
    vi = reg.push("x", src, force=True, require_verdict=False)
    assert vi.version == "v3" and vi.manifest["forced"] is True
    assert any("privacy.passed: false" in r for r in vi.manifest["forced_reasons"])


def test_push_refuses_non_peft_and_pickles(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a PEFT adapter"):
        reg.push("x", tmp_path / "empty", require_verdict=False)
    pick = tmp_path / "pickled"
    shutil.copytree(adapters[0], pick)
    (pick / "adapter_model.safetensors").rename(pick / "adapter_model.bin")
    with pytest.raises(UserError, match="pickled weights are refused"):
        reg.push("x", pick, force=True, require_verdict=False)
    junk = tmp_path / "junk"
    shutil.copytree(adapters[0], junk)
    (junk / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a readable safetensors"):
        reg.push("x", junk, force=True, require_verdict=False)


@pytest.mark.parametrize("name", ["../x", "a@b@c", "A", "x/y", "", "base", ".hidden", "a..b"])
def test_invalid_names_rejected(tmp_path, adapters, name):
    with pytest.raises(UserError, match="invalid|reserved"):
        Registry(tmp_path / "reg").push(name, adapters[0], require_verdict=False)
    assert not (tmp_path / "x").exists()


def test_verify_detects_corruption_and_extra_files(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    vi = reg.push("s", adapters[0], require_verdict=False)
    w = vi.path / "adapter_model.safetensors"
    os.chmod(w, 0o644)
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapter, match="sha256 mismatch"):
        reg.verify("s", "v1")
    vi2 = reg.push("s", adapters[1], require_verdict=False)
    (vi2.path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(CorruptAdapter, match="not in the manifest"):
        reg.verify("s", "v2")


def test_verify_remembers_a_clean_hash_but_not_past_a_rewrite(tmp_path, adapters, monkeypatch):
    import gemtune.registry.store as store

    reg = Registry(tmp_path / "reg")
    vi = reg.push("s", adapters[0], require_verdict=False)
    reg.verify("s", "v1")
    hashed = []
    real = store._sha256_nofollow
    monkeypatch.setattr(store, "_sha256_nofollow", lambda p: hashed.append(p) or real(p))
    reg.verify("s", "v1")
    assert hashed == []  # unchanged files: no second hash (an alias flip to a served version stays cheap)
    w = vi.path / "adapter_model.safetensors"
    st = w.stat()
    os.chmod(w, 0o644)
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    with pytest.raises(CorruptAdapter, match="sha256 mismatch"):
        reg.verify("s", "v1")
    assert hashed


def test_parse_model():
    assert parse_model("base").is_base
    r = parse_model("support")
    assert (r.name, r.alias, r.version) == ("support", "prod", None)
    assert parse_model("support@v3").version == "v3"
    assert parse_model("support@canary").alias == "canary"
    for bad in ["../x", "a@b@c", "", "Sup", "x@", "x@../y", "x@V3"]:
        with pytest.raises(UserError):
            parse_model(bad)


def test_promote_split_rollback_walks_history(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    for a in adapters:
        reg.push("s", a, require_verdict=False)
    rt = RouteTable(reg)
    assert rt.promote("s", "v1")["weights"] == {"v1": 100}
    assert rt.promote("s", "2", alias="prod")["weights"] == {"v2": 100}
    assert rt.split("s", "prod", parse_split(["v2=90", "v3=10"]))["weights"] == {"v2": 90, "v3": 10}
    assert rt.promote("s", "v3", alias="canary")["weights"] == {"v3": 100}
    assert rt.rollback("s")["weights"] == {"v2": 100}
    assert rt.rollback("s")["weights"] == {"v1": 100}
    with pytest.raises(UserError, match="no earlier route"):
        rt.rollback("s")
    assert rt.get("s", "canary")["weights"] == {"v3": 100}  # other aliases untouched
    with pytest.raises(UserError, match="not in the registry"):
        rt.promote("s", "v9")
    with pytest.raises(UserError, match="invalid alias"):
        rt.promote("s", "v1", alias="v2")
    with pytest.raises(UserError, match="VERSION=WEIGHT"):
        parse_split(["v1:50"])
    with pytest.raises(UserError, match="positive"):
        parse_split(["v1=0"])


def test_promote_refuses_corrupt_version(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    reg.push("s", adapters[0], require_verdict=False)
    vi = reg.push("s", adapters[1], require_verdict=False)
    RouteTable(reg).promote("s", "v1")
    os.chmod(vi.path / "adapter_config.json", 0o644)
    (vi.path / "adapter_config.json").write_text("{}")
    with pytest.raises(CorruptAdapter):
        RouteTable(reg).promote("s", "v2")
    assert RouteTable(reg).get("s")["weights"] == {"v1": 100}


def test_split_is_sticky_per_user_and_follows_weights():
    w = {"v1": 90, "v2": 10}
    picks = [pick_version(w, name="s", alias="prod", user=f"user{i}") for i in range(2000)]
    share = picks.count("v2") / len(picks)
    assert 0.07 < share < 0.13
    assert all(pick_version(w, name="s", alias="prod", user=f"user{i}") == picks[i] for i in range(50))
    assert pick_version({"v1": 0, "v2": 5}, name="s", alias="prod", user=None) == "v2"


def test_watcher_follows_file_and_keeps_last_good_on_corrupt(tmp_path, adapters):
    reg = Registry(tmp_path / "reg")
    for a in adapters:
        reg.push("s", a, require_verdict=False)
    rt = RouteTable(reg)
    rt.promote("s", "v1")
    rejected = []
    w = RouteWatcher(reg, poll_s=0.05, accept=lambda n, v: reg.verify(n, v),
                     on_reject=lambda n, a, why: rejected.append((n, a, why)))
    assert w.resolve("s", "prod", "u") == "v1"
    rt.promote("s", "v2")
    deadline = time.monotonic() + 1.0
    while w.resolve("s", "prod", "u") != "v2" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.resolve("s", "prod", "u") == "v2"
    # a hand-edit that routes to a corrupted version: the watcher keeps v2 and reports the rejection
    v3 = reg.adapters_dir / "s" / "v3" / "adapter_model.safetensors"
    os.chmod(v3, 0o644)
    v3.write_bytes(v3.read_bytes()[:-1] + b"\x00")
    data = read_routes(reg.routes_path)
    data["routes"]["s"]["prod"]["weights"] = {"v3": 100}
    from gemtune.utils import atomic_write_json
    atomic_write_json(reg.routes_path, data)
    time.sleep(0.1)
    assert w.resolve("s", "prod", "u") == "v2"
    assert rejected and rejected[-1][:2] == ("s", "prod") and "sha256" in rejected[-1][2]


PUSH_LOOP = """
import sys
from gemtune.registry.store import Registry
reg = Registry(sys.argv[1])
print(" ".join(reg.push("s", sys.argv[2], require_verdict=False).version for _ in range(int(sys.argv[3]))))
"""


def test_concurrent_pushes_from_processes_get_distinct_versions(tmp_path, adapters):
    import subprocess
    import sys

    root = str(tmp_path / "reg")
    procs = [subprocess.Popen([sys.executable, "-c", PUSH_LOOP, root, str(adapters[i]), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    versions = sorted((v for out, _ in outs for v in out.split()), key=lambda v: int(v[1:]))
    assert versions == [f"v{i}" for i in range(1, 7)]
    reg = Registry(root)
    assert all(reg.verify("s", v) for v in reg.versions("s"))
    pushes = [e for e in read_routes(reg.routes_path)["log"] if e["event"] == "push"]
    assert len(pushes) == 6  # no lost update of routes.json under concurrent writers


def test_inspect_adapter_reports_clean_adapter(adapters):
    cfg, sidecar, problems, gate = inspect_adapter(adapters[0])
    assert cfg["r"] == 8 and sidecar is None and problems == [] and gate == []


def test_cli_push_list_promote_split_rollback(cli, tmp_path, adapters, verdict):
    root = str(tmp_path / "reg")
    srcs = [tmp_path / "a", tmp_path / "b"]
    for src, a in zip(srcs, adapters):
        shutil.copytree(a, src)
    verdict(srcs[0])
    verdict(srcs[1], baseline_id="registry:s@v1")  # what the split below needs for its new arm

    def run(*args):
        return cli("registry", "--root", root, *args)

    def ok(*args):
        assert run(*args) == 0

    ok("push", "s", str(srcs[0]))
    ok("push", "s", str(srcs[1]))
    ok("promote", "s", "v1")
    ok("split", "s", "--alias", "prod", "v1=50", "v2=50")
    ok("rollback", "s")
    assert RouteTable(Registry(root)).get("s")["weights"] == {"v1": 100}
    assert run("push", "../x", str(adapters[0])) == 2
    assert run("promote", "s", "v7") == 2
    assert run("split", "s", "v1=abc") == 2
    ok("list", "--json")


def test_unknown_names_versions_and_aliases_raise_not_found(tmp_path, adapters):
    """A typed NotFound (still a UserError, CLI exit 2) for what does not exist; other refusals stay plain
    UserErrors. The message keeps naming what is missing (and "not in the registry" / "does not exist")."""
    reg = Registry(tmp_path / "reg")
    reg.push("s", adapters[0], require_verdict=False)
    rt = RouteTable(reg)
    missing = [
        (lambda: reg.info("s", "v9"), "adapter s@v9 is not in the registry (versions: v1)"),
        (lambda: reg.verify("s", "v9"), "adapter s@v9 is not in the registry (versions: v1)"),
        (lambda: reg.latest("nobody"), "adapter 'nobody' is not in the registry"),
        (lambda: rt.promote("s", "v9"), "s@v9 fails verification: "),
        (lambda: rt.split("nobody", "prod", {"v1": 100}), "nobody@v1 fails verification: "),
        (lambda: rt.rollback("s", "canary"), "alias s@canary does not exist; nothing to roll back"),
    ]
    for call, needle in missing:
        with pytest.raises(NotFound) as e:
            call()
        assert isinstance(e.value, UserError) and needle in str(e.value)
    rt.promote("s", "v1")
    for call in (lambda: rt.rollback("s"), lambda: rt.promote("s", "v1", alias="v2"),
                 lambda: reg.info("s", "latest"), lambda: rt.split("s", "prod", {"v1": 0})):
        with pytest.raises(UserError) as e:
            call()
        assert not isinstance(e.value, NotFound), str(e.value)


def test_registry_modules_import_one_way():
    """No import loop inside gemtune/registry (function-level imports count too)."""
    import ast

    pkg = Path(__file__).resolve().parents[2] / "gemtune" / "registry"
    mods = {p.stem for p in pkg.glob("*.py")}
    deps: dict[str, set[str]] = {}
    for p in pkg.glob("*.py"):
        found = set()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("gemtune.registry"):
                tail = n.module.split(".")[2:]
                found |= {tail[0]} if tail else {a.name for a in n.names}
        deps[p.stem] = (found & mods) - {p.stem}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, "import loop: " + " -> ".join((*path, m))
        if m not in done:
            for d in sorted(deps[m]):
                visit(d, (*path, m))
            done.add(m)

    for m in sorted(deps):
        visit(m, ())
    assert "routes" not in deps["store"] and deps["names"] == set()


def test_list_versions_names_the_aliases_routing_to_each_version(tmp_path, adapters):
    from gemtune.registry.listing import list_versions

    reg = Registry(tmp_path / "reg")
    for a in adapters:
        reg.push("s", a, require_verdict=False)
    rt = RouteTable(reg)
    rt.promote("s", "v1")
    rt.split("s", "prod", {"v1": 90, "v2": 10, "v3": 0})
    rt.promote("s", "v2", alias="canary")
    listing = list_versions(reg)
    assert {r["ref"]: r["aliases"] for r in listing["versions"]} == {
        "s@v1": {"prod": 90}, "s@v2": {"prod": 10, "canary": 100}, "s@v3": {}}
    assert listing["routes"] == {"s": {"prod": {"v1": 90, "v2": 10, "v3": 0}, "canary": {"v2": 100}}}
