"""`gemtune release NAME ADAPTER`: the ship checklist as one command, stopping at the first step that says no.

    check  → the adapter is servable unchanged (what a push would refuse, refused before anything runs)
    eval   → gated against what is live (`registry:NAME@ALIAS`; the base when nothing is), verdict recorded in the
             adapter's gemtune.json, bound to its weights; optionally against an external model too (`openai:…`)
    probe  → privacy: extraction, canary exposure, PII regurgitation (verdict bound to the weights as well)
    card   → README.md in the adapter directory, so it travels with the version
    push   → an immutable, sha256-verified version (the registry checks the verdict itself)
    route  → behind a canary: the alias sends `canary` % to the new version and the rest to the version it served
             (100 % when it served nothing); the registry checks that the new version passed against that one

Each step prints one line; the first failure stops the release with its reason (exit 1 for a check that said no,
2 for bad input). Nothing in the registry changes before the push step: every earlier step only reads it (the
eval resolves the live version without creating anything). The last line goes to Slack (`--slack-webhook` or
$SLACK_WEBHOOK_URL) whatever the outcome.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from gemtune.adapter import check_adapter_dir, read_sidecar, weights_sha256
from gemtune.errors import GateFailed, UserError
from gemtune.evals.notify import WEBHOOK_ENV, notify

STEPS = ("check", "eval", "probe", "card", "push", "route")
DEFAULT_ALIAS = "prod"


@dataclass
class ReleaseOptions:
    """Everything `gemtune release` takes besides NAME and ADAPTER (the CLI flags, one to one)."""

    root: str  # the registry directory
    alias: str = DEFAULT_ALIAS
    canary: int = 10  # % of the alias's traffic to the new version while the old one keeps the rest
    suite: Optional[str] = None  # default: eval.jsonl of the dataset the adapter was trained on
    data: Optional[str] = None  # dataset dir for the probe (default: the adapter's gemtune.json)
    external: Optional[str] = None  # openai:URL#MODEL: must beat it too
    out: Optional[str] = None  # eval results and the probe report (default: <adapter>/../release-<name>)
    config: Optional[str] = None  # gemtune.yaml (eval: and privacy: sections)
    base: Optional[str] = None
    webhook: Optional[str] = None
    license: Optional[str] = None


@dataclass
class StepResult:
    name: str
    ok: bool
    line: str


@dataclass
class Release:
    """What a release did: one result per step that ran, the version it made, and the closing line."""

    name: str
    steps: list[StepResult] = field(default_factory=list)
    version: Optional[str] = None
    weights: Optional[dict] = None
    line: str = ""
    posted: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps) and self.steps[-1].name == "route"


@contextlib.contextmanager
def _quiet_webhook() -> Iterator[None]:
    """The eval posts its own line to $SLACK_WEBHOOK_URL; during a release only the closing line goes to Slack."""
    saved = os.environ.pop(WEBHOOK_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[WEBHOOK_ENV] = saved


def canary_weights(live: Optional[dict[str, int]], new: str, canary: int) -> dict[str, int]:
    """The route after the release: `canary` % to `new`, the rest to the version the alias served (its largest
    arm under an A/B split: the one the candidate was gated against; an earlier canary is replaced), or all of
    it to `new` when the alias served nothing or `canary` is 100."""
    from gemtune.registry.names import version_number

    arms = {v: w for v, w in (live or {}).items() if w > 0 and v != new}
    if not arms or canary >= 100:
        return {new: 100}
    main = max(arms, key=lambda v: (arms[v], version_number(v)))
    return {main: 100 - canary, new: canary}


def live_route(root: Path, name: str, alias: str) -> Optional[dict[str, int]]:
    """The weights NAME@ALIAS routes to now (positive ones); None when it routes nowhere or there is no registry.
    Reads only: no directory, lock or file is created."""
    from gemtune.registry.history import read_routes

    if not (root / "routes.json").is_file():
        return None
    entry = read_routes(root / "routes.json")["routes"].get(name, {}).get(alias)
    weights = {v: int(w) for v, w in ((entry or {}).get("weights") or {}).items() if int(w) > 0}
    return weights or None


class _Run:
    """The checklist for one release: each step is a method returning its one line, raising to stop."""

    def __init__(self, name: str, adapter: Path, opts: ReleaseOptions, echo: Callable[[str], None],
                 progress: Callable[[str], None]):
        self.name, self.adapter, self.opts, self.echo, self.progress = name, adapter, opts, echo, progress
        self.root = Path(opts.root).expanduser()
        self.out = Path(opts.out) if opts.out else adapter.parent / f"release-{name}"
        self.live = live_route(self.root, name, opts.alias)
        self.eval_dir: Optional[Path] = None
        self.probe_path: Optional[Path] = None
        self.version: Optional[str] = None
        self.weights: Optional[dict] = None
        self.beaten: list[str] = []  # the baseline ids the candidate passed the gate against

    # ---- steps ---------------------------------------------------------------------------------------------
    def check(self) -> str:
        from gemtune.registry.names import validate_alias, validate_name
        from gemtune.registry.store import inspect_adapter

        validate_name(self.name)
        validate_alias(self.opts.alias)
        if not 1 <= self.opts.canary <= 100:
            raise UserError(f"--canary {self.opts.canary}: expected a share of traffic from 1 to 100 (%)",
                            field="canary")
        _, _, problems, _ = inspect_adapter(self.adapter)
        if problems:
            raise GateFailed("not servable unchanged by vLLM/gemtune, the push would refuse it: " + "; ".join(problems))
        live = ", ".join(f"{v} {w}%" for v, w in self.live.items()) if self.live else "nothing"
        return (f"{self.adapter} (sha256 {weights_sha256(self.adapter)[:12]}…) is servable; "
                f"{self.name}@{self.opts.alias} serves {live}")

    def eval(self) -> str:
        from gemtune.evals.config import load_eval_config
        from gemtune.evals.pipeline import run_eval

        cfg = load_eval_config(self.opts.config)
        suite = self.opts.suite or str(self._data_dir() / "eval.jsonl")
        specs = [f"registry:{self.name}@{self.opts.alias}" if self.live else "base"]
        if self.opts.external:
            specs.append(self.opts.external)
        lines = []
        for i, spec in enumerate(specs):
            out = self.out / ("eval" if i == 0 else f"eval-{i}")
            with _quiet_webhook():
                o = run_eval(str(self.adapter), suite, out, baseline=spec, config=cfg, base=self.opts.base,
                             registry=str(self.root), record=True, echo=self.progress, progress=self.progress)
            if i == 0:
                self.eval_dir = out
            bid = o.baseline_spec.id if o.baseline_spec is not None else spec
            if o.gate is None or not o.gate.passed:
                raise GateFailed(f"lost to {bid}: {o.line} (report {out / 'report.html'})")
            lines.append(f"beat {bid}: {o.line}")
            self.beaten.append(bid)
        return "; ".join(lines)

    def probe(self) -> str:
        from gemtune.privacy.config import load_privacy_config
        from gemtune.privacy.probe import enforce, run_probe

        cfg = load_privacy_config(self.opts.config)
        self.probe_path = self.out / "probe.json"
        report = run_probe(self.adapter, self.opts.data, self.probe_path, base=self.opts.base, config=cfg,
                           progress=self.progress)
        enforce(report)  # GateFailed naming every check over its limit
        return f"{len(report['checks'])} checks within limits (report {self.probe_path})"

    def card(self) -> str:
        from gemtune.card import write_card

        path = write_card(self.adapter, self.adapter / "README.md", data=self.opts.data, eval_dir=self.eval_dir,
                          probe=self.probe_path, name=self.name, license=self.opts.license)
        return f"wrote {path} (travels with the version)"

    def push(self) -> str:
        from gemtune.registry.store import Registry

        vi = Registry(self.root).push(self.name, self.adapter)  # checks the verdict for these weights itself
        self.version = vi.version
        return f"{vi.ref} stored immutable (sha256 manifest) → {vi.path}"

    def route(self) -> str:
        from gemtune.registry.routes import RouteTable
        from gemtune.registry.store import Registry

        reg = Registry(self.root)
        weights = canary_weights(self.live, self.version, self.opts.canary)
        table = RouteTable(reg, check=reg.route_check(force=False))
        try:
            out = table.split(self.name, self.opts.alias, weights) if len(weights) > 1 else \
                table.promote(self.name, self.version, self.opts.alias)
        except UserError as e:
            raise type(e)(f"{e} ({self.name}@{self.version} stays pushed but unrouted)") from None
        self.weights = out["weights"]
        return f"{self.name}@{self.opts.alias} → " + ", ".join(f"{v} {w}%" for v, w in self.weights.items())

    # ---- helpers -------------------------------------------------------------------------------------------
    def _data_dir(self) -> Path:
        if self.opts.data:
            return Path(self.opts.data)
        ds = read_sidecar(self.adapter).get("dataset")
        d = ds.get("dir") if isinstance(ds, dict) else None
        if not d:
            raise UserError("no --suite given and the adapter's gemtune.json records no dataset dir (dataset.dir)",
                            file=str(self.adapter), field="suite")
        return Path(d)


def release(name: str, adapter: str | Path, opts: ReleaseOptions, *, echo: Callable[[str], None] = print,
            progress: Callable[[str], None] = lambda m: None) -> Release:
    """Run the checklist; returns the Release when every step passed. The first failing step raises (GateFailed
    or a UserError with its own exit code) after its line and the closing line were printed and posted."""
    adapter_dir = check_adapter_dir(adapter, field="adapter")
    run = _Run(name, adapter_dir, opts, echo, progress)
    rel = Release(name)
    for step in STEPS:
        try:
            line = getattr(run, step)()
        except (GateFailed, UserError) as e:
            rel.steps.append(StepResult(step, False, str(e)))
            echo(f"✗ {step:<6} FAIL {e}")
            untouched = STEPS.index(step) <= STEPS.index("push")
            rel.line = (f"release {name} FAILED at {step}: {_first_line(e)}"
                        + ("; the registry is unchanged" if untouched else ""))
            rel.posted = notify(rel.line, opts.webhook, echo=echo)
            raise
        rel.steps.append(StepResult(step, True, line))
        echo(f"✓ {step:<6} PASS {line}")
    rel.version, rel.weights = run.version, run.weights
    route = ", ".join(f"{v} {w}%" for v, w in (run.weights or {}).items())
    rel.line = (f"release {name}@{run.version} live on {opts.alias} ({route}): beat {' and '.join(run.beaten)}, "
                "privacy probe passed, card written")
    rel.posted = notify(rel.line, opts.webhook, echo=echo)
    return rel


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
