"""`gemtune release NAME ADAPTER` (#16) on the sample project: the first release goes live at 100 %, a good candidate
ends live behind a 10 % canary, a planted bad one stops at the eval step with exit 1 and the registry untouched.

The models are tiny and random, so "good" and "bad" are made exact: the suite expects what the base says; LoRA
adapters with B = 0 say exactly that (different A: different weights, same outputs: no regression), a random
adapter with large B says something else (every case regresses against the live version)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from gemtune.adapter import read_sidecar, weights_sha256
from gemtune.registry.routes import RouteTable, read_routes
from gemtune.registry.store import Registry

N_CASES = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMTUNE_HOME", str(tmp_path / "home"))  # an empty eval output cache
    monkeypatch.delenv("SLACK_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("GEMTUNE_REGISTRY", raising=False)


def _zero_adapter(base: Path, out: Path, seed: int, data: Path) -> Path:
    """LoRA as PEFT initialises it (B = 0, A random from `seed`): its own weights, exactly the base's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from gemtune.base.families import family_of, target_modules
    from gemtune.base.loader import load_base

    torch.manual_seed(seed)
    model, _ = load_base(base)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules(family_of(model))))
    pm.save_pretrained(out)
    (out / "gemtune.json").write_text(json.dumps({"base_model": str(base), "dataset": {"dir": str(data)}}))
    return out


@pytest.fixture(scope="module")
def project(tiny_gemma3, tmp_path_factory):
    """The sample project built into a dataset; a suite whose expected answers are the base's greedy outputs; a
    gemtune.yaml sized for a tiny model."""
    from gemtune.cli import main
    from gemtune.demo import copy_project

    root = tmp_path_factory.mktemp("release-project")
    proj = copy_project(root / "project")
    yml = proj / "gemtune.yaml"  # the tiny base's tokenizer counts tokens: no real model needed here
    yml.write_text(yml.read_text().replace("base: gemma-3-270m", f"base: {tiny_gemma3}")
                   .replace("max_tokens: 256", "max_tokens: 4096"))  # the tiny vocabulary spends more tokens
    home = os.environ.get("GEMTUNE_HOME")
    os.environ["GEMTUNE_HOME"] = str(root / "home")  # the eval output cache of this module starts empty
    try:
        def run(*argv):
            try:
                main([str(a) for a in argv])
            except SystemExit as e:
                return int(e.code or 0)
            return 0

        assert run("data", "build", proj / "tickets.jsonl", "--config", proj / "gemtune.yaml", "--out",
                   proj / "data") == 0
        cfg = root / "gemtune.yaml"
        cfg.write_text("eval:\n  max_new_tokens: 4\n  batch_size: 8\n  gate: 0.02\n"
                       "privacy:\n  samples: 4\n  candidates: 4\n  pii_samples: 2\n  pii_max_new_tokens: 8\n")
        rows = [json.loads(x) for x in (proj / "data" / "eval.jsonl").read_text().splitlines()[:N_CASES]]
        probe_suite = root / "prompts.jsonl"
        probe_suite.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"][:-1],
                                                   "expected": "?", "scorers": ["exact"]}) + "\n" for r in rows))
        assert run("eval", "--adapter", "base", "--base", tiny_gemma3, "--suite", probe_suite, "--baseline", "none",
                   "--out", root / "base-out", "--config", cfg) == 0
        outputs = {c["id"]: c["output"] for c in json.loads((root / "base-out" / "results.json").read_text())["cases"]}
        suite = root / "suite.jsonl"
        suite.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"][:-1], "expected": outputs[r["id"]],
                                             "scorers": ["exact"]}) + "\n" for r in rows))
    finally:
        if home is None:
            os.environ.pop("GEMTUNE_HOME", None)
        else:
            os.environ["GEMTUNE_HOME"] = home
    return {"base": tiny_gemma3, "data": proj / "data", "suite": suite, "config": cfg}


def _tree(root: Path) -> dict[str, str]:
    """Every path under `root` with the sha256 of its bytes (a directory: its name only)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _release(cli, project, name, adapter, root, *extra):
    return cli("release", name, adapter, "--root", root, "--suite", project["suite"], "--config", project["config"],
               "--out", Path(adapter).parent / f"out-{Path(adapter).name}", *extra)


def test_release_good_goes_live_behind_a_canary_bad_stops_at_eval(project, tmp_path, cli, capsys):
    from gemtune.registry.synthetic import make_random_adapter

    root = tmp_path / "registry"
    first = _zero_adapter(project["base"], tmp_path / "first", 1, project["data"])
    # nothing live: gated against the base, live at 100 %
    assert _release(cli, project, "router", first, root) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    for step in ("check", "eval", "probe", "card", "push", "route"):
        assert f"✓ {step}" in out
    assert "beat base:" in out and "release router@v1 live on prod (v1 100%)" in out
    assert RouteTable(Registry(root)).get("router", "prod")["weights"] == {"v1": 100}
    assert (Registry(root).info("router", "v1").path / "README.md").is_file()  # the card travels with it

    # a good candidate: different weights, the same answers: beats v1, goes live behind a 10 % canary
    good = _zero_adapter(project["base"], tmp_path / "good", 2, project["data"])
    assert weights_sha256(good) != weights_sha256(first)
    assert _release(cli, project, "router", good, root, "--canary", "10") == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "beat registry:router@v1" in out
    entry = RouteTable(Registry(root)).get("router", "prod")
    assert entry["weights"] == {"v1": 90, "v2": 10} and "forced" not in entry
    side = read_sidecar(good)
    assert any(v["baseline_id"] == "registry:router@v1" and v["passed"] and
               v["adapter_sha256"] == weights_sha256(good) for v in side["eval_verdicts"])
    assert side["privacy"]["passed"] is True and side["privacy"]["adapter_sha256"] == weights_sha256(good)
    split = [e for e in read_routes(root / "routes.json")["log"] if e["event"] == "split"]
    assert split[-1]["to"] == {"v1": 90, "v2": 10} and not split[-1].get("forced")

    # a planted bad candidate: stops at the eval step, exit 1, the registry byte-for-byte unchanged
    bad = make_random_adapter(project["base"], tmp_path / "bad", seed=7, scale=8.0)
    (bad / "gemtune.json").write_text(json.dumps({"base_model": str(project["base"]),
                                                  "dataset": {"dir": str(project["data"])}}))
    before, readme = _tree(root), (bad / "README.md").read_bytes()  # PEFT's own README
    assert _release(cli, project, "router", bad, root) == 1
    cap = capsys.readouterr()
    text = " ".join((cap.out + cap.err).split())
    assert "✗ eval FAIL lost to registry:router@v1" in text
    assert "release router FAILED at eval:" in text and "the registry is unchanged" in text
    for later in ("probe", "card", "push", "route"):
        assert f"✓ {later}" not in text and f"✗ {later}" not in text
    assert _tree(root) == before
    assert (bad / "README.md").read_bytes() == readme  # no card for what did not pass


def test_release_stops_before_anything_runs_on_an_unservable_adapter(project, tmp_path, cli, capsys):
    root = tmp_path / "registry"
    cand = _zero_adapter(project["base"], tmp_path / "cand", 3, project["data"])
    cfg = json.loads((cand / "adapter_config.json").read_text())
    (cand / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert _release(cli, project, "router", cand, root) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "✗ check FAIL not servable unchanged" in text and "DoRA" in text and "✓ eval" not in text
    assert not root.exists() and "eval_verdicts" not in read_sidecar(cand)


def test_release_posts_the_closing_line(project, tmp_path, cli, capsys):
    """The one line goes to Slack (a real local HTTP endpoint standing in for the webhook), and only that line."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        cand = _zero_adapter(project["base"], tmp_path / "cand", 4, project["data"])
        shutil.rmtree(tmp_path / "nothing", ignore_errors=True)
        assert _release(cli, project, "router", cand, tmp_path / "registry", "--slack-webhook", url) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert [p["text"] for p in posts] == [l for l in capsys.readouterr().out.splitlines()
                                          if l.startswith("release router@v1 live on prod")]


def test_release_external_baseline_unreachable_stops_at_eval(project, tmp_path, cli, capsys):
    """`--external openai:URL#MODEL` is gated too: an endpoint nobody answers stops the release at the eval step
    (exit 2, naming the URL) before anything reaches the registry."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    cand = _zero_adapter(project["base"], tmp_path / "cand", 5, project["data"])
    root = tmp_path / "registry"
    assert _release(cli, project, "router", cand, root, "--external", f"openai:{url}#frontier") == 2
    cap = capsys.readouterr()
    text = " ".join((cap.out + cap.err).split())
    assert "✓ eval" not in text and "✗ eval FAIL" in text and url in text
    assert "release router FAILED at eval:" in text and not root.exists()
