"""Fixtures for the data stage. Helpers live in fixtures/ (importable by name once this conftest has run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

from messy_tickets import Messy, make_messy  # noqa: E402


@pytest.fixture
def messy(tmp_path) -> Messy:
    return make_messy(tmp_path / "tickets.jsonl")
