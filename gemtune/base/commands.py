"""`gemtune base pull` and `gemtune base info`: CLI wiring over provision.py (provisioning and caching a base)
and families.py (its family facts)."""

from __future__ import annotations

import json

import typer
from rich.console import Console

err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    base_app = typer.Typer(help="Provision and inspect base models.", no_args_is_help=True)
    app.add_typer(base_app, name="base")

    @base_app.command("pull")
    def base_pull(
        model: str = typer.Option("gemma-3-270m", "--model", help="Embedded name, local directory or hub id."),
        force: bool = typer.Option(False, "--force", help="Rebuild the cached conversion."),
    ):
        """Provision and cache a base model; print its local directory as the last line."""
        from gemtune.base.provision import pull

        path = pull(model, force=force, progress=lambda m: err_console.print(f"[dim]{m}[/dim]"))
        print(path)

    @base_app.command("info")
    def base_info(model: str = typer.Option("gemma-3-270m", "--model")):
        """Family facts for a base: model type, template, end-of-turn token, LoRA targets."""
        from gemtune.base.families import describe

        print(json.dumps(describe(model), indent=2))
