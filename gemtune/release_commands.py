"""`gemtune release NAME ADAPTER`: CLI wiring over release.py (the checklist itself).

Exit codes: 0 the new version is live behind its canary, 1 a step said no (the gate, the probe, the registry's
verdict checks), 2 bad input (a path, a flag, a damaged registry file).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    @app.command("release")
    def release(
        name: str = typer.Argument(..., help="Adapter name in the registry."),
        adapter: str = typer.Argument(..., help="PEFT adapter directory (the candidate)."),
        root: str = typer.Option(..., "--root", help="Registry directory (created on the first push)."),
        alias: str = typer.Option("prod", "--alias", help="The alias to release to; the candidate is gated "
                                  "against the version it serves now (the base when it serves nothing)."),
        canary: int = typer.Option(10, "--canary", help="% of the alias's traffic to the new version; the rest "
                                   "stays on the version it served (100 when it served nothing)."),
        suite: Optional[str] = typer.Option(None, "--suite", help="Eval suite (default: eval.jsonl of the dataset "
                                            "in the adapter's gemtune.json)."),
        data: Optional[str] = typer.Option(None, "--data", help="Dataset dir it was trained on, for the privacy "
                                           "probe (default: from gemtune.json)."),
        external: Optional[str] = typer.Option(None, "--external", help="openai:URL#MODEL: the candidate must beat "
                                               "this model too (verdict recorded)."),
        out: Optional[str] = typer.Option(None, "--out", help="Eval results and probe report "
                                          "(default: ADAPTER/../release-NAME)."),
        config: Optional[str] = typer.Option(None, "--config", help="gemtune.yaml (eval: and privacy: sections)."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the adapter's gemtune.json)."),
        license: Optional[str] = typer.Option(None, "--license", help="License id for the model card."),
        webhook: Optional[str] = typer.Option(None, "--slack-webhook", help="Slack webhook for the closing line "
                                              "(default: $SLACK_WEBHOOK_URL)."),
    ):
        """Eval against what is live, privacy probe, model card, push, then route a canary share to it: one line
        per step, and the first step that says no stops the release (nothing in the registry changes before the
        push)."""
        from gemtune.release import ReleaseOptions, release as run_release

        opts = ReleaseOptions(root=root, alias=alias, canary=canary, suite=suite, data=data, external=external,
                              out=out, config=config, base=base, webhook=webhook, license=license)
        run_release(name, adapter, opts, echo=lambda m: console.print(m, highlight=False, soft_wrap=True),
                    progress=lambda m: print(m, file=sys.stderr))
