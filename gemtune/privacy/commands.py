"""`gemtune probe`: CLI wiring over probe.py (the run, the thresholds) and a rich table of its report.

Exit codes: 0 every privacy check passed, 1 a probe exceeded a threshold (`GateFailed`,
after the report is written), 2 usage or input error (`UserError`, naming the file and field).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _print_report(report: dict) -> None:
    from gemtune.privacy.probe import fmt_value

    t = Table(title="privacy probe: adapter vs base")
    for col, just in (("check", "left"), ("adapter", "right"), ("base", "right"), ("limit", "right"), ("", "left")):
        t.add_column(col, justify=just)
    for c in report["checks"]:
        verdict = "[dim]not run[/dim]" if c.get("note") == "not run" else (
            "[green]ok[/green]" if c["passed"] else "[bold red]FAIL[/bold red]")
        t.add_row(c["name"], fmt_value(c["adapter"], c["unit"]), fmt_value(c["base"], c["unit"]),
                  "off" if c["limit"] is None else fmt_value(c["limit"], c["unit"]), verdict)
    console.print(t)
    ext = report["extraction"]
    if ext["status"] == "run":
        console.print(f"extraction: {ext['sampled']} training examples ({ext['probes']} probes), exact "
                      f"{fmt_value(ext['adapter']['exact_rate'], 'share')} vs base "
                      f"{fmt_value(ext['base']['exact_rate'], 'share')}")
    if report["canaries"]["status"] == "run":
        c = report["canaries"]
        console.print(f"canaries: {c['count']} x R={c['candidates']}, mean exposure {c['adapter']['mean_exposure']:.2f} "
                      f"bits vs base {c['base']['mean_exposure']:.2f} (max possible {c['max_possible']:.2f})")
    if report.get("report"):
        console.print(f"report: {report['report']}")


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe(
        adapter: str = typer.Option(..., "--adapter", help="PEFT adapter directory to probe."),
        data: Optional[str] = typer.Option(None, "--data", help="Dataset dir it was trained on (default: from "
                                           "the adapter's gemtune.json)."),
        out: str = typer.Option(..., "--out", help="JSON report file."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the adapter's gemtune.json)."),
        samples: Optional[int] = typer.Option(None, "--samples", help="Training examples probed for extraction [32]."),
        canaries: Optional[str] = typer.Option(None, "--canaries", help="Canaries file (default: the one "
                                               "`data build --canaries` recorded)."),
        candidates: Optional[int] = typer.Option(None, "--candidates", help="R: secrets ranked per canary [32]; "
                                                 "costs R x secret tokens per canary and model."),
        pii_samples: Optional[int] = typer.Option(None, "--pii-samples", help="Sampled generations scanned for "
                                                  "PII [16]; 0 skips."),
        seed: Optional[int] = typer.Option(None, "--seed"),
        config: Optional[str] = typer.Option(None, "--config", help="gemtune.yaml whose `privacy:` section sets "
                                             "thresholds and defaults."),
    ):
        """Extraction, canary exposure and PII regurgitation on an adapter vs its base; exit 1 over a threshold."""
        from gemtune.privacy.config import load_privacy_config
        from gemtune.privacy.probe import enforce, run_probe

        cfg = load_privacy_config(config, {"samples": samples, "candidates": candidates, "pii_samples": pii_samples,
                                           "seed": seed})
        report = run_probe(adapter, data, out, base=base, config=cfg, canaries=canaries, progress=_say)
        _print_report(report)
        enforce(report)
