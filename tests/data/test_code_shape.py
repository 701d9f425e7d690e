"""Code shape of the data and registry stages (issue #13): entry points read as named steps, none too long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "gemtune"
MAX_LINES = 120


@pytest.mark.parametrize("package", ["data", "registry"])
def test_no_function_is_longer_than_120_lines(package):
    long = []
    for p in sorted((PKG / package).glob("*.py")):
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_LINES:
                long.append(f"{p.relative_to(PKG.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_data_build_calls_its_steps_in_order():
    from gemtune.data import pipeline

    tree = ast.parse(Path(pipeline.__file__).read_text(encoding="utf-8"))
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
    calls = sorted((c.lineno, c.col_offset, c.func.id) for c in ast.walk(build) if isinstance(c, ast.Call)
                   and isinstance(c.func, ast.Name) and c.func.id.startswith("_") and c.func.id[1:2].islower())
    steps = ["_plan", "_load_tokenizer", "_read_inputs", "_limit_tokens", "_assign_ids", "_dedup",
             "_drop_id_collisions", "_split", "_balance", "_mix", "_records", "_count", "_report", "_write"]
    assert [name for _, _, name in calls] == steps
