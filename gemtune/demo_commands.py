"""`gemtune demo`: CLI wiring over demo.py (the whole playbook on the embedded default base)."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: str = typer.Option("demo-out", "--out", help="Directory for everything the demo writes."),
        quick: bool = typer.Option(False, "--quick", help="Fewer steps: about 5 minutes on 2 CPU cores."),
    ):
        """Run the whole playbook on the embedded default base."""
        from gemtune.demo import run_demo

        run_demo(out, quick=quick, console=console)
