"""Code shape of gemtune/ as a whole (issue #13): CLI modules hold wiring only, no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gemtune"


def _cli_modules() -> list[Path]:
    return sorted(PKG.glob("*/commands.py")) + sorted(PKG.glob("*_commands.py"))


def test_commands_modules_define_only_register_publicly():
    """Every verb is defined inside its stage's `register(app)`; what else a CLI module defines is private
    (`_x`: parsing and printing), so library logic has nowhere to hide there."""
    public = {}
    for p in _cli_modules():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        public[str(p.relative_to(PKG.parent))] = [n for n in names if not n.startswith("_")]
    assert len(public) >= 9 and all(v == ["register"] for v in public.values()), public


def test_cli_assembles_stages_and_defines_no_verb():
    from gemtune.cli import STAGE_COMMANDS

    src = (PKG / "cli.py").read_text(encoding="utf-8")
    assert ".command(" not in src and "add_typer(" not in src
    stages = [m.split(".")[1] for m in STAGE_COMMANDS]
    assert stages == ["base", "data", "train", "evals", "privacy", "card_commands", "registry", "serve",
                      "demo_commands"]
    assert {f"gemtune.{p.parent.name}.commands" if p.name == "commands.py" else f"gemtune.{p.stem}"
            for p in _cli_modules()} == set(STAGE_COMMANDS)
