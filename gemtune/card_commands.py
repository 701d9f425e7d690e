"""`gemtune card`: CLI wiring over card.py (the model card is its own step of the playbook, after eval and probe).

Exit codes: 0 the card was written, 2 usage or input error (`UserError`, naming the file and field).
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    @app.command("card")
    def card(
        adapter: str = typer.Option(..., "--adapter", help="PEFT adapter directory."),
        out: str = typer.Option(..., "--out", help="Model card file (README.md)."),
        data: Optional[str] = typer.Option(None, "--data", help="Dataset dir (default: from gemtune.json)."),
        eval_dir: Optional[str] = typer.Option(None, "--eval", help="`gemtune eval --out` directory (default: the "
                                               "eval summary in gemtune.json)."),
        probe: Optional[str] = typer.Option(None, "--probe", help="`gemtune probe --out` report (default: the one "
                                            "recorded in gemtune.json)."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name in the card (default: adapter dir name)."),
        license: Optional[str] = typer.Option(None, "--license", help="License id for the metadata [gemma]."),
    ):
        """Write a Hugging Face model card from the adapter's sidecars: data, training, eval, privacy."""
        from gemtune.card import write_card

        path = write_card(adapter, out, data=data, eval_dir=eval_dir, probe=probe, name=name, license=license)
        console.print(f"wrote {path}")
