"""Code shape of gemtune/ as a whole (issue #13): CLI modules hold wiring only, no two modules import each other."""

from __future__ import annotations

import ast
import re
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
    assert stages == ["base", "data", "train", "evals", "privacy", "card_commands", "registry", "release_commands", "serve",
                      "demo_commands"]
    assert {f"gemtune.{p.parent.name}.commands" if p.name == "commands.py" else f"gemtune.{p.stem}"
            for p in _cli_modules()} == set(STAGE_COMMANDS)


def _module_name(p: Path) -> str:
    parts = p.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(p: Path, modules: set[str]) -> set[str]:
    """The gemtune modules `p` imports anywhere (inside functions too); `from pkg import child` names the child."""
    me = _module_name(p)
    pkg = me if p.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name in modules}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = pkg.split(".")[:len(pkg.split(".")) - (n.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in n.names:
                child = f"{base}.{a.name}"
                out.add(child if child in modules else base)
    return {m for m in out if m in modules and m != me}


def test_no_two_modules_import_each_other():
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    loops = sorted(f"{a} <-> {b}" for a, deps in graph.items() for b in deps
                   if a < b and a in graph.get(b, ()) and not (b.startswith(a + ".") or a.startswith(b + ".")))
    assert loops == []


MAX_FUNCTION_LINES = 120


def test_no_function_in_the_package_is_longer_than_the_limit():
    long = []
    for p in sorted(PKG.rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{p.relative_to(PKG.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def _files_containing(needle: str) -> list[str]:
    return sorted(str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if needle in p.read_text(encoding="utf-8"))


def test_one_yaml_reader_and_one_owner_of_the_adapter_sidecar():
    assert _files_containing("yaml.safe_load") == ["gemtune/config.py"]
    assert _files_containing('"gemtune.json"') == ["gemtune/adapter.py"]


def test_architecture_page_describes_the_tree():
    """docs/architecture.md names every package folder and top-level module; every stage folder has its page."""
    docs = PKG.parent / "docs"
    page = (docs / "architecture.md").read_text(encoding="utf-8")
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__")
    modules = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    missing = [f"gemtune/{f}/" for f in folders if f"gemtune/{f}/" not in page]
    missing += [f"gemtune/{m}" for m in modules if f"gemtune/{m}" not in page]
    assert missing == [], f"docs/architecture.md does not describe {missing}"
    stages = [f for f in folders if (PKG / f / "__init__.py").exists()]
    assert [s for s in stages if not (docs / "stages" / f"{s}.md").is_file()] == []
    for link in re.findall(r"\]\((stages/[^)]+)\)", page):
        assert (docs / link).exists(), link
