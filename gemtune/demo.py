"""`gemtune demo`: the whole playbook on the embedded Gemma 3 270M and a sample support-ticket project.

data build (PII, dedup, frozen eval, generic mix, canaries) → GPU plan → train (default preset) with eval and the
regression gate on every checkpoint → privacy probe → model card (into the adapter, so both travel with the version)
→ registry push + promote → an in-process OpenAI-compatible server answering for two adapter versions, an A/B split
and a rollback. The closing table says what each step proved. `--quick` trains 30 steps instead of 90 (4 min 48 s
in all on a 2-core VM with torch capped to AVX2 kernels, adapter 0.86 vs base 0.00); the adapter must still beat
the base by 30 points.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gemtune.adapter import SIDECAR, read_sidecar
from gemtune.errors import GateFailed, UserError

PROJECT_FILES = ("tickets.jsonl", "generic.jsonl", "gemtune.yaml")


@dataclass
class Step:
    name: str
    proved: str
    seconds: float
    ok: bool = True


def project_dir() -> Path:
    return Path(str(files("gemtune").joinpath("demo_project")))


def copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copyfile(project_dir() / name, dest / name)
    return dest


class _Timer:
    def __init__(self, steps: list[Step], console: Console, name: str):
        self.steps, self.console, self.name = steps, console, name

    def __enter__(self):
        self.t = time.time()
        self.console.rule(f"[bold]{self.name}")
        return self

    def done(self, proved: str, ok: bool = True) -> None:
        self.steps.append(Step(self.name, proved, time.time() - self.t, ok))

    def __exit__(self, *exc) -> bool:
        return False


def run_demo(out: str | Path = "demo-out", *, quick: bool = False, console: Console | None = None,
             steps_override: int | None = None) -> list[Step]:
    """Every stage of the playbook in order; each step records what it proved. GateFailed when one did not."""
    console = console or Console()
    out = _fresh_out(Path(out))
    steps: list[Step] = []
    t0 = time.time()
    base = _step_base(steps, console)
    proj, data = _step_data(steps, console, out, base)
    _step_plan(steps, console)
    trained = _step_train(steps, console, out, proj, data, base, steps_override or (30 if quick else 90))
    _step_eval(steps, console, out, trained, data)
    private = _privacy_and_card(steps, console, out, trained.result.adapter_dir, data, base)
    _step_registry(steps, console, out, trained, private)
    with _Timer(steps, console, "serve") as s:
        s.done(_serve_round_trip(out / "registry", str(base), data, console))
    return _finish(steps, console, out, t0)


def _fresh_out(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        if not (out / ".gemtune-demo").exists():
            raise UserError("output directory exists and is not a previous demo; choose another --out", file=str(out))
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".gemtune-demo").write_text("")
    return out


def _step_base(steps: list[Step], console: Console) -> Path:
    with _Timer(steps, console, "base") as s:
        from gemtune.base.provision import pull

        base = pull(progress=lambda m: console.print(f"[dim]{m}[/dim]"))
        s.done(f"embedded Gemma 3 270M converted once and cached ({base})")
    return base


def _step_data(steps: list[Step], console: Console, out: Path, base: Path) -> tuple[Path, Path]:
    with _Timer(steps, console, "data build") as s:
        from gemtune.data.config import load_data_config
        from gemtune.data.pipeline import build

        proj = copy_project(out / "project")
        dcfg = load_data_config(proj / "gemtune.yaml", {"generic": [str(proj / "generic.jsonl")], "base": str(base)})
        data = out / "data"
        report = build([proj / "tickets.jsonl"], data, dcfg)
        c = report["counts"]
        pii = sum(report.get("pii", {}).values())
        console.print(f"{c['input_rows']} rows in: {c['quarantined']} quarantined, {c['exact_duplicates']} exact + "
                      f"{c['near_duplicates']} near duplicates, {pii} PII values redacted; train {c['train']}, "
                      f"eval {c['eval']} (frozen), generic {c['generic_added']}")
        s.done(f"{c['quarantined']} bad rows quarantined with line numbers, {pii} PII values redacted, "
               f"{c['exact_duplicates'] + c['near_duplicates']} duplicates removed, eval set of {c['eval']} frozen")
    return proj, data


def _step_plan(steps: list[Step], console: Console) -> None:
    with _Timer(steps, console, "plan") as s:
        from gemtune.train.plan import plan, shape_from_params

        rows = []
        for size in ("9b", "27b"):
            p = plan(shape_from_params(size), method="qlora", seq_len=2048, batch=1, train_tokens=1e7)
            fit = {f["gpu"]: f["count"] for f in p["fits"]}
            rec = p["recommended"]
            usd = next(f["usd_per_epoch"] for f in p["fits"] if f["gpu"] == rec["gpu"])
            rows.append(f"{size} QLoRA {p['total_gib']:.1f} GiB: A100-80GB x{fit.get('A100-80GB')}, "
                        f"H100-80GB x{fit.get('H100-80GB')}, L4-24GB x{fit.get('L4-24GB')}; rent "
                        f"{rec['count']} x {rec['gpu']} (${usd:.2f} per 10M tokens)")
            console.print(rows[-1])
        s.done("; ".join(rows))


@dataclass
class _Trained:
    run: Path
    result: object  # train.trainer's result: .adapter_dir, .steps, .losses
    history: list  # [(checkpoint name, eval summary)] in step order
    eval_config: object


def _step_train(steps: list[Step], console: Console, out: Path, proj: Path, data: Path, base: Path,
                n_steps: int) -> _Trained:
    """Train (default preset) with the eval and the regression gate on every checkpoint."""
    with _Timer(steps, console, "train + eval per checkpoint") as s:
        from gemtune.base.provision import DEFAULT_MODEL
        from gemtune.evals.checkpoint import checkpoint_evals
        from gemtune.evals.config import load_eval_config
        from gemtune.train.config import load_train_config
        from gemtune.train.trainer import train

        every = n_steps // 2
        tcfg = load_train_config(proj / "gemtune.yaml", {"base": DEFAULT_MODEL, "max_steps": n_steps, "save_every": every,
                                                         "eval_every": every})
        ecfg = load_eval_config(proj / "gemtune.yaml")
        run = out / "run"
        with checkpoint_evals(run, data, str(base), gate=ecfg.gate, config=ecfg) as hook:
            res = train(data, run, tcfg, on_checkpoint=hook, console=console)
        best = hook.best
        hist = []
        for ck in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            summ = json.loads((ck / "eval" / "summary.json").read_text())
            hist.append((ck.name, summ))
        base_acc = _baseline_accuracy(hist[-1][1])
        s.done(f"{res.steps} steps, loss {res.losses[0]:.2f}→{res.losses[-1]:.2f}; frozen-eval accuracy "
               + ", ".join(f"{n} {h.get('accuracy', 0):.2f}" for n, h in hist)
               + (f" vs base {base_acc:.2f}" if base_acc is not None else "")
               + f"; best shippable: {best.get('checkpoint')}")
    return _Trained(run, res, hist, ecfg)


def _step_eval(steps: list[Step], console: Console, out: Path, trained: _Trained, data: Path) -> None:
    """The eval report of the final adapter on a freshly loaded base, as `gemtune eval` runs it (the checkpoint eval
    ran on the training model, whose outputs are cached apart); it must beat the base by 30 points."""
    with _Timer(steps, console, "eval") as s:
        from gemtune.evals.pipeline import run_eval

        o = run_eval(str(trained.result.adapter_dir), data / "eval.jsonl", out / "eval", baseline="base",
                     config=trained.eval_config, echo=console.print)
        summ = json.loads((out / "eval" / "summary.json").read_text())
        base_acc = _baseline_accuracy(summ)
        if base_acc is None:
            raise UserError("the eval did not compare against the base", file=str(out / "eval" / "summary.json"))
        gain = (summ["accuracy"] - base_acc) * 100
        s.done(f"adapter {summ['accuracy']:.2f} vs base {base_acc:.2f} (+{gain:.0f} points), gate "
               f"{'PASS' if o.gate is None or o.gate.passed else 'FAIL'}; report {out / 'eval' / 'report.html'}",
               ok=gain >= 30)


def _step_registry(steps: list[Step], console: Console, out: Path, trained: _Trained, private: bool) -> None:
    """Both versions stored immutable; prod promoted to the first, then the final one (a rollback target)."""
    with _Timer(steps, console, "registry") as s:
        from gemtune.registry.routes import RouteTable
        from gemtune.registry.store import Registry

        reg = Registry(out / "registry")
        first = trained.history[0][0]
        first_ck = trained.run / first
        v1 = reg.push("support-router", first_ck, force=not _shippable(first_ck), require_verdict=False)
        # a failed probe makes push refuse; the demo pushes anyway, recorded as forced, and says so
        v2 = reg.push("support-router", trained.result.adapter_dir, force=not private, require_verdict=False)
        routes = RouteTable(reg)
        routes.promote("support-router", v1.version)
        routes.promote("support-router", v2.version)
        carried = [f for f in (SIDECAR, "README.md") if (v2.path / f).is_file()]
        s.done(f"support-router {v1.version} ({first}) and {v2.version} (final) stored immutable with sha256, "
               f"{v2.version} carrying its probe verdict and card ({', '.join(carried)}); prod → {v2.version}"
               + ("" if private else " — pushed with --force: the privacy probe failed"), ok=private)


def _finish(steps: list[Step], console: Console, out: Path, t0: float) -> list[Step]:
    table = Table(title=f"gemtune demo — {time.time() - t0:.0f} s, everything in {out}")
    table.add_column("step", style="bold")
    table.add_column("proved")
    table.add_column("s", justify="right")
    for st in steps:
        table.add_row(st.name, st.proved if st.ok else f"[red]{st.proved}[/red]", f"{st.seconds:.0f}")
    console.print(table)
    (out / "demo.json").write_text(json.dumps([st.__dict__ for st in steps], indent=2))
    failed = [st.name for st in steps if not st.ok]
    if failed:
        raise GateFailed(f"demo steps did not prove their point: {', '.join(failed)}")
    return steps


def _baseline_accuracy(summary: dict) -> float | None:
    """The baseline's accuracy from an eval summary.json (`compare.accuracy.baseline`)."""
    return ((summary.get("compare") or {}).get("accuracy") or {}).get("baseline")


def _shippable(adapter_dir: Path) -> bool:
    return bool(read_sidecar(adapter_dir).get("shippable", True))


def _serve_round_trip(registry_dir: Path, base: str, data: Path, console: Console) -> str:
    """A real HTTP server in this process: requests for both versions, an A/B split, a rollback."""
    import httpx

    from gemtune.registry.routes import RouteTable
    from gemtune.registry.store import Registry
    from gemtune.serve.api import ServerThread, create_app
    from gemtune.serve.gateway import build_gateway

    recs = [json.loads(l) for l in (data / "eval.jsonl").read_text().splitlines()[:4]]
    gw = build_gateway(str(registry_dir), base=base, max_batch=8, max_loras=4)
    routes = RouteTable(Registry(registry_dir))
    facts = []
    with ServerThread(create_app(gw)) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        def ask(model: str, rec: dict, user: str | None = None) -> tuple[str, str]:
            body = {"model": model, "messages": rec["messages"][:-1], "max_tokens": 8, "temperature": 0}
            if user:
                body["user"] = user
            r = c.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            j = r.json()
            return j["model"], j["choices"][0]["message"]["content"].strip()

        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        served = [ask("support-router", r) for r in recs]
        right = sum(out == r["messages"][-1]["content"] for (_, out), r in zip(served, recs))
        console.print(f"prod answers: {[o for _, o in served]} (expected {[r['messages'][-1]['content'] for r in recs]})")
        pinned = {ask(f"support-router@{v}", recs[0])[0] for v in ("v1", "v2")}
        routes.split("support-router", "prod", {"v1": 50, "v2": 50})
        time.sleep(0.5)
        arms = {ask("support-router", recs[0], user=f"user-{i}")[0] for i in range(12)}
        routes.rollback("support-router", "prod")  # undo the split
        routes.rollback("support-router", "prod")  # and roll prod back to v1
        time.sleep(0.5)
        after = ask("support-router", recs[0])[0]
        facts = [f"/v1/models lists {len(models)} models", f"prod routed {right}/{len(recs)} tickets right",
                 f"pinned versions served by {sorted(pinned)}", f"A/B split served {sorted(arms)}",
                 f"rollback → prod served by {after}"]
    return "; ".join(facts)


def _privacy_and_card(steps: list[Step], console: Console, out: Path, adapter: Path, data: Path, base: Path) -> bool:
    """Probe the final adapter (the verdict lands in its gemtune.json) and write its card, also as the adapter's
    README.md (replacing PEFT's template), so the registry version carries both. True when the probe passed."""
    from gemtune.card import write_card
    from gemtune.privacy.config import PrivacyConfig
    from gemtune.privacy.probe import enforce, run_probe
    from gemtune.utils import atomic_write_text

    passed = True
    with _Timer(steps, console, "privacy probe") as s:
        rep = run_probe(adapter, data, out / "probe.json", base=str(base),
                        config=PrivacyConfig(samples=24, pii_samples=8), progress=lambda m: console.print(f"[dim]{m}[/dim]"))
        try:
            enforce(rep)
            s.done(_probe_line(rep))
        except GateFailed as e:
            passed = False
            s.done(f"{_probe_line(rep)} — {e}", ok=False)
    with _Timer(steps, console, "model card") as s:
        card = write_card(adapter, out / "MODEL_CARD.md", data=data, eval_dir=out / "eval", probe=out / "probe.json")
        atomic_write_text(adapter / "README.md", Path(card).read_text(encoding="utf-8"))
        s.done(f"{card} (and {adapter.name}/README.md): base_model, library_name: peft, eval vs base with "
               "significance, probe numbers, residual risk")
    return passed


def _probe_line(rep: dict) -> str:
    ext, can = rep.get("extraction", {}), rep.get("canaries", {})
    parts = []
    if ext.get("status") == "run":
        parts.append(f"extraction rate adapter {ext['adapter']['extraction_rate']:.2f} vs base "
                     f"{ext['base']['extraction_rate']:.2f}")
    if can.get("status") == "run":
        a, b = can.get("adapter") or {}, can.get("base") or {}
        parts.append(f"canary exposure adapter {a.get('max_exposure', float('nan')):.1f} vs base "
                     f"{b.get('max_exposure', float('nan')):.1f} bits")
    return "; ".join(parts) or "probe ran"
