"""Fixtures for the serving tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def save_tiny_fused(path: Path, family: str = "gemma3") -> Path:
    """A tiny base whose tokenizer decodes by concatenation (a Fuse decoder), so generated text is exactly the
    characters chosen: what grammar-constrained outputs are parsed from."""
    from gemtune.base.tiny import save_tiny

    d = save_tiny(path, family)
    p = Path(d) / "tokenizer.json"
    tok = json.loads(p.read_text())
    tok["decoder"] = {"type": "Fuse"}
    p.write_text(json.dumps(tok))
    return d


@pytest.fixture(scope="module")
def tiny_fused(tmp_path_factory) -> Path:
    return save_tiny_fused(tmp_path_factory.mktemp("tiny-fused"))


@pytest.fixture(scope="module")
def tiny_fused_gemma4(tmp_path_factory) -> Path:
    return save_tiny_fused(tmp_path_factory.mktemp("tiny-fused-g4"), "gemma4")
