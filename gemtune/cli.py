"""The `gemtune` command line: assembles the stages' verbs, in playbook order, and turns errors into exit codes.

This is the only module that knows every stage, and it defines no verb itself. Stages register their verbs through
`register(app)` in their own `gemtune/<stage>/commands.py` (the model card: `gemtune/card_commands.py`, the demo:
`gemtune/demo_commands.py`, the release checklist: `gemtune/release_commands.py`), listed in STAGE_COMMANDS below;
a verb appears in `--help` only once its stage is built, so `--help` never lists a verb that does not work.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default; on a shared or small CPU that makes every matmul wait on spinning
# neighbours (10-30x slower measured here). Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import sys  # noqa: E402
from typing import Optional

import typer  # noqa: E402
import typer.core  # noqa: E402
from rich.console import Console  # noqa: E402

from gemtune.errors import GateFailed, UserError  # noqa: E402

err_console = Console(stderr=True)

# `--help` lists the verbs in the order of the playbook; a verb not named here follows, in registration order.
PLAYBOOK_ORDER = ("base", "data", "plan", "train", "eval", "probe", "card", "registry", "release", "serve", "merge",
                  "demo")


class PlaybookGroup(typer.core.TyperGroup):
    """The top-level group: commands listed in PLAYBOOK_ORDER, wherever each stage registers them."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        rank = {n: i for i, n in enumerate(PLAYBOOK_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


app = typer.Typer(
    cls=PlaybookGroup,
    name="gemtune",
    help="From raw domain examples to a shipped, gated, served Gemma LoRA adapter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each stage's `register(app)` module, in playbook order (base, data, plan + train, eval, probe, card, registry,
# release, serve + merge, demo); PlaybookGroup orders --help by PLAYBOOK_ORDER whatever the registration order.
STAGE_COMMANDS = (
    "gemtune.base.commands",
    "gemtune.data.commands",
    "gemtune.train.commands",
    "gemtune.evals.commands",
    "gemtune.privacy.commands",
    "gemtune.card_commands",
    "gemtune.registry.commands",
    "gemtune.release_commands",
    "gemtune.serve.commands",
    "gemtune.demo_commands",
)


def _register_stages() -> None:
    for mod in STAGE_COMMANDS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue  # stage not built yet: its verbs are not offered
            raise
        m.register(app)


_register_stages()


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        # one unwrapped line: a `file:line: field "x"` reference must survive a narrow or piped terminal intact;
        # a UserError that is a gate saying no (the registry's Refused) carries exit_code 1
        code = getattr(e, "exit_code", 2)
        label = "[bold yellow]gate:[/bold yellow]" if code == 1 else "[bold red]error:[/bold red]"
        err_console.print(f"{label} {e}", highlight=False, soft_wrap=True)
        sys.exit(code)
    except GateFailed as e:
        err_console.print(f"[bold yellow]gate:[/bold yellow] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.UsageError):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
